package tcpops

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// tracker is the implementation the layer4 handler and the listener wrapper
// share: it applies one configuration's Options to connections and tracks
// them until they end.
type tracker struct {
	opts   *Options
	logger *zap.Logger
	obs    observer // events, metrics and the stop/reload state (events.go)
	// http is set for the listener wrapper of an HTTP server, which
	// reports on the connections it serves (httpstate.go).
	http bool

	warnOpaqueOnce sync.Once
}

// provision validates o and readies t to apply it.
func (t *tracker) provision(ctx caddy.Context, mod caddy.Module, o *Options) error {
	t.logger = ctx.Logger(mod)
	if err := o.Validate(); err != nil {
		return err
	}
	if err := t.obs.provision(ctx, mod); err != nil {
		return err
	}
	if o.UserTimeout.IsSet() && !userTimeoutSupported {
		t.logger.Warn("tcpops: user_timeout is only supported on Linux; it is ignored on this platform",
			zap.Stringer("user_timeout", o.UserTimeout))
	}
	t.opts = o
	return nil
}

// track applies t's options to the connection c and returns the tracked
// Conn, with isNew reporting whether this call started tracking it. When c
// is not tracked yet, the new Conn is registered with its timers running,
// for the caller to install in place of c. When c already is tracked (an
// earlier tcpops on the same connection), that Conn is updated and
// returned. It returns nil when c is not a TCP connection or its socket
// cannot be reached: such a connection is served untouched.
func (t *tracker) track(c net.Conn) (conn *Conn, isNew bool) {
	existing, tcp, opaque := unwrapConn(c)
	if existing != nil {
		existing.update(t.opts, t.logger)
		return existing, false
	}
	if tcp == nil {
		t.logUntracked(c, opaque)
		return nil, false
	}
	conn = &Conn{Conn: c, tcp: tcp, start: time.Now(), tracker: t}
	if t.http {
		conn.http = new(httpState)
	}
	connections.add(conn)
	t.tracked()
	conn.update(t.opts, t.logger)
	return conn, true
}

// logUntracked says once per configuration at warn level, and at debug level
// after that, why a connection is served without tcpops.
func (t *tracker) logUntracked(c net.Conn, opaque net.Conn) {
	if opaque != nil && opaque.LocalAddr() != nil && opaque.LocalAddr().Network() != "tcp" {
		t.logger.Debug("tcpops: not a TCP connection; served untouched",
			zap.String("network", opaque.LocalAddr().Network()),
			zap.Stringer("remote", c.RemoteAddr()))
		return
	}
	warned := false
	t.warnOpaqueOnce.Do(func() {
		warned = true
		t.logger.Warn("tcpops: cannot reach the TCP socket under this connection's wrapper; such connections are served untouched (put tcpops before throttle or tee in the route)",
			zap.String("wrapper", typeName(opaque)),
			zap.Stringer("remote", c.RemoteAddr()))
	})
	if !warned {
		t.logger.Debug("tcpops: cannot reach the TCP socket; served untouched",
			zap.String("wrapper", typeName(opaque)),
			zap.Stringer("remote", c.RemoteAddr()))
	}
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
	if c.ended {
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
	c.mu.Unlock()
	for _, e := range errs {
		logger.Warn("tcpops: setting socket option failed; connection served without it",
			c.logFields(zap.String("option", e.Option), zap.Int("value", e.Value), zap.Error(e.Err))...)
		c.tracker.sockoptFailed(e.Option)
	}
	return nil
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

func typeName(c net.Conn) string {
	if c == nil {
		return "<nil>"
	}
	return reflectTypeName(c)
}
