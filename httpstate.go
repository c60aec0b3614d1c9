package tcpops

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/tcpops/caddy-tcpops/internal/h2frame"
	"github.com/tcpops/caddy-tcpops/internal/proxyhdr"
)

// Request-aware lifetimes for connections an HTTP server serves through the
// listener wrapper.
//
// tcpops sees bytes, and bytes say nothing of a request waiting for a slow
// backend: no byte passes, so the lifetime would take the connection for
// idle and cut the request. Caddy's HTTP server knows better, and tells:
// caddyhttp.Server.RegisterConnState hands a callback to Go's
// http.Server.ConnState, which reports StateActive when a request (HTTP/1.1)
// or the first open stream (HTTP/2, h2c included) starts, StateIdle when
// none is left, and StateHijacked when a handler takes the connection over
// (a WebSocket). While the HTTP app provisions a server's listener wrappers
// its context carries the server (caddyhttp.ServerCtxKey), so the wrapper
// registers from its own Provision, with no other line of configuration;
// Caddy binds the callbacks when the app starts.
//
// With that, for such a connection:
//   - lifetime does not run while a request is in flight, and counts from
//     the moment the connection last had none (StateNew, StateIdle); bytes
//     while idle (HTTP/2 PINGs, a request's first bytes) do not extend it,
//     as gRPC-Go's MaxConnectionIdle ignores them;
//   - a hijacked connection has no requests any more: its lifetime counts
//     bytes again, as on any TCP connection;
//   - max_lifetime drains (drain.go).
//
// The callback is Caddy's for every connection of the server, tracked or
// not; for one tcpops does not track it costs the walk down the wrappers.
//
// An idle HTTP connection whose lifetime (or max_lifetime, drain.go) runs
// out is closed gracefully, as an HTTP server closes a connection it is
// done with: the write side is shut first (FIN after the last response),
// and the socket stays open, reading and discarding what the client still
// sends, until the close can destroy nothing (the linger). Closed earlier,
// a socket that receives one more byte answers with an RST, and the
// client's kernel drops what it holds unread: a receive buffer of
// megabytes behind a slow reader (RFC 9112 section 9.6). A client keeps
// sending while it reads: an HTTP/2 client its WINDOW_UPDATEs and the
// PING's ACK as it reaches them, an HTTP/1.1 client a pipelined request.
// Closing 500ms after the FIN, as Go's server does (rstAvoidanceDelay), cut
// 13 of 17 downloads of 10 MiB by a client reading 2 MB/s at max_lifetime
// (issue 26). So the socket is closed when:
//   - the client has closed its side (EOF) and acknowledged every byte
//     written, the FIN included (SIOCOUTQ is 0); or the kernel closed the
//     connection (both FINs acknowledged, or the client's RST). The end is
//     the close's cause (lifetime, max_lifetime): the client has it all;
//   - nothing is queued and the client has sent nothing for lingerQuiet: a
//     client that keeps its side open and is done. The same cause;
//   - lingerMax after the FIN, whatever is queued or still arrives: a
//     client that never reads, or never stops sending. The end's cause is
//     linger: it may have lost what was queued, or what it sent since;
//   - at max_lifetime + max_lifetime_grace, when that comes first for a
//     drain: the cut at the grace holds. Its cause is max_lifetime_grace
//     while bytes were queued, else max_lifetime (the client has them all).
//
// The end is reported when the socket closes, not at the FIN: until then
// the connection is open, listed and counted. What the client did after the
// FIN (its own FIN, an RST) answers the close, and does not name the end
// (Conn.endClassLocked). Bytes that arrive after the FIN are a request the
// client sent before it saw it: it is discarded rather than served, since
// its answer could no longer be written, and counted in bytes_in.
//
// The linger needs no goroutine or timer of its own: the server's reader,
// blocked in Read, discards (linger), and the connection's timer in the
// registry's schedule polls the send queue every sendQueuePoll while it
// holds bytes (one TCP_INFO read and one ioctl), then waits for the quiet
// time or the bound.

