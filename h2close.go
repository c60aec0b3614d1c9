package tcpops

import (
	"encoding/binary"
	"time"

	"go.uber.org/zap"

	"github.com/tcpops/caddy-tcpops/internal/h2frame"
)

// Closing HTTP/2 as gRPC-Go's server does.
//
// An HTTP/2 client that finds its connection closed under a request it just
// sent loses that request: gRPC-Go reports "Unavailable: error reading from
// server: EOF". gRPC-Go's server never closes that way: for its
// MaxConnectionIdle and MaxConnectionAge it sends a GOAWAY (NO_ERROR, last
// stream id 2^31-1: open no new stream), then a PING, and closes once the
// client has acknowledged the PING (so it has seen the GOAWAY, and every
// stream it opened before is known) and no stream is in flight; the client
// opens its next streams on a new connection. Go's HTTP/2 server has no
// way to ask for this on one connection (its GOAWAY goes out only for a
// response with Connection: close, or at shutdown), so tcpops writes the
// two frames itself, where it sees the plaintext: h2c, or tcpops after
// `tls` in listener_wrappers. Before `tls` it sees TLS records, and closes
// as on any HTTP connection (httpstate.go).
//
// For such a connection:
//   - when its lifetime runs out while it is idle, or when it reaches
//     max_lifetime whatever is in flight (by the timer, not at the next
//     response), tcpops sends GOAWAY and PING;
//   - when the client acknowledges the PING, tcpops sends the final GOAWAY
//     (h2FinalGoAway), with the last stream the client opened before it,
//     and withholds from the server the streams the client opens after;
//   - it closes gracefully (httpstate.go) once the final GOAWAY has gone
//     out, or h2AckTimeout passed without an ACK, and the last open stream
//     has ended;
//   - streams still open max_lifetime_grace after max_lifetime (after the
//     GOAWAY for the lifetime) are cut, as on any HTTP connection.
//
// The frames are written between two frames of the server's own output,
// never inside one or inside a header block: every write of the server
// passes through httpConn.Write, which follows the frames
// (internal/h2frame) and holds writeMu while it writes; ours wait for a
// boundary under the same lock. On the way in, tcpops reads the frame
// headers (stream ids, END_STREAM, RST_STREAM, the PING's ACK) and changes
// no byte: the server ignores an ACK for a PING it did not send (RFC 9113
// section 6.7; Go's processPing does).
//
// As the frames say when a stream's last frame has passed, such a
// connection needs no quiet window (httpstate.go) before its close.

// h2AckTimeout bounds the wait for the PING's acknowledgement: a client
// that does not answer within it is closed as though it had (gRPC-Go waits
// up to a minute before its second GOAWAY; a client that answers no PING
// in a second is not one to wait for). It counts from when the GOAWAY and
// PING left the socket's send queue (goawayLeftLocked), not from when they
// were decided or written: queued behind megabytes for a slow reader, they
// were read, and the PING acknowledged, 2.5s after the decision (issue 26's
// capture), and a timeout counted from the decision closed the connection
// under data the client had not read.
const h2AckTimeout = time.Second

// h2Tracker returns the frame tracker of c, created on first use while c
// may still speak plaintext HTTP/2 (not yet sniffed, or HTTP/2's preface);
// nil for any other connection. Go's server, after tls, writes its
// SETTINGS before it reads the client's preface: the tracker must follow
// the output from its first byte.
func (h *httpState) h2Tracker() *h2frame.Tracker {
	switch h.proto.Load() {
	case protoUnsniffed, protoHTTP2:
	default:
		return nil
	}
	if tr := h.h2.Load(); tr != nil {
		return tr
	}
	h.h2.CompareAndSwap(nil, h2frame.NewServer())
	return h.h2.Load()
}

// h2In follows bytes the client sent, q; it runs in Read, after the sniff.
// It returns how many bytes of q are withheld from the server: those of the
// frames the tracker withholds (In), moved out of q, which then ends
// early. When the client acknowledges the PING, it sends the final GOAWAY.
func (c httpConn) h2In(q []byte) (withheld int) {
	h := c.http
	tr := h.h2Tracker()
	if tr == nil {
		if h.h2.Load() != nil {
			h.h2.Store(nil) // not HTTP/2 after all: nothing to follow
		}
		return 0
	}
	n, acked := tr.In(q, 0)
	if acked {
		c.h2FinalGoAway(tr)
		c.h2Progress()
	}
	return len(q) - n
}

