package tcpops

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Why a connection ended: Kamailio's three event routes (tcp:closed,
// tcp:timeout, tcp:reset) as Reason, and a finer Cause.
const (
	ReasonClosed  = "closed"
	ReasonTimeout = "timeout"
	ReasonReset   = "reset"

	CauseEOF         = "eof"          // the peer's FIN or an ordinary end of the session
	CauseAdmin       = "admin"        // closed through the admin API
	CauseShutdown    = "shutdown"     // Caddy stopped or reloaded
	CauseLifetime    = "lifetime"     // the inactivity lifetime expired
	CauseMaxLifetime = "max_lifetime" // the maximum lifetime expired
	CauseKeepalive   = "keepalive"    // keepalive probes went unanswered (ETIMEDOUT)
	CauseUserTimeout = "user_timeout" // TCP_USER_TIMEOUT gave up with data in flight (ETIMEDOUT)
	CauseKernel      = "kernel"       // ETIMEDOUT that cannot be told apart
	CauseReset       = "reset"        // ECONNRESET or EPIPE from the peer

	// This side closed a connection that tcpops neither timed out nor
	// closed itself: Kamailio's tcp:closed means the peer closed, so
	// these name who did (docs/events.md).
	CauseUpstream = "upstream" // the proxied session ended from the upstream's side first
	CauseError    = "error"    // a handler after tcpops failed, and caddy-l4 closed the connection
	CauseLocal    = "local"    // caddy-l4 closed it behind tcpops' back: no route matched, or a later route failed
	CauseMatching = "matching" // caddy-l4's matching timeout passed before a route matched (reason timeout)
)

// Conn is a connection tracked by tcpops. It wraps the connection the first
// tcpops saw and records activity and byte counts on the way through, with
// no lock, timer reset or allocation per Read or Write: the lifetime timer
// looks at the last activity when it fires.
//
// Its methods are in this file, but for those of a concern of their own:
// its timers in lifetime.go, what an HTTP server reports about it and
// its drain in httpstate.go, drain.go and drainhandler.go, and its TCP
// statistics in tcpstats.go.
type Conn struct {
	net.Conn

	tcp     *net.TCPConn // the socket under the wrappers; nil when unreachable
	id      uint64
	start   time.Time
	tracker *tracker // the tcpops (handler or listener) that first tracked it

	lastActive   atomic.Int64 // nanoseconds after start of the last byte either way
	bytesIn      atomic.Uint64
	bytesOut     atomic.Uint64
	errEnd       atomic.Pointer[endClass] // the peer's RST or ETIMEDOUT, when it was the first thing the peer did
	eofEnd       atomic.Pointer[endClass] // the peer's FIN, when it was the first thing the peer did (closed/eof, or the drain's)
	pipeErr      atomic.Bool              // a Write met EPIPE not after our own half-close: the peer's RST, unless something says more
	readDone     atomic.Bool              // a Read returned EOF or a final error
	readTimedOut atomic.Bool              // the last Read that returned hit a read deadline (caddy-l4's matching timeout)
	writeShut    atomic.Bool              // CloseWrite was called
	watched      atomic.Bool              // the registry's sweeper looks at it (set and cleared under mu)
	readHook     atomic.Uint32            // what a Read does besides reading: the hook* bits
	statsIdx     atomic.Int32             // 1 + its index in the registry's stats sampler (sampler.go); 0: not sampled
	// 1 + the index of its timer in the registry's deadlines; 0: none
	// (under deadlines.mu). Beside statsIdx, in what would be padding: a
	// Conn fits the 320-byte size class.
	sched int32
	// deadEOF is an EOF read once the kernel had closed the socket: an RST
	// or ETIMEDOUT noted after it overrides it (noteErr).
	deadEOF atomic.Pointer[deadEnd]

	// The registry c is in, and its place in the remote address indexes
	// (registry.byRemote, byAddr) and in the sweeper's list, guarded by the
	// registry's lock. A lookup by IP:port reads remoteKey, remotePort and
	// addrNext of each connection of the chain: they are together, and
	// remotePort and watchIdx share a word with ended (under mu).
	reg                    *registry
	remoteKey              uint64
	remotePrev, remoteNext *Conn  // the IP's chain; the first one's remotePrev is the last
	addrPrev, addrNext     *Conn  // the IP:port's chain
	ended                  bool   // under mu
	remotePort             uint16 // the peer's port, for its byAddr key
	watchIdx               int32  // 1 + its index in the registry's watchedList; 0: not there

	mu   sync.Mutex
	opts Options // the settings in force, merged over every tcpops that ran
	// lifetimeFrom is when (after start) the lifetime in force was set: the
	// lifetime runs from it or from the last activity, whichever is later.
	lifetimeFrom time.Duration
	endedAs      *endClass // why it ended; nil while it lives
	listen       string    // the accepting listener's address, when known (admin API)

	// maxLifetime is this connection's own max_lifetime: opts.MaxLifetime,
	// drawn with opts.MaxLifetimeJitter when either was set (jitter.go).
	// Under mu.
	maxLifetime time.Duration
	// http is the HTTP side of a connection the listener wrapper of an
	// HTTP server tracks (httpstate.go); nil for any other. Set before the
	// connection is registered, then never changed.
	http *httpState
}