// httpPhase is what the HTTP server last reported about a connection.
type httpPhase uint8

const (
	httpUnseen   httpPhase = iota // no report yet: not (or not yet) served by the HTTP server
	httpIdle                      // StateNew or StateIdle: no request in flight
	httpActive                    // StateActive: a request, or an HTTP/2 stream, in flight
	httpHijacked                  // StateHijacked: upgraded (WebSocket) or taken over by a handler
)

// The protocol a connection speaks, as far as its first bytes tell.
const (
	protoUnsniffed uint32 = iota
	protoHTTP1
	protoHTTP2
	protoTLS      // TLS under tcpops: its ALPN tells, once the handshake is done
	protoTLSHTTP2 // HTTP/2 inside TLS under tcpops (ALPN h2): frames tcpops cannot see or write (h2close.go)
	protoOther    // anything else (a malformed PROXY header): treated as HTTP/2 may be
)

// The linger of a graceful close (above). nginx's lingering_close waits up
// to lingering_timeout (5s) for each read and lingering_time (30s) in all;
// the same figures here, for the same clients: 5s is far longer than a
// client waits between two sends while it still reads, and 30s is the
// default max_lifetime_grace, the time a drain is already allowed. A
// client that keeps the linger going that long is not one to wait for.
// The poll interval bounds how late the close follows the last
// acknowledgement: 100ms, 10 reads of the queue per second of a
// connection that lingers, about 4µs each (BenchmarkSendQueue,
// BENCHMARKS.md).
const (
	lingerQuiet   = 5 * time.Second
	lingerMax     = 30 * time.Second
	sendQueuePoll = 100 * time.Millisecond
)

// CauseLinger is the cause of an HTTP connection closed gracefully whose
// linger reached lingerMax: the client neither took every byte and closed,
// nor went quiet.
const CauseLinger = "linger"

// Go's HTTP/2 server reports StateIdle when the last stream closes, which is
// when its last frame was handed to the server's write buffer, before that
// buffer is flushed to the socket: closed at StateIdle, an h2c client got
// "unexpected EOF" instead of its last response, every time
// (TestDrainMaxLifetimeLetsRequestFinish with no quiet window). Measured
// with Go's server on a loaded 2-core machine, over 1,700 responses of 100B
// to 100KB: a write followed StateIdle in 1,694, by 7µs to 120µs at the
// median and 3.5ms at the most; in the other 6 the buffer had gone out
// before StateIdle, and no write followed. So an idle connection
// that may speak HTTP/2 is closed only once nothing has passed for
// quietWindow since it went idle, and at most quietMax after, whatever a
// chatty client sends (PINGs). HTTP/1.1 writes the whole response before
// StateIdle, and closes at once.
const (
	quietWindow = 100 * time.Millisecond
	quietMax    = 10 * quietWindow
)

