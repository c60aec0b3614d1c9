package tcpops

import (
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
	if o.Events != nil && *o.Events && !t.obs.eventsSeen() {
		// Kamailio's closed_event always reaches its event routes; here
		// an event needs an events app that someone watches, and without
		// one "events on" would do nothing, silently (issue 28).
		t.logger.Warn("tcpops: events on, but nothing in this configuration receives tcp_closed, tcp_timeout or tcp_reset: " +
			"add a global events block that subscribes to them (events { on tcp_timeout exec ... }, docs/events.md), " +
			"or, to see each event in the log, a global `events {}` block and the `debug` option")
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
	t.tracked(conn)
	conn.update(t.opts, t.logger)
	return conn, true
}

// logUntracked says once per configuration at warn level, and at debug level
// after that, why a connection is served without tcpops.
func (t *tracker) logUntracked(c net.Conn, opaque net.Conn) {
	if opaque != nil && opaque.LocalAddr() != nil && opaque.LocalAddr().Network() != "tcp" {
		t.logger.Debug("tcpops: not a TCP connection; served untouched",
			zap.String("network", opaque.LocalAddr().Network()),
			zap.String("remote", remoteOf(c)))
		return
	}
	warned := false
	t.warnOpaqueOnce.Do(func() {
		warned = true
		t.logger.Warn("tcpops: cannot reach the TCP socket under this connection's wrapper; such connections are served untouched (put tcpops before throttle or tee in the route)",
			zap.String("wrapper", typeName(opaque)),
			zap.String("remote", remoteOf(c)))
	})
	if !warned {
		t.logger.Debug("tcpops: cannot reach the TCP socket; served untouched",
			zap.String("wrapper", typeName(opaque)),
			zap.String("remote", remoteOf(c)))
	}
}

// remoteOf is c's remote address for a log line about a connection tcpops
// does not track: empty where asking could make Accept wait for the peer
// (addrMayBlock).
func remoteOf(c net.Conn) string {
	if addrMayBlock(c) {
		return ""
	}
	return addrString(c.RemoteAddr())
}

func typeName(c net.Conn) string {
	if c == nil {
		return "<nil>"
	}
	return reflectTypeName(c)
}

func reflectTypeName(v any) string { return fmt.Sprintf("%T", v) }