// ID returns the connection's process-unique id, Kamailio's conid.
func (c *Conn) ID() uint64 { return c.id }

// Read reads from the wrapped connection and records the activity.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if h := c.readHook.Load(); h != 0 {
		c.readHooked(h)
	}
	if n > 0 {
		c.lastActive.Store(int64(time.Since(c.start)))
		c.bytesIn.Add(uint64(n))
	}
	// caddy-l4 reads through a read deadline while it matches routes, and
	// closes the connection when the deadline passes (routes.go:
	// ErrMatchingTimeout): the end that follows is that timeout's.
	if timedOut := n == 0 && errors.Is(err, os.ErrDeadlineExceeded); timedOut || c.readTimedOut.Load() {
		c.readTimedOut.Store(timedOut)
	}
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		fatal := c.noteErr(err)
		c.readDone.Store(true)
		if fatal || c.writeShut.Load() && !c.lingers() {
			c.end(ReasonClosed, CauseEOF)
		}
	}
	return n, err
}

// Write writes to the wrapped connection and records the activity.
func (c *Conn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.lastActive.Store(int64(time.Since(c.start)))
		c.bytesOut.Add(uint64(n))
	}
	if err != nil && c.noteErr(err) {
		c.end(ReasonClosed, CauseEOF)
	}
	return n, err
}

// CloseWrite half-closes the wrapped connection, as caddy-l4's proxy does
// when one side of a session ends; without it a half-close would be lost.
//
// The proxy half-closes the client last, so once the client's side has also
// been read to its end the session is over and the connection ends here.
func (c *Conn) CloseWrite() error {
	var err error
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		err = cw.CloseWrite()
	} else {
		err = &net.OpError{Op: "close", Net: "tcp", Err: errors.ErrUnsupported}
	}
	if c.http == nil && !c.readDone.Load() && c.errEnd.Load() == nil {
		// The session ended from the other side first (caddy-l4's proxy
		// half-closes the client once every upstream has ended): whatever
		// the peer does next answers this side's close. Not on an HTTP
		// connection: Go's server half-closes one it closes after a
		// response (closeWriteAndWait), the drain's included, and its
		// closes are named as Close finds them (endClassLocked).
		c.eofEnd.CompareAndSwap(nil, endUpstream)
	}
	c.writeShut.Store(true)
	if c.readDone.Load() {
		c.end(ReasonClosed, CauseEOF)
	}
	return err
}

// SetWriteDeadline sets the wrapped connection's write deadline.
//
// A deadline at or before now stops every write to come, and crypto/tls
// sets one for that after its close_notify (tls.Conn.CloseWrite, Close:
// "Any subsequent writes will fail"). That is the TLS half-close of a tls
// handler between tcpops and caddy-l4's proxy, which never reaches
// CloseWrite here: the proxy half-closes the *tls.Conn. Such a session is
// over once its handler returns (Handle), and was ended by the upstream if
// the client had not yet ended its side (writesStopped).
func (c *Conn) SetWriteDeadline(t time.Time) error {
	err := c.Conn.SetWriteDeadline(t)
	c.noteWriteDeadline(t)
	return err
}

// SetDeadline sets the wrapped connection's deadlines, as SetWriteDeadline
// and SetReadDeadline do.
func (c *Conn) SetDeadline(t time.Time) error {
	err := c.Conn.SetDeadline(t)
	c.noteWriteDeadline(t)
	return err
}