// httpState is the HTTP side of a Conn tracked by the listener wrapper of an
// HTTP server.
type httpState struct {
	phase  httpPhase     // under Conn.mu
	idleAt time.Duration // under Conn.mu: when (after start) it last had no request in flight

	proto atomic.Uint32    // protoUnsniffed until the first bytes are read (after a PROXY header)
	proxy proxyhdr.Skipper // only Read, until proto is sniffed: the PROXY header, if any
	// Only Read, until proto is sniffed: the first bytes after any PROXY
	// header, however the reads split them, until they tell (sniffProto).
	sniff     [sniffMax]byte
	sniffN    int
	lingering atomic.Bool // closed gracefully: what is read now is discarded (closeGracefullyLocked)
	peerEOF   atomic.Bool // while lingering, the client closed its side, or the socket failed
	// Under Conn.mu, while lingering: the close's cause, when (after
	// start) its FIN was sent, and when its send queue was last seen
	// holding bytes.
	lingerCause  string
	lingerAt     time.Duration
	lingerBusyAt time.Duration

	// Plaintext HTTP/2 (h2close.go): the frame tracker, while the
	// connection may speak it; the server's writes, serialized with
	// tcpops' own frames; those frames while they wait for a boundary.
	h2      atomic.Pointer[h2frame.Tracker]
	writeMu sync.Mutex
	pending atomic.Pointer[[]byte]
	goaway  atomic.Bool // the GOAWAY was decided (goawayCause set)
	// 1 + how many bytes the socket had taken when the GOAWAY and PING
	// were written, so that they have left its send queue once the client
	// acknowledged that many; 0 until written.
	goawayEnd atomic.Uint64
	// The client acknowledged the PING, and the final GOAWAY was written
	// or made pending (h2FinalGoAway).
	finalSent atomic.Bool
	// Only Read, once the client acknowledged the PING and the tracker
	// withholds the frames of streams above the final GOAWAY's last id
	// (readRefusing): the buffer the client's bytes are read into, with
	// room before them for a frame header held back; what of it the
	// server has yet to read; an error that came with the last bytes.
	inBuf  []byte
	inPend []byte
	inErr  error
	// Under Conn.mu: why and when (after start) the GOAWAY was decided,
	// and when it was first seen to have left the send queue.
	goawayCause  string
	goawayAt     time.Duration
	goawayLeft   bool
	goawayLeftAt time.Duration
}

// httpConn is the connection the listener wrapper of an HTTP server hands
// on: a tracked Conn that also learns from the first bytes read whether the
// client speaks HTTP/1.1 or HTTP/2, and that discards what arrives once it
// is closed gracefully (closeGracefullyLocked).
type httpConn struct {
	*Conn
}

// Read reads from the tracked connection.
func (c httpConn) Read(p []byte) (int, error) {
	h := c.http
	if h.lingering.Load() {
		return c.linger(p)
	}
	if tr := h.h2.Load(); tr != nil && tr.Refusing() {
		return c.readRefusing(tr, p)
	}
	n, err := c.Conn.Read(p)
	if h.lingering.Load() {
		// Bytes that crossed our FIN: a request that will not be
		// served, rather than served with its answer lost; or the end of
		// the client's input, which the linger waits for.
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			c.lingerEOF()
			return 0, io.EOF
		}
		return c.linger(p)
	}
	if n > 0 {
		q := p[:n]
		if h.proto.Load() == protoUnsniffed {
			// Under proxy_protocol (tcpops first in listener_wrappers),
			// the client's first bytes follow a PROXY header: the
			// protocol is told, and HTTP/2's frames followed, from the
			// end of the header on.
			var past bool
			if q, past = h.proxy.Skip(q); past && len(q) > 0 {
				h.sniffMore(q)
			}
		}
		if len(q) > 0 {
			// q is the tail of p[:n] but on a connection's first
			// reads (the PROXY skipper's), which nothing withholds.
			n -= c.h2In(q)
		}
	}
	return n, err
}

// NetConn returns the tracked Conn, so that unwrapping finds it.
func (c httpConn) NetConn() net.Conn { return c.Conn }

// http2Preface is how every HTTP/2 connection without TLS starts (RFC 9113
// section 3.4), up to where it first differs from an HTTP/1.1 request line.
const http2Preface = "PRI * HTTP/2.0"

// sniffMax is how many bytes sniffProto may need: an HTTP/1.x method of
// up to 19 letters, and its space (the longest registered is 17).
const sniffMax = 20