// readRefusing is Read once the tracker withholds frames (after the final
// GOAWAY): the client's bytes are read into h.inBuf, after room for a frame
// header the tracker held back from an earlier read, and the server reads
// what passes. A read whose bytes are all withheld is not returned empty
// (Go's server reads through a bufio.Reader, which fails after 100 empty
// reads): the next read follows.
func (c httpConn) readRefusing(tr *h2frame.Tracker, p []byte) (int, error) {
	h := c.http
	const room = h2frame.HeaderLen - 1
	for len(h.inPend) == 0 {
		if err := h.inErr; err != nil {
			h.inErr = nil // a deadline's error is not the last: the next read may succeed
			return 0, err
		}
		if h.inBuf == nil {
			h.inBuf = make([]byte, room+max(len(p), 4096))
		}
		m, err := c.Conn.Read(h.inBuf[room:])
		if m > 0 && h.lingering.Load() {
			return c.linger(p)
		}
		k, _ := tr.In(h.inBuf[:room+m], room)
		h.inPend, h.inErr = h.inBuf[:k], err
	}
	n := copy(p, h.inPend)
	h.inPend = h.inPend[n:]
	return n, nil
}

// h2FinalGoAway sends the second GOAWAY once the client acknowledged the
// PING, as gRPC-Go's server does: its last stream id is the highest the
// client opened before the acknowledgement, which the client sent after it
// read the first GOAWAY. A stream it opens after that (which RFC 9113
// section 6.8 forbids, but a client may race) is withheld from the server
// (h2frame.Tracker.In), so the GOAWAY's word that it was not processed holds,
// and the client may retry it elsewhere; the close waits only for the
// streams the server has.
func (c httpConn) h2FinalGoAway(tr *h2frame.Tracker) {
	f := tr.FinalGoAway()
	if f == nil {
		return
	}
	// The first GOAWAY and the PING have left (the client answered the
	// PING): nothing else is pending.
	c.http.pending.Store(&f)
	c.flushPending(tr)
	c.http.finalSent.Store(true)
	if c.tracker != nil && c.tracker.logger != nil {
		c.tracker.logger.Debug("tcpops: HTTP/2 final GOAWAY sent",
			c.logFields(zap.Uint32("last_stream_id", tr.LastPeerStream()))...)
	}
}

// Write writes the server's bytes, following its HTTP/2 frames and writing
// tcpops' own between two of them when some are pending.
func (c httpConn) Write(p []byte) (int, error) {
	h := c.http
	tr := h.h2Tracker()
	if tr == nil {
		return c.Conn.Write(p)
	}
	h.writeMu.Lock()
	n, err, idle := c.writeFrames(tr, p)
	h.writeMu.Unlock()
	if h.pending.Load() != nil {
		c.flushPending(tr)
	}
	if idle {
		c.h2Progress()
	}
	return n, err
}

// writeFrames writes p, with the pending frames at the first frame boundary
// in or before p. h.writeMu must be held. It reports whether p closed the
// last open stream, or the final GOAWAY went out: either may let c close.
func (c httpConn) writeFrames(tr *h2frame.Tracker, p []byte) (n int, err error, idle bool) {
	h := c.http
	if h.pending.Load() != nil {
		k, idle1 := tr.ToBoundary(p)
		if k > 0 {
			if n, err = c.Conn.Write(p[:k]); err != nil {
				return n, err, idle1
			}
		}
		idle = idle1
		if tr.AtBoundary() {
			if f := h.pending.Swap(nil); f != nil {
				_, _ = c.Conn.Write(*f) // a failure here is the server's next
				if h.finalSent.Load() {
					idle = true // the final GOAWAY went out: c may close
				} else {
					c.goawayWritten()
				}
			}
		}
		p = p[k:]
	}
	if len(p) == 0 {
		return n, nil, idle
	}
	m, err := c.Conn.Write(p)
	if tr.Out(p[:m]) {
		idle = true
	}
	return n + m, err, idle
}

// flushPending writes the pending frames if the server's output is at a
// frame boundary and no write of the server's is under way; else the
// server's next write does it. Whoever holds writeMu checks again after
// releasing it, so frames made pending meanwhile are not left behind.
func (c httpConn) flushPending(tr *h2frame.Tracker) {
	h := c.http
	for h.pending.Load() != nil && h.writeMu.TryLock() {
		at := tr.AtBoundary()
		final := false
		if at {
			if f := h.pending.Swap(nil); f != nil {
				_, _ = c.Conn.Write(*f)
				if final = h.finalSent.Load(); !final {
					c.goawayWritten()
				}
			}
		}
		h.writeMu.Unlock()
		if final {
			c.h2Progress() // the close waited for the final GOAWAY
		}
		if !at {
			return
		}
	}
}

// h2Progress re-evaluates c's deadlines after a frame that may let a
// draining connection close: the PING's ACK, or the end of the last stream.
func (c httpConn) h2Progress() {
	if !c.http.goaway.Load() {
		return
	}
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	c.settleLocked(c.since())
}