// The bits of Conn.readHook: what a Read must do besides reading. Read
// loads the word once, and does more only when a bit is set.
const (
	// hookIndex: c is not yet in the address index, and is indexed at its
	// first Read (registry.add).
	hookIndex uint32 = 1 << iota
	// hookStopped: the write deadline in force has passed
	// (SetWriteDeadline).
	hookStopped
	// hookPeerDone: the peer's side had ended (a Read's EOF or error)
	// when it passed.
	hookPeerDone
	// hookReadAfter: a Read returned after it passed.
	hookReadAfter
)

// readHooked does what the bits h of c.readHook ask of a Read that
// returned.
func (c *Conn) readHooked(h uint32) {
	if h&hookIndex != 0 && c.takeIndexPending() {
		c.reg.indexLate(c)
	}
	if h&hookStopped != 0 && h&hookReadAfter == 0 {
		c.readHook.Or(hookReadAfter)
	}
}

// indexPending reports whether c waits for its first Read to be indexed
// (registry.add).
func (c *Conn) indexPending() bool { return c.readHook.Load()&hookIndex != 0 }

// takeIndexPending clears hookIndex, and reports whether it was this call
// that did: that caller indexes c.
func (c *Conn) takeIndexPending() bool { return c.readHook.And(^hookIndex)&hookIndex != 0 }

// noteWriteDeadline records whether the write deadline t stops every
// write (SetWriteDeadline), and whether the peer's side had ended by then.
// A later deadline in the future, or none, takes that back: a layer above
// that only cut a blocked write short writes on, and the stop says
// nothing of the end. Not on an HTTP connection, whose server sets a
// deadline per response and closes it itself.
func (c *Conn) noteWriteDeadline(t time.Time) {
	if c.http != nil {
		return
	}
	const stopBits = hookStopped | hookPeerDone | hookReadAfter
	if t.IsZero() || t.After(time.Now()) {
		if c.readHook.Load()&stopBits != 0 {
			c.readHook.And(^stopBits)
		}
		return
	}
	if c.readHook.Load()&hookStopped != 0 {
		return // already stopped: the first stop is the one that counts
	}
	bits := hookStopped
	if c.readDone.Load() || c.errEnd.Load() != nil {
		bits |= hookPeerDone
	}
	c.readHook.Or(bits)
}

// writesStopped reports whether the write deadline in force has passed
// (SetWriteDeadline). A handler that returns so has ended its session.
// Who ended it first is told by the Reads: when a Read returned after the
// stop, the session was still reading the client when this side stopped,
// and the upstream's end came first; that is recorded here, for the end
// that follows (Handle), as CloseWrite does for a plain half-close. When
// none did, the client's side had ended first: through tls, its
// close_notify, at which tls.Conn stops reading (TLS 1.3 hides it in an
// encrypted record, and the client's FIN may come after this side's
// stop).
func (c *Conn) writesStopped() bool {
	h := c.readHook.Load()
	if h&hookStopped == 0 {
		return false
	}
	if h&(hookPeerDone|hookReadAfter) == hookReadAfter && c.errEnd.Load() == nil {
		c.eofEnd.CompareAndSwap(nil, endUpstream)
	}
	return true
}

// Close closes the wrapped connection and ends tracking. This is the path
// by which listener-wrapper and HTTP connections end.
//
// Why it ended is decided before the socket closes: closing wakes a Read
// blocked in another goroutine, whose error must not pass for the peer's.
func (c *Conn) Close() error {
	e, ok := c.finish(ReasonClosed, CauseEOF)
	err := c.Conn.Close()
	if ok {
		c.tracker.ended(c, &e)
	}
	return err
}

