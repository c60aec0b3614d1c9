package tcpops

import (
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

// track applies t's options to the connection c. When c is not tracked yet
// it returns a new Conn, registered and with its timers running, for the
// caller to install in place of c. When c already is tracked (an earlier
// tcpops on the same connection), it updates that Conn and returns nil. It
// also returns nil when c is not a TCP connection or its socket cannot be
// reached: such a connection is served untouched.
func (t *tracker) track(c net.Conn) *Conn {
	existing, tcp, opaque := unwrapConn(c)
	if existing != nil {
		existing.update(t.opts, t.logger)
		return nil
	}
	if tcp == nil {
		t.logUntracked(c, opaque)
		return nil
	}
	conn := &Conn{Conn: c, tcp: tcp, start: time.Now(), tracker: t}
	connections.add(conn)
	t.tracked()
	conn.update(t.opts, t.logger)
	return conn
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

// update applies o on top of the settings in force: socket options at once,
// and the timers re-armed from the last activity. logger is the logger of
// the configuration (or admin request) making the change.
func (c *Conn) update(o *Options, logger *zap.Logger) {
	if c.tcp != nil {
		for _, e := range applySocketOptions(c.tcp, o) {
			logger.Warn("tcpops: setting socket option failed; connection served without it",
				c.logFields(zap.String("option", e.Option), zap.Int("value", e.Value), zap.Error(e.Err))...)
			c.tracker.sockoptFailed(e.Option)
		}
	}
	c.mu.Lock()
	if !c.ended {
		if c.opts == (Options{}) {
			// A connection's first options are o as they are; sharing o's
			// Keepalive is safe: merge copies one before it changes it.
			c.opts = *o
		} else {
			c.opts = c.opts.merge(*o)
		}
		c.armLocked(c.since())
	}
	c.mu.Unlock()
}

func typeName(c net.Conn) string {
	if c == nil {
		return "<nil>"
	}
	return reflectTypeName(c)
}
