package tcpops

import (
	"errors"
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
)

// Conn is a connection tracked by tcpops. It wraps the connection the first
// tcpops saw and records activity and byte counts on the way through, with
// no lock, timer reset or allocation per Read or Write: the lifetime timer
// looks at the last activity when it fires.
type Conn struct {
	net.Conn

	tcp     *net.TCPConn // the socket under the wrappers; nil when unreachable
	id      uint64
	start   time.Time
	tracker *tracker // the tcpops (handler or listener) that first tracked it

	lastActive atomic.Int64 // nanoseconds after start of the last byte either way
	bytesIn    atomic.Uint64
	bytesOut   atomic.Uint64
	errEnd     atomic.Pointer[endClass] // what the first telling read/write error says about the end
	readDone   atomic.Bool              // a Read returned EOF or a final error
	writeShut  atomic.Bool              // CloseWrite was called
	watched    atomic.Bool              // the registry's sweeper looks at it (set and cleared under mu)

	// The registry c is in, and its place in the remote address index
	// (registry.byRemote), guarded by the registry's lock.
	reg                    *registry
	remoteKey              uint64
	remotePrev, remoteNext *Conn

	mu   sync.Mutex
	opts Options // the settings in force, merged over every tcpops that ran
	// lifetimeFrom is when (after start) the lifetime in force was set: the
	// lifetime runs from it or from the last activity, whichever is later.
	lifetimeFrom time.Duration
	sched        int // 1 + the index of its timer in the registry's deadlines; 0: none (under deadlines.mu)
	ended        bool
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
	if n > 0 {
		c.lastActive.Store(int64(time.Since(c.start)))
		c.bytesIn.Add(uint64(n))
	}
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		c.noteErr(err)
		c.readDone.Store(true)
		if c.writeShut.Load() {
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
	if err != nil {
		c.noteErr(err)
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
	c.writeShut.Store(true)
	if c.readDone.Load() {
		c.end(ReasonClosed, CauseEOF)
	}
	return err
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

// noteErr remembers the first error that says why the connection died, for
// the end's reason. It must be caught where it happens, in the Read or Write
// that returned it: the read consumes SO_ERROR, and TCP_INFO, which tells a
// keepalive timeout from a user timeout, is gone with the socket.
func (c *Conn) noteErr(err error) {
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
		return
	}
	var class *endClass
	switch {
	case errors.Is(err, syscall.ETIMEDOUT):
		class = c.timeoutClass()
	case errors.Is(err, syscall.ECONNRESET):
		class = endReset
	case errors.Is(err, syscall.EPIPE):
		if c.writeShut.Load() {
			return // our own half-close, not the peer
		}
		class = endReset
	default:
		return
	}
	c.errEnd.CompareAndSwap(nil, class)
}

// timeoutClass tells why the kernel gave up with ETIMEDOUT, from TCP_INFO
// read at once (the socket is still open): unanswered keepalive probes
// (whether TCP_KEEPCNT ran out or TCP_USER_TIMEOUT cut the probing short),
// or retransmissions of unacknowledged data that TCP_USER_TIMEOUT ended.
// Anything else, and platforms without TCP_INFO, is the kernel's own
// timeout.
func (c *Conn) timeoutClass() *endClass {
	if c.tcp == nil {
		return endKernel
	}
	st, _ := readSocketState(c.tcp)
	ti := st.TCPInfo
	switch {
	case ti == nil:
		return endKernel
	case ti.Retransmits > 0:
		c.mu.Lock()
		ut := c.opts.UserTimeout.Duration()
		c.mu.Unlock()
		if ut > 0 {
			return endUserTimeout
		}
		return endKernel // tcp_retries2 ran out
	case ti.Probes > 0:
		return endKeepalive
	}
	return endKernel
}

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
	endReset       = &endClass{ReasonReset, CauseReset}
	endKeepalive   = &endClass{ReasonTimeout, CauseKeepalive}
	endUserTimeout = &endClass{ReasonTimeout, CauseUserTimeout}
	endKernel      = &endClass{ReasonTimeout, CauseKernel}
)

// endCause classifies an end that was not decided by tcpops itself: from
// the error a read or write met on the way, else as Caddy's shutdown when
// the connection is closed under us (not after its peer's FIN) while its
// configuration is stopping, else as an ordinary end.
func (c *Conn) endCause() (reason, cause string) {
	if e := c.errEnd.Load(); e != nil {
		return e.reason, e.cause
	}
	if !c.readDone.Load() && c.tracker.stopping() {
		return ReasonClosed, CauseShutdown
	}
	if e := c.drainEnd(); e != nil { // drain.go
		return e.reason, e.cause
	}
	return ReasonClosed, CauseEOF
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
	if reason == ReasonClosed && cause == CauseEOF {
		reason, cause = c.endCause()
	}
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return connEnd{}, false
	}
	c.ended = true
	c.endedAs = endClassOf(reason, cause)
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
	e, ok := c.finish(reason, cause)
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

// logFields are the fields every log line about c carries.
func (c *Conn) logFields(extra ...zap.Field) []zap.Field {
	return append([]zap.Field{
		zap.Uint64("conid", c.id),
		zap.Stringer("remote", c.RemoteAddr()),
		zap.Stringer("local", c.LocalAddr()),
	}, extra...)
}