// NetConn returns the wrapped connection.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// noteErr remembers what a read or write error says about the end, for
// its reason: the peer's FIN (EOF), RST (ECONNRESET) or silence (ETIMEDOUT),
// whichever came first, as docs/events.md's precedence says. It must be
// caught where it happens, in the Read or Write that returned it: the read
// consumes SO_ERROR, and TCP_INFO, which tells a keepalive timeout from a
// user timeout, is gone with the socket. It reports whether the error means
// the connection is dead (RST, ETIMEDOUT): the end is reported at once, not
// when whoever owns the socket gets round to closing it (caddy-l4's proxy
// may wait for the upstream side for as long as it stays open).
//
// EPIPE only says that the socket can no longer send, and comes second:
// the error that closed it (ECONNRESET, ETIMEDOUT) was returned to the
// first caller, often a concurrent Read, and the kernel answers a peer's
// RST after its FIN (CLOSE_WAIT) with EPIPE (tcp_reset). So it is kept
// apart, and names the end only when nothing else does.
func (c *Conn) noteErr(err error) (fatal bool) {
	switch {
	case errors.Is(err, io.EOF):
		// Once, and not after an error: a server may read EOF again, and
		// each would cost a TCP_INFO read here.
		if c.errEnd.Load() == nil && c.eofEnd.Load() == nil && c.deadEOF.Load() == nil {
			end := endEOF
			if e := c.drainEnd(); e != nil {
				end = e // the client closing a connection that drains answers our drain
			}
			if !c.writeShut.Load() && c.tcp != nil && socketClosedByKernel(c.tcp) {
				// Not necessarily the peer's FIN: the kernel closed the
				// connection (TCP state CLOSE) before we half-closed it.
				// After an RST or an abort (ETIMEDOUT) the error goes to
				// one caller only (sock_error clears sk_err), and a Read
				// after it gets EOF (tcp_recvmsg: RCV_SHUTDOWN, which
				// tcp_done set). A concurrent Write that took the error
				// notes it next, and it names the end; without one, the
				// EOF does. Measured under load (two CPU burners, -race):
				// the EOF was noted first in 2 of 20 zero-window aborts.
				c.mu.Lock()
				c.deadEOF.CompareAndSwap(nil, &deadEnd{eof: end, abort: c.timeoutClassLocked()})
				c.mu.Unlock()
			} else {
				c.eofEnd.CompareAndSwap(nil, end)
			}
		}
		return false
	case errors.Is(err, net.ErrClosed), errors.Is(err, os.ErrDeadlineExceeded):
		return false
	case errors.Is(err, syscall.EPIPE):
		if !c.writeShut.Load() { // else our own half-close, not the peer
			c.pipeErr.Store(true)
		}
		return false
	case errors.Is(err, syscall.ECONNRESET):
		if c.eofEnd.Load() == nil {
			c.errEnd.CompareAndSwap(nil, endReset)
		}
		return true
	case errors.Is(err, syscall.ETIMEDOUT):
		c.noteAbort()
		return true
	case isICMPSoftError(err):
		// When the kernel gives up (retransmissions, TCP_USER_TIMEOUT,
		// keepalive) it reports the last ICMP error that reached the
		// socket, and ETIMEDOUT only when there was none (tcp_write_err:
		// sk_err = sk_err_soft ? : ETIMEDOUT): a dead phone behind a
		// router that answers for it is such an abort. Without IP_RECVERR
		// (Go does not set it) an established socket only records these
		// errors (tcp_v4_err: sk_err_soft), so one returned by a read or
		// a write is the abort's, once the kernel has closed the socket.
		// The EOF of a closed socket (deadEOF) says so too: the server
		// may have closed the socket on that EOF before this error, taken
		// by a concurrent Write, is noted here (TestFaultTable's
		// icmp_host_unreachable/user_timeout ended closed/eof 1 run in
		// about 10 under load).
		if c.tcp == nil || c.deadEOF.Load() == nil && !socketClosedByKernel(c.tcp) {
			return false
		}
		c.noteAbort()
		return true
	}
	return false
}

// noteAbort notes the kernel's abort of the connection (ETIMEDOUT, or the
// ICMP error it reported in its place), classified from TCP_INFO.
// Classified under c.mu, which finish takes before it looks: an end racing
// this one (a concurrent Write's EPIPE that makes the proxy close) waits for
// the class instead of missing it.
func (c *Conn) noteAbort() {
	c.mu.Lock()
	if c.eofEnd.Load() == nil && c.errEnd.Load() == nil {
		c.errEnd.Store(c.timeoutClassLocked())
	}
	c.mu.Unlock()
}

// isICMPSoftError reports whether err is one of the errors an ICMP
// destination unreachable leaves on an established TCP socket
// (icmp_err_convert): net (ENETUNREACH), host (EHOSTUNREACH, also for
// "administratively prohibited"), port (ECONNREFUSED), protocol
// (ENOPROTOOPT) unreachable, host unknown (EHOSTDOWN), host isolated
// (ENONET).
func isICMPSoftError(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return false
	}
	for _, e := range icmpSoftErrors {
		if errno == e {
			return true
		}
	}
	return false
}

