package tcpops

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// The Caddy events a tracked connection's end emits, one per Kamailio event
// route (tcp:closed, tcp:timeout, tcp:reset), when the connection has events
// switched on (Options.Events).
const (
	EventClosed  = "tcp_closed"
	EventTimeout = "tcp_timeout"
	EventReset   = "tcp_reset"
)

// eventName returns the event for an end's reason.
func eventName(reason string) string {
	switch reason {
	case ReasonTimeout:
		return EventTimeout
	case ReasonReset:
		return EventReset
	}
	return EventClosed
}

// How ends, reloads and stops are reported.
//
// Every end is logged and counted; it is emitted as an event only when the
// connection has events on, so that a connection nobody watches costs no
// allocation for them.
//
// A tracked connection may outlive the configuration that tracked it:
// caddy-l4 keeps proxied sessions running across a reload, and the Conn
// keeps its tracker. Once that configuration is unloaded its tracker is
// retired: its timers and options stay in force, and its ends are reported
// to the configuration now running (its events app, its metrics registry,
// its logs), since the old ones are no longer served or watched.
//
// When Caddy stops (no configuration follows), Cleanup closes every
// connection still tracked, as Kamailio does at shutdown, with reason
// closed and cause shutdown; connections an HTTP server closes while its
// configuration stops (idle ones at once, busy ones after the grace period)
// are classified shutdown too. A reload closes nothing.

// observer is the part of a tracker that reports: the events app and the
// metrics of the configuration that provisioned it, and whether that
// configuration is stopping or gone.
type observer struct {
	mod      caddy.Module
	ctx      caddy.Context // the provisioning context, never canceled: see provision
	events   *caddyevents.App
	metrics  *metrics
	registry *prometheus.Registry // the configuration's, to tell a stop from a reload
	servers  []namedListen        // the servers of the app that provisioned the module
	server   atomic.Pointer[string]

	isStopping atomic.Bool // between the configuration's "stopping" event and its Cleanup
	retired    atomic.Bool // the configuration was unloaded while connections lived on
	successor  atomic.Pointer[sink]
}

// provision gets the events app and registers the metrics of the
// configuration ctx belongs to.
func (o *observer) provision(ctx caddy.Context, mod caddy.Module) error {
	o.mod = mod
	o.registry = ctx.GetMetricsRegistry()
	o.metrics = newMetrics(o.registry)
	// Emit hands an event to no subscriber once its context is canceled,
	// and Caddy cancels a configuration's context before its Cleanup runs:
	// the ends of connections closed at Cleanup, or living on after a
	// reload, must still be delivered.
	o.ctx = ctx
	o.ctx.Context = context.WithoutCancel(ctx.Context)
	o.servers = listenAddrsOf(ctx)

	// Subscriptions live in the events app's configuration, so without one
	// (and unless another app loaded it: the HTTP app always does) nobody
	// could receive an event, and none is emitted.
	app, err := ctx.AppIfConfigured("events")
	if errors.Is(err, caddy.ErrNotConfigured) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tcpops: loading the events app: %w", err)
	}
	o.events = app.(*caddyevents.App)
	// Caddy emits "stopping" through it before it stops a configuration's
	// apps (an HTTP server's graceful shutdown closes connections then);
	// one can subscribe only while the app is provisioning.
	if err := o.events.On("stopping", stoppingHook{o}); err != nil {
		ctx.Logger(mod).Debug("tcpops: cannot watch for Caddy stopping; ends while it stops may be classified eof",
			zap.Error(err))
	}
	return nil
}

// stoppingHook is subscribed to Caddy's "stopping" event.
type stoppingHook struct{ o *observer }

// Handle marks the configuration as stopping.
func (h stoppingHook) Handle(context.Context, caddy.Event) error {
	h.o.isStopping.Store(true)
	return nil
}

// stopping reports whether t's configuration is being stopped right now.
func (t *tracker) stopping() bool {
	return t != nil && t.obs.isStopping.Load()
}

// Cleanup runs when the configuration that provisioned the module is
// unloaded. When Caddy stops it closes the connections still tracked,
// classified as shutdown; on a reload it leaves them running, reporting
// their ends to the new configuration. Caddy calls it for every module
// that embeds a tracker.
func (t *tracker) Cleanup() error {
	o := &t.obs
	if o.registry == nil {
		return nil // not provisioned
	}
	active := caddy.ActiveContext()
	if reg := active.GetMetricsRegistry(); reg == nil || reg == o.registry {
		// Caddy's Stop: no configuration follows this one. Since Caddy
		// v2.11.9, Stop clears the active configuration before it cleans
		// up; v2.11.4 left this one active until then. (A reload swaps
		// the new one in first; a configuration that failed to load or
		// was only being validated while another ran never was active.)
		// The ends of connections an unloaded configuration tracked are
		// reported here, by the configuration that was running.
		own := t.sink()
		connections.each(func(c *Conn) bool {
			if c.tracker == t {
				c.closeWith(ReasonClosed, CauseShutdown)
			} else if c.tracker != nil && c.tracker.obs.retired.Load() {
				c.tracker.obs.successor.Store(&own)
				c.closeWith(ReasonClosed, CauseShutdown)
			}
			return true
		})
	} else {
		o.retired.Store(true)
	}
	o.isStopping.Store(false)
	return nil
}