// sniffMore takes the next bytes read after any PROXY header, and sets the
// protocol once the bytes so far tell it. The bytes themselves go on to the
// server as they come: only a copy of the first sniffMax is kept, so a
// client that sends too few and stops holds nothing up; its connection
// stays unsniffed, which closes as one that may speak HTTP/2 (after the
// quiet window, with a FIN: a client that has not sent HTTP/2's whole
// preface has no stream a GOAWAY could save).
func (h *httpState) sniffMore(q []byte) {
	h.sniffN += copy(h.sniff[h.sniffN:], q)
	p := sniffProto(h.sniff[:h.sniffN])
	if p == protoUnsniffed && h.sniffN == len(h.sniff) {
		p = protoOther // cannot happen: sniffProto decides within sniffMax bytes
	}
	if p != protoUnsniffed {
		h.proto.CompareAndSwap(protoUnsniffed, p)
	}
}

// sniffProto tells the protocol from the first bytes read after any PROXY
// header: HTTP/2's preface, a TLS record (0x16, a handshake), an HTTP/1.x
// request line (an upper-case method and a space; not PROXY, which starts
// a PROXY header that httpConn.Read found malformed), or something else;
// protoUnsniffed while b is too short to tell ("P", "PR" and "PRI" may be
// HTTP/2's preface or a method, "GE" a method or not). A client's writes,
// or a relay, can split its first bytes anyhow, down to one per read.
func sniffProto(b []byte) uint32 {
	if len(b) == 0 {
		return protoUnsniffed
	}
	if b[0] == 0x16 {
		return protoTLS
	}
	// "PRI " is HTTP/2: the preface (RFC 9113 section 3.4) starts with the
	// method PRI, registered for that use alone (RFC 7540 section 11.6).
	if n := min(len(b), len(http2Preface)); string(b[:n]) == http2Preface[:n] {
		if n >= 4 {
			return protoHTTP2
		}
		return protoUnsniffed
	}
	if bytes.HasPrefix(b, []byte("PROXY ")) {
		return protoOther
	}
	for i, ch := range b {
		switch {
		case ch == ' ' && i > 0:
			return protoHTTP1
		case ch < 'A' || ch > 'Z' || i >= sniffMax-1:
			return protoOther
		}
	}
	return protoUnsniffed
}

// mayBeHTTP2 reports whether c may speak HTTP/2, for which Go's server
// reports StateIdle before the last bytes of the last response reach the
// socket: only HTTP/1.1, known from its request line or TLS's ALPN, is
// known not to.
func (h *httpState) mayBeHTTP2() bool {
	return h.proto.Load() != protoHTTP1
}

// connState is registered with the HTTP server by the listener wrapper's
// Provision (caddyhttp.Server.RegisterConnState).
func (lw *ListenerWrapper) connState(nc net.Conn, state http.ConnState) {
	c, tc, opaque := httpConnOf(nc)
	if c == nil {
		if opaque != nil && state == http.StateNew {
			lw.warnOpaqueHTTP.Do(func() {
				lw.logger.Warn("tcpops: cannot see through this wrapper to the connection tcpops tracks under it; "+
					"requests on such connections are not tracked: lifetime counts bytes and max_lifetime closes them at once",
					zap.String("wrapper", typeName(opaque)), zap.Stringer("remote", nc.RemoteAddr()))
			})
		}
		return
	}
	c.httpStateChanged(state, tc)
}

// httpConnOf finds the Conn of the httpConn under the connection the HTTP server
// reports on: the one the listener chain returned, with tls, Caddy's own
// wrappers (caddyhttp's http2Listener adds unexported ones, which embed
// net.Conn) or caddy-l4's layer4 wrapper around ours. It also returns the
// *tls.Conn it met, whose ALPN says HTTP/1.1 or HTTP/2, and the wrapper it
// could not see through, if any.
func httpConnOf(nc net.Conn) (c *Conn, tc *tls.Conn, opaque net.Conn) {
	for i := 0; i < 32 && nc != nil; i++ { // bounded, as unwrapConn
		switch v := nc.(type) {
		case httpConn:
			return v.Conn, tc, nil
		case *net.TCPConn, *net.UnixConn, *Conn:
			return nil, nil, nil // not tcpops', or tracked by a tcpops that is not this server's wrapper
		case *tls.Conn:
			if tc == nil {
				tc = v
			}
			nc = v.NetConn()
		case *layer4.Connection:
			nc = v.Conn
		case interface{ Raw() net.Conn }:
			// go-proxyproto's Conn, of Caddy's proxy_protocol wrapper
			// after tcpops: the connection under its PROXY header.
			nc = v.Raw()
		case interface{ NetConn() net.Conn }:
			nc = v.NetConn()
		default:
			next := embeddedConn(v)
			if next == nil {
				return nil, nil, v
			}
			nc = next
		}
	}
	return nil, nil, nil
}