// timeoutClassLocked tells why the kernel gave up with ETIMEDOUT, from
// TCP_INFO read at once (the socket is still open; the kernel has purged
// its write queue and reset its backoff, tcp_write_queue_purge, but keeps
// the counters below). c.mu must be held.
//
//   - Unacknowledged data was retransmitted: TCP_USER_TIMEOUT cut it short
//     when set (it replaces tcp_retries2, tcp_retransmit_timer), else
//     tcp_retries2 ran out: the kernel's.
//   - Data waited unsent (tcpi_notsent_bytes, which the purge leaves: it
//     is write_seq - snd_nxt) with nothing in flight: the peer's window was
//     zero, and the kernel was probing it (tcp_probe_timer). It probes a
//     peer that answers for ever (RFC 1122 4.2.2.17) unless
//     TCP_USER_TIMEOUT is set: a peer whose stack works but whose
//     application stopped reading (a suspended phone app), user_timeout;
//     without one, unanswered probes ran out (tcp_retries2), the kernel's.
//     TCP_INFO shows no retransmission then, and no probe when the peer
//     answered (every ACK resets the count). Keepalive cannot be the cause:
//     its timer sends nothing, and aborts nothing, while the write queue
//     holds data (tcp_keepalive_timer). The time since the peer's last ACK
//     cannot tell either: the abort comes the user timeout after the first
//     window probe, which is answered at once, so with an RTO of half the
//     user timeout or more that ACK is the last one, and about the user
//     timeout old at the abort (on loopback, RTO 208ms and user timeout 2s,
//     it was 0.7s old, with three probes answered).
//   - Keepalive probes went unanswered (whether TCP_KEEPCNT ran out or
//     TCP_USER_TIMEOUT cut the probing short).
//
// Anything else, and platforms without TCP_INFO, is the kernel's own.
func (c *Conn) timeoutClassLocked() *endClass {
	if c.tcp == nil {
		return endKernel
	}
	st, _ := readSocketState(c.tcp)
	ti := st.TCPInfo
	ut := c.opts.UserTimeout.Duration()
	switch {
	case ti == nil && c.deadEOF.Load() != nil:
		return c.deadEOF.Load().abort // the socket closed since its EOF; TCP_INFO was read then
	case ti == nil:
		return endKernel
	case ti.Retransmits > 0 || ti.Unacked > 0 || ti.notsentBytes > 0:
		if ut > 0 {
			return endUserTimeout
		}
		return endKernel // tcp_retries2 ran out
	case ti.Probes > 0:
		return endKeepalive
	}
	return endKernel
}

// deadEnd is what an EOF read from a socket the kernel had closed
// tells (Conn.deadEOF): the end it names if no error comes after it (the
// peer's FIN, or the drain's end), and how TCP_INFO classed an abort then
// (timeoutClassLocked): the abort's error may reach its caller only after
// the server, seeing the EOF, has closed the socket, and TCP_INFO with it.
// Allocated once, on that rare path, so that a Conn holds one pointer.
type deadEnd struct{ eof, abort *endClass }

// endClass is a reason and cause, for the classifications a read or write
// error makes and for a Conn's end; the values are shared and never change.
type endClass struct{ reason, cause string }

// endClassOf returns the shared endClass of reason and cause: one of
// endCauses (metrics.go), which are all the ends tcpops makes, so that a
// Conn records its end in one pointer.
func endClassOf(reason, cause string) *endClass {
	for i := range endCauses {
		if ec := &endCauses[i]; ec.reason == reason && ec.cause == cause {
			return ec
		}
	}
	return &endClass{reason, cause}
}

var (
	endEOF         = endClassOf(ReasonClosed, CauseEOF)
	endReset       = &endClass{ReasonReset, CauseReset}
	endKeepalive   = &endClass{ReasonTimeout, CauseKeepalive}
	endUserTimeout = &endClass{ReasonTimeout, CauseUserTimeout}
	endKernel      = &endClass{ReasonTimeout, CauseKernel}
	endUpstream    = &endClass{ReasonClosed, CauseUpstream}
	endMatching    = &endClass{ReasonTimeout, CauseMatching}
)