// h2DueLocked is dueLocked for a connection whose HTTP/2 frames tcpops
// follows; handled is false for any other, or while nothing calls for the
// GOAWAY yet. c.mu must be held.
func (c *Conn) h2DueLocked(now time.Duration) (d due, wait time.Duration, ok, handled bool) {
	h := c.http
	if h == nil || h.proto.Load() != protoHTTP2 {
		return due{}, 0, false, false
	}
	tr := h.h2.Load()
	if tr == nil {
		return due{}, 0, false, false
	}
	if h.goawayCause == "" {
		switch lt := c.opts.Lifetime.Duration(); {
		case c.maxLifetime > 0 && now >= c.maxLifetime:
			return due{cause: CauseMaxLifetime, goaway: true}, 0, true, true
		case lt > 0 && h.phase == httpIdle && now >= addSat(c.lifetimeStartLocked(), lt):
			return due{cause: CauseLifetime, goaway: true}, 0, true, true
		}
		return due{}, 0, false, false
	}
	next := func(w time.Duration) {
		if !ok || w < wait {
			wait, ok = w, true
		}
	}
	// Acknowledged once the final GOAWAY has gone out (h2FinalGoAway),
	// not at the ACK itself: a close in between would lose it. It waits
	// while the server's own write holds writeMu (measured under -race: the
	// first GOAWAY's Write had not returned when the client's ACK was read),
	// and whoever writes it then re-settles c. Without an ACK, the
	// timeout counts from when the GOAWAY and PING left the send queue
	// (goawayLeftLocked): behind megabytes queued for a slow reader, the
	// client reads them seconds after they were written.
	acked := h.finalSent.Load() && h.pending.Load() == nil
	if !acked {
		if left, at := c.goawayLeftLocked(); !left {
			next(sendQueuePoll)
		} else if acked = now >= at+h2AckTimeout; !acked {
			next(at + h2AckTimeout - now)
		}
	}
	if acked && tr.OpenStreams() == 0 {
		return due{cause: h.goawayCause, graceful: true}, 0, true, true
	}
	if g := c.graceLocked(); g > 0 {
		end, cause := addSat(h.goawayAt, g), CauseLifetime
		if h.goawayCause == CauseMaxLifetime {
			end, cause = addSat(c.maxLifetime, g), CauseMaxLifetimeGrace
		}
		if now >= end {
			return due{cause: cause}, 0, true, true
		}
		next(end - now)
	}
	return due{}, wait, ok, true
}

// goawayWritten records where the GOAWAY and PING just written end in the
// socket's byte stream: what the client had acknowledged, and what the
// send queue held after them. h.writeMu must be held, so no write of the
// server's came since. Without the queue's figures (not Linux) they count
// as gone at once.
func (c httpConn) goawayWritten() {
	end := uint64(1)
	if q, ok := sendQueue(c.tcp); ok {
		end = 1 + q.acked + uint64(q.outq)
	}
	c.http.goawayEnd.Store(end)
}

// goawayLeftLocked reports whether the GOAWAY and PING have left c's send
// queue, so that the client can read them, and since when: the first time
// it was seen, at most sendQueuePoll late. Behind megabytes of a response
// the socket still holds, they reach a slow reader seconds after they were
// written, and the PING's ACK seconds after that. c.mu must be held.
func (c *Conn) goawayLeftLocked() (bool, time.Duration) {
	h := c.http
	if h.goawayLeft {
		return true, h.goawayLeftAt
	}
	end := h.goawayEnd.Load()
	if end == 0 {
		return false, 0 // waiting for a frame boundary in the server's output
	}
	if q, ok := sendQueue(c.tcp); !ok || q.closed || q.acked+1 >= end {
		h.goawayLeft, h.goawayLeftAt = true, c.since()
	}
	return h.goawayLeft, h.goawayLeftAt
}

// startGoAwayLocked records that the GOAWAY for d goes out now, re-arms the
// timer for what comes next, releases c.mu, and sends the frames.
func (c *Conn) startGoAwayLocked(d due, now time.Duration) bool {
	h := c.http
	h.goawayCause, h.goawayAt = d.cause, now
	h.goaway.Store(true)
	_, wait, ok := c.dueLocked(now)
	c.armForLocked(wait, ok)
	c.mu.Unlock()
	tr := h.h2.Load()
	var data [8]byte
	copy(data[:2], "tc")
	binary.BigEndian.PutUint32(data[2:6], uint32(c.id)) // recognisable in a capture
	f := tr.DrainFrames(data)
	h.pending.Store(&f)
	httpConn{c}.flushPending(tr)
	if c.tracker != nil && c.tracker.logger != nil {
		c.tracker.logger.Debug("tcpops: HTTP/2 GOAWAY and PING sent", c.logFields(zap.String("cause", d.cause))...)
	}
	return ok
}