// embeddedConnField caches, per wrapper type, the index of its embedded,
// exported net.Conn field (-1: none).
var embeddedConnField sync.Map // reflect.Type -> int

var netConnType = reflect.TypeFor[net.Conn]()

// embeddedConn returns the net.Conn that c's type embeds, the way most
// wrappers are written (struct{ net.Conn; ... }), or nil. caddyhttp's
// http2Listener wraps a connection that is not a *tls.Conn so (tlsStateConn
// when it has a TLS state, as ours has after tls; http2Conn when the server
// takes only one of HTTP/1 and HTTP/2), and neither has a method that gives
// it back. Only an exported field can be read through reflect; one reached
// through an unexported embedded field cannot, and stops the walk.
func embeddedConn(c net.Conn) net.Conn {
	v := reflect.ValueOf(c)
	idx, ok := embeddedConnField.Load(v.Type())
	if !ok {
		idx = embeddedConnIndex(v.Type())
		embeddedConnField.Store(v.Type(), idx)
	}
	i := idx.(int)
	if i < 0 {
		return nil
	}
	if v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	inner, _ := v.Field(i).Interface().(net.Conn)
	return inner
}

func embeddedConnIndex(t reflect.Type) int {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return -1
	}
	for i := range t.NumField() {
		if f := t.Field(i); f.Anonymous && f.IsExported() && f.Type == netConnType {
			return i
		}
	}
	return -1
}

// httpStateChanged takes the HTTP server's report on c: a request started,
// none is left, or the connection was hijacked; it re-evaluates c's
// deadlines, and closes c if one is due. tc is the TLS connection above c,
// if any.
func (c *Conn) httpStateChanged(state http.ConnState, tc *tls.Conn) {
	h := c.http
	if state == http.StateActive && tc != nil && h.proto.Load() == protoTLS {
		// The handshake is over by the first request: ALPN tells.
		p := protoHTTP1
		if tc.ConnectionState().NegotiatedProtocol == "h2" {
			p = protoTLSHTTP2
		}
		h.proto.Store(p)
	}
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	now := c.since()
	switch state {
	case http.StateNew, http.StateIdle:
		h.phase, h.idleAt = httpIdle, now
		c.lifetimeFrom = now
	case http.StateActive:
		// Nothing runs out while a request is in flight but max_lifetime,
		// whose timer is armed already: a timer armed for the lifetime
		// finds nothing due when it fires, and re-arms.
		h.phase = httpActive
		c.mu.Unlock()
		return
	case http.StateHijacked:
		h.phase = httpHijacked
		c.lifetimeFrom = now // bytes from now on
	default: // StateClosed: the server closes the connection next
		c.mu.Unlock()
		return
	}
	c.settleLocked(now)
}

// linger discards what the peer still sends after a graceful close, until
// it closes its side or the socket is closed (closeGracefullyLocked), and then
// reports the end of the stream. The bytes count as the peer's: its
// bytes_in and its last activity, which the quiet time runs from.
func (c httpConn) linger(p []byte) (int, error) {
	for {
		n, err := c.Conn.Conn.Read(p)
		if n > 0 {
			c.lastActive.Store(int64(time.Since(c.start)))
			c.bytesIn.Add(uint64(n))
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The server's own read deadline (its idle timeout): the
			// linger decides now, and must keep reading, else what
			// arrives stays unread and the close sends an RST.
			_ = c.Conn.Conn.SetReadDeadline(time.Time{})
		default:
			c.lingerEOF()
			return 0, io.EOF
		}
	}
}