// endClassLocked applies docs/events.md's precedence to an end that reason
// and cause would name, and returns the end's class:
//
//  1. the first thing the peer did, its FIN (EOF read), RST or silence
//     (ETIMEDOUT), wins over anything that came later, ours or the
//     kernel's: a timer, a DELETE, Caddy stopping, a later EPIPE;
//  2. else a timer, a DELETE or a stop names the end (reason and cause);
//  3. else, for an ordinary close (closed/eof) or one behind tcpops' back
//     (closed/local): a write's EPIPE (the peer's RST that nothing else
//     reported), Caddy's shutdown when the connection is closed under us
//     (not after its peer's FIN) while its configuration stops, an HTTP
//     connection's drain, caddy-l4's matching timeout, or the close as
//     named.
//
// This side's own first move, the proxy half-closing the client once the
// upstream ended (CloseWrite), takes the first rule's place: it is
// recorded where the peer's FIN would be.
//
// c.mu must be held.
func (c *Conn) endClassLocked(reason, cause string) *endClass {
	if h := c.http; h != nil && h.lingerCause != "" {
		// Closed gracefully, lingering (httpstate.go): our FIN came
		// first, and the client's FIN or RST since answers it; the
		// linger's bound, the grace, a DELETE or a stop cut it short, and
		// name the end themselves.
		if reason == ReasonClosed && cause == CauseEOF {
			return endClassOf(ReasonTimeout, h.lingerCause)
		}
		return endClassOf(reason, cause)
	}
	if e := c.errEnd.Load(); e != nil {
		return e
	}
	if e := c.eofEnd.Load(); e != nil {
		return e
	}
	if e := c.deadEOF.Load(); e != nil {
		return e.eof // the FIN of a connection the kernel closed since, or the read's EOF of an abort whose error went to nobody
	}
	if reason != ReasonClosed || cause != CauseEOF && cause != CauseLocal {
		return endClassOf(reason, cause)
	}
	switch {
	case c.pipeErr.Load():
		return endReset
	case !c.readDone.Load() && c.tracker.stopping():
		return endClassOf(ReasonClosed, CauseShutdown)
	case c.http != nil && c.draining(c.since()):
		return endMaxLifetime
	case cause == CauseLocal && c.readTimedOut.Load():
		// caddy-l4 closed it after its matching timeout: the last read
		// ran into the deadline, and nothing was read since.
		return endMatching
	}
	return endClassOf(reason, cause)
}

// end stops tracking the connection and reports why it ended (log, metrics,
// and the event if the connection has events on). Only the first call
// counts; reason and cause are its, unless it is an ordinary close
// (closed/eof) and endCause knows better.
func (c *Conn) end(reason, cause string) bool {
	e, ok := c.finish(reason, cause)
	if ok {
		c.tracker.ended(c, &e)
	}
	return ok
}

// finish does the bookkeeping part of end: it marks c ended, stops its timer
// and takes it out of the registry, and returns what the report needs.
func (c *Conn) finish(reason, cause string) (connEnd, bool) {
	c.mu.Lock()
	return c.finishLocked(reason, cause)
}

// finishLocked is finish with c.mu held, by a caller that decided the end
// under it: the end is marked before c.mu is released, so that no change
// (a PATCH, an HTTP request starting) lands between the decision and the
// end. It releases c.mu.
func (c *Conn) finishLocked(reason, cause string) (connEnd, bool) {
	if c.ended {
		c.mu.Unlock()
		return connEnd{}, false
	}
	c.ended = true
	c.endedAs = c.endClassLocked(reason, cause)
	reason, cause = c.endedAs.reason, c.endedAs.cause
	c.deadlines().unschedule(c)
	events := c.opts.Events != nil && *c.opts.Events
	watched := c.watched.Swap(false)
	c.mu.Unlock()
	c.unregister(watched)
	return c.snapshotEnd(reason, cause, events), true
}

// closeWith ends the connection for the given reason and closes its socket,
// which wakes whoever is reading it (caddy-l4's proxy, an HTTP server). The
// socket is closed before the end is reported. It reports whether it ended
// the connection: false when the connection had already ended otherwise.
func (c *Conn) closeWith(reason, cause string) bool {
	c.mu.Lock()
	return c.closeWithLocked(reason, cause)
}

// closeWithLocked is closeWith with c.mu held (finishLocked); it releases
// c.mu.
func (c *Conn) closeWithLocked(reason, cause string) bool {
	e, ok := c.finishLocked(reason, cause)
	if !ok {
		return false
	}
	if c.tcp != nil {
		_ = c.tcp.Close()
	} else {
		_ = c.Conn.Close()
	}
	c.tracker.ended(c, &e)
	return true
}