// sink is where ends are reported: metrics and events app (either may be
// nil), and logger.
type sink struct {
	registry *prometheus.Registry
	metrics  *metrics
	events   *caddyevents.App
	logger   *zap.Logger
}

// sink returns t's own reporting, or once t is retired the reporting of the
// configuration running now (none when Caddy is stopped).
func (t *tracker) sink() sink {
	o := &t.obs
	if !o.retired.Load() {
		return sink{o.registry, o.metrics, o.events, t.logger}
	}
	active := caddy.ActiveContext()
	reg := active.GetMetricsRegistry()
	if s := o.successor.Load(); s != nil && (s.registry == reg || reg == nil) {
		return *s // reg is nil while Caddy stops: the last configuration's
	}
	s := &sink{registry: reg, logger: t.logger}
	if reg != nil {
		s.metrics = newMetrics(reg)
		if app, err := active.AppIfConfigured("events"); err == nil {
			s.events, _ = app.(*caddyevents.App)
		}
		s.logger = active.Logger(o.mod)
	}
	o.successor.Store(s)
	return *s
}

// connEnd is what is reported about an end, taken when it happened.
type connEnd struct {
	reason, cause     string
	events            bool
	duration, idle    time.Duration
	bytesIn, bytesOut uint64
}

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
	}
}

// ended reports the end of c, once: a count in the metrics, a log line (at
// info level, or debug for an ordinary closed/eof), and the event when c
// has events on.
func (t *tracker) ended(c *Conn, e *connEnd) {
	if t == nil {
		return // a Conn made by hand in a test
	}
	s := t.sink()
	s.metrics.ended(e.reason, e.cause)
	if ce := s.logger.Check(endLogLevel(e.reason, e.cause), "tcpops: connection ended"); ce != nil {
		fields := c.logFields(
			zap.String("reason", e.reason),
			zap.String("cause", e.cause),
			zap.Duration("duration", e.duration),
			zap.Duration("idle", e.idle),
			zap.Uint64("bytes_in", e.bytesIn),
			zap.Uint64("bytes_out", e.bytesOut),
		)
		if name := t.serverName(c); name != "" {
			fields = append(fields, zap.String("server", name))
		}
		ce.Write(fields...)
	}
	if e.events && s.events != nil {
		s.events.Emit(t.obs.ctx, eventName(e.reason), t.eventData(c, e))
	}
}

// eventData is the data of an end's event. Durations are in seconds, as in
// Caddy's logs.
func (t *tracker) eventData(c *Conn, e *connEnd) map[string]any {
	data := map[string]any{
		"conid":     c.id,
		"reason":    e.reason,
		"cause":     e.cause,
		"remote":    addrText(c.RemoteAddr()),
		"local":     addrText(c.LocalAddr()),
		"duration":  e.duration.Seconds(),
		"idle":      e.idle.Seconds(),
		"bytes_in":  e.bytesIn,
		"bytes_out": e.bytesOut,
	}
	if name := t.serverName(c); name != "" {
		data["server"] = name
	}
	return data
}

func addrText(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// namedListen is one server of the app that provisioned a tcpops module,
// with the addresses it listens on.
type namedListen struct {
	name  string
	addrs []caddy.NetworkAddress
}

// listenAddrsOf returns the servers of the app at the root of ctx's module
// tree, a layer4 or an HTTP app, so that ends can name their server: the
// modules are not told which server they belong to.
func listenAddrsOf(ctx caddy.Context) []namedListen {
	mods := ctx.Modules()
	if len(mods) == 0 {
		return nil
	}
	listens := map[string][]string{}
	switch app := mods[0].(type) {
	case *layer4.App:
		for name, srv := range app.Servers {
			listens[name] = srv.Listen
		}
	case *caddyhttp.App:
		for name, srv := range app.Servers {
			listens[name] = srv.Listen
		}
	default:
		return nil
	}
	repl := caddy.NewReplacer()
	var out []namedListen
	for name, addrs := range listens {
		nl := namedListen{name: name}
		for _, a := range addrs {
			if na, err := caddy.ParseNetworkAddress(repl.ReplaceAll(a, "")); err == nil {
				nl.addrs = append(nl.addrs, na)
			}
		}
		out = append(out, nl)
	}
	return out
}

// serverName returns the name of the server that accepted c, where it can
// be known. A module instance belongs to one server, so the first answer
// holds for all its connections.
func (t *tracker) serverName(c *Conn) string {
	o := &t.obs
	if p := o.server.Load(); p != nil {
		return *p
	}
	var name string
	if len(o.servers) == 1 {
		name = o.servers[0].name
	} else if la, ok := c.LocalAddr().(*net.TCPAddr); ok {
		for _, s := range o.servers {
			if listensOn(s.addrs, la) {
				name = s.name
				break
			}
		}
	}
	if name != "" {
		o.server.Store(&name)
	}
	return name
}

// listensOn reports whether one of addrs could have accepted a connection
// on la.
func listensOn(addrs []caddy.NetworkAddress, la *net.TCPAddr) bool {
	for _, a := range addrs {
		if !a.IsUnixNetwork() && uint(la.Port) >= a.StartPort && uint(la.Port) <= a.EndPort {
			if ip := net.ParseIP(a.Host); ip == nil || ip.IsUnspecified() || ip.Equal(la.IP) {
				return true
			}
		}
	}
	return false
}

// Interface guards
var (
	_ caddy.CleanerUpper  = (*tracker)(nil)
	_ caddyevents.Handler = stoppingHook{}
)