// lingers reports whether c is an HTTP connection closed gracefully whose
// socket stays open until the linger ends: its FIN and the client's EOF do
// not end it.
func (c *Conn) lingers() bool {
	return c.http != nil && c.http.lingering.Load()
}

// lingerEOF takes the end of the client's input while c lingers: its FIN,
// or an error that says the socket is dead or closed. The close may be due
// at once.
func (c httpConn) lingerEOF() {
	c.http.peerEOF.Store(true)
	c.mu.Lock()
	if c.ended {
		// Ended otherwise (a DELETE, an RST a write met): the server's
		// Close was left to the linger (httpConn.Close), so close here.
		c.mu.Unlock()
		_ = c.tcp.Close()
		return
	}
	c.settleLocked(c.since())
}

// Close closes the connection, unless it lingers after a graceful close:
// the server closes its side once a write meets the FIN or its read meets
// the client's, and the linger closes the socket when that destroys
// nothing.
func (c httpConn) Close() error {
	if c.http.lingering.Load() && !c.isEnded() {
		return nil
	}
	return c.Conn.Close()
}

// quietLocked returns how long to wait before an idle HTTP connection may be
// closed without cutting its last response; 0 when it may be now. c.mu must
// be held.
func (c *Conn) quietLocked(now time.Duration) time.Duration {
	h := c.http
	if !h.mayBeHTTP2() {
		return 0
	}
	quiet := max(h.idleAt, time.Duration(c.lastActive.Load())) + quietWindow
	return max(0, min(quiet, h.idleAt+quietMax)-now)
}

// closeGracefullyLocked closes c for cause as described above: the write
// side now, the socket when the linger (lingerDueLocked) says. c.mu must
// be held; it is released. It reports whether c's timer was armed.
func (c *Conn) closeGracefullyLocked(cause string, now time.Duration) bool {
	h := c.http
	h.lingerCause, h.lingerAt, h.lingerBusyAt = cause, now, now
	h.lingering.Store(true)
	c.writeShut.Store(true) // the server's writes now fail with EPIPE: ours, not the peer's
	if err := c.tcp.CloseWrite(); err != nil {
		c.mu.Unlock()
		c.closeWith(ReasonTimeout, cause)
		return false
	}
	return c.settleLocked(now)
}

// lingerDueLocked is dueLocked for a connection that lingers after its
// graceful close (above). c.mu must be held.
func (c *Conn) lingerDueLocked(now time.Duration) (d due, wait time.Duration, ok bool) {
	h := c.http
	q, known := sendQueue(c.tcp)
	if known && q.closed {
		return due{cause: h.lingerCause}, 0, true
	}
	empty := !known || q.outq == 0
	if empty && h.peerEOF.Load() {
		return due{cause: h.lingerCause}, 0, true
	}
	if !empty {
		h.lingerBusyAt = now
	}
	end, cause := addSat(h.lingerAt, lingerMax), CauseLinger
	if g := c.graceLocked(); g > 0 && c.draining(now) {
		if cut := addSat(c.maxLifetime, g); cut < end {
			end, cause = cut, CauseMaxLifetimeGrace
			if empty {
				cause = h.lingerCause // the client has every byte: the grace cut nothing
			}
		}
	}
	if now >= end {
		return due{cause: cause}, 0, true
	}
	wait = end - now
	if !empty {
		return due{}, min(wait, sendQueuePoll), true
	}
	quiet := addSat(max(h.lingerBusyAt, time.Duration(c.lastActive.Load())), lingerQuiet)
	if now >= quiet {
		return due{cause: h.lingerCause}, 0, true
	}
	return due{}, min(wait, quiet-now), true
}