// socketClosed reports whether the socket has been closed by whoever owns
// it; it makes no system call.
func (c *Conn) socketClosed() bool {
	if c.tcp == nil {
		return false // a simulated connection (scale_test.go): no socket to close
	}
	rc, err := c.tcp.SyscallConn()
	if err != nil {
		return true
	}
	return rc.Control(func(uintptr) {}) != nil
}

// since returns the time since the connection was first tracked.
func (c *Conn) since() time.Duration { return time.Since(c.start) }

// logFields are the fields every log line about c carries; the addresses
// are empty while they are not known (addrs).
func (c *Conn) logFields(extra ...zap.Field) []zap.Field {
	remote, local := c.addrs()
	return append([]zap.Field{
		zap.Uint64("conid", c.id),
		zap.String("remote", addrString(remote)),
		zap.String("local", addrString(local)),
	}, extra...)
}

// addrs returns c's remote and local addresses, both nil while asking could
// make the caller wait for the peer. Behind Caddy's proxy_protocol listener
// wrapper, go-proxyproto reads the PROXY header on the first RemoteAddr,
// LocalAddr or Read, and every other caller waits for it, up to the
// wrapper's timeout: until c's first Read returns (indexPending; see
// registry.add) an admin listing, a match by local address, a log line or
// the report of an end must not stall behind a client that has sent
// nothing. That holds after the end too: a graceful close shuts the write
// side only, and the socket stays open, with the header read waiting on
// it, until the linger closes it (lingerTimeout); the end of a client that
// never sent its header is reported without its addresses, at once.
func (c *Conn) addrs() (remote, local net.Addr) {
	if c.indexPending() {
		return nil, nil
	}
	return c.RemoteAddr(), c.LocalAddr()
}

// addrString is a as logs, events and the admin API show it: "" for none
// (a connection behind proxy_protocol whose header never came).
func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// update applies o on top of the settings in force, as a later tcpops on
// the connection does: socket options at once, and the timers re-armed. A
// lifetime o sets runs from now, or from the last activity if that is
// later: Kamailio's tcp_set_connection_lifetime sets timeout = now +
// lifetime, so an idle connection gets the whole new lifetime from the
// change. logger is the logger of the configuration making the change.
func (c *Conn) update(o *Options, logger *zap.Logger) {
	_ = c.change(o, logger, false)
}

// errMaxLifetimePassed is returned by change when the max_lifetime it would
// set is already behind the connection.
type errMaxLifetimePassed struct {
	id               uint64
	maxLifetime, age time.Duration
	jitter           float64 // max_lifetime_jitter in force, percent
}

func (e errMaxLifetimePassed) Error() string {
	if e.jitter > 0 {
		lo, hi := jitterRange(e.maxLifetime, e.jitter)
		return fmt.Sprintf("tcpops: max_lifetime %v with max_lifetime_jitter %v: connection %d is already %v old, and its max_lifetime would be drawn from [%v, %v], "+
			"so it could close at once; nothing was changed (lower max_lifetime_jitter, or to close it now, DELETE it)",
			e.maxLifetime, Percent(e.jitter), e.id, e.age.Round(time.Millisecond), lo, hi)
	}
	return fmt.Sprintf("tcpops: max_lifetime %v: connection %d is already %v old, so it would close at once; nothing was changed (to close it now, DELETE it)",
		e.maxLifetime, e.id, e.age.Round(time.Millisecond))
}

// errChangeConflict is returned by change for a change the connection's
// state does not allow (the admin API answers 409); it says why.
type errChangeConflict struct{ msg string }

func (e errChangeConflict) Error() string { return e.msg }

// change is update for the admin API: when strict, a max_lifetime that the
// connection has already outlived is refused with errMaxLifetimePassed and
// nothing is applied, since a change must not close the connection within
// the request that made it. It returns errConnEnded when c has ended.
func (c *Conn) change(o *Options, logger *zap.Logger, strict bool) error {
	var errs []sockoptError
	c.mu.Lock()
	if c.ended || c.lingers() {
		// A connection closed gracefully is decided: its FIN is out, and
		// no option can take it back; the PATCH is told its cause
		// (endedWith), not answered with options it will never have.
		c.mu.Unlock()
		return errConnEnded
	}
	now := c.since()
	next, maxLifetime, err := c.plannedLocked(o, now, strict)
	if err != nil {
		c.mu.Unlock()
		return err
	}
	// The socket options are set under c.mu so that two changes racing
	// each other leave the socket as the options in force say.
	if c.tcp != nil {
		errs = applySocketOptions(c.tcp, o)
	}
	c.opts = next
	c.maxLifetime = maxLifetime
	if o.Lifetime.Duration() > 0 {
		c.lifetimeFrom = now
	}
	c.armLocked(now)
	c.setStatsPeriodLocked()
	c.mu.Unlock()
	for _, e := range errs {
		logger.Warn("tcpops: setting socket option failed; connection served without it",
			c.logFields(zap.String("option", e.Option), zap.Int("value", e.Value), zap.Error(e.Err))...)
		c.tracker.sockoptFailed(e.Option)
	}
	return nil
}

// plannedLocked returns the options and the max_lifetime c would have after
// o is applied at now, and when strict the error for a change the admin API
// refuses. c.mu must be held.
func (c *Conn) plannedLocked(o *Options, now time.Duration, strict bool) (next Options, maxLifetime time.Duration, err error) {
	next = *o
	if c.opts != (Options{}) {
		next = c.opts.merge(*o)
	} // else: a connection's first options are o as they are; sharing o's
	// Keepalive is safe: merge copies one before it changes it.
	// A change of max_lifetime or of its jitter draws the connection's own
	// max_lifetime again; other changes keep the one drawn.
	redraw := o.MaxLifetime.IsSet() || o.MaxLifetimeJitter != nil
	maxLifetime = c.maxLifetime
	if redraw {
		maxLifetime = drawMaxLifetime(next.MaxLifetime.Duration(), next.jitterPercent())
	}
	if strict {
		err = c.checkChangeLocked(&next, now, redraw)
		if err == nil {
			err = c.checkGraceLocked(o, now, maxLifetime)
		}
	}
	return next, maxLifetime, err
}

// checkChange returns the error change would refuse o with now, without
// changing anything; nil when c has ended (change will say so).
func (c *Conn) checkChange(o *Options) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return nil
	}
	_, _, err := c.plannedLocked(o, c.since(), true)
	return err
}

// errConnEnded is returned by change for a connection that has ended.
var errConnEnded = errors.New("tcpops: connection ended")

// snapshotEnd records c's figures at its end.
func (c *Conn) snapshotEnd(reason, cause string, events bool) connEnd {
	now := c.since()
	return connEnd{
		reason:   reason,
		cause:    cause,
		events:   events,
		duration: now,
		idle:     max(0, now-time.Duration(c.lastActive.Load())),
		bytesIn:  c.bytesIn.Load(),
		bytesOut: c.bytesOut.Load(),
		tcp:      c.takeTCPAtEnd(),
	}
}

// setListen records the address of the listener that accepted c, for the
// admin API, when the module tracking c knows it.
func (c *Conn) setListen(addr net.Addr) {
	if addr == nil {
		return
	}
	s := addr.String()
	c.mu.Lock()
	c.listen = s
	c.mu.Unlock()
}

// isEnded reports whether the connection has ended.
func (c *Conn) isEnded() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ended
}

// endedWith returns the reason and cause of the connection's end; empty
// while it lives.
func (c *Conn) endedWith() (reason, cause string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.endedAs == nil {
		if c.lingers() {
			// Closed gracefully, its end reported when the linger closes
			// the socket (closeGracefullyLocked).
			return ReasonTimeout, c.http.lingerCause
		}
		return "", ""
	}
	return c.endedAs.reason, c.endedAs.cause
}

// unregister takes c out of the registry it was added to, if any.
func (c *Conn) unregister(watched bool) {
	if c.reg == nil {
		return
	}
	c.reg.remove(c)
	if watched {
		c.reg.unwatched()
	}
}

// checkChangeLocked refuses, for the admin API, a change that would close
// the connection within the request that made it: a max_lifetime (drawn
// with its jitter from a range whose low end) the connection has already
// outlived. next is the options the change would leave in force. c.mu must
// be held.
func (c *Conn) checkChangeLocked(next *Options, now time.Duration, redraw bool) error {
	if ml := next.MaxLifetime.Duration(); redraw && ml > 0 {
		if lo, _ := jitterRange(ml, next.jitterPercent()); lo <= now {
			return errMaxLifetimePassed{c.id, ml, now, next.jitterPercent()}
		}
	}
	return nil
}
