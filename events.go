package tcpops

import (
	"context"
	"errors"
	"fmt"
	"go.uber.org/zap/zapcore"
	"net"
	"sync"
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

	queue      eventQueue  // end events waiting for delivery
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
	o.queue.ctx = o.ctx
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
	if stopped(o.registry) {
		// The ends of connections an earlier configuration tracked are
		// reported here too, to this last configuration: Caddy may have
		// made none active already (see stopped).
		own := t.sink()
		connections.each(func(c *Conn) bool {
			switch {
			case c.tracker == t:
			case c.tracker != nil && c.tracker.obs.retired.Load():
				c.tracker.obs.successor.Store(&own)
			default:
				return true
			}
			c.closeWith(ReasonClosed, CauseShutdown)
			return true
		})
		if n := o.queue.drain(eventsDrainTimeout); n > 0 {
			o.metrics.eventsDropped(n)
			t.logger.Warn("tcpops: Caddy stopped before every end event was delivered; the rest were dropped",
				zap.Int64("dropped", n), zap.Duration("waited", eventsDrainTimeout))
		}
	} else {
		o.retired.Store(true)
	}
	o.isStopping.Store(false)
	return nil
}

// stopped reports, from a module's Cleanup, whether Caddy is stopping with
// no configuration to follow, as opposed to a reload (the new configuration
// is active already) or the end of a configuration that failed to load or
// was only validated (it never was the active one). reg is the metrics
// registry of the configuration being cleaned up, which identifies it.
//
// Caddy up to v2.11.4 cleans up on Stop while the stopping configuration is
// still the active one; v2.11.9's Stop makes no configuration active
// before it stops the apps (caddy.go, Stop). Both are recognised.
func stopped(reg *prometheus.Registry) bool {
	active := caddy.ActiveContext()
	return active.Context == nil || active.GetMetricsRegistry() == reg
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
	if s := o.successor.Load(); s != nil && (s.registry == reg || active.Context == nil) {
		return *s
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
		ev := &queuedEvent{app: s.events, name: eventName(e.reason), data: t.eventData(c, e)}
		if !t.obs.queue.push(ev) {
			s.metrics.eventDropped()
			s.logger.Warn("tcpops: events queue full; end event dropped (a subscriber is too slow)",
				c.logFields(zap.String("event", ev.name), zap.Int("queue", eventQueueSize))...)
		}
	}
}

// Events are delivered off the paths that end connections. Caddy's Emit
// calls every subscriber in the caller's goroutine, so one slow subscriber
// (an exec handler, a webhook) would otherwise hold up the lifetime timer
// that closes a connection, the sweep, and every Close, and make Stop take
// as many times its latency as there are connections. Each tcpops module
// has a bounded queue and delivers from one goroutine, which runs only
// while the queue has events; a full queue drops the event and counts it
// in caddy_tcpops_events_dropped_total. When Caddy stops, Cleanup waits up
// to eventsDrainTimeout for the queue to empty; what is left then is
// dropped and counted, so that Stop does not hang on a subscriber.
const (
	eventQueueSize     = 4096
	eventsDrainTimeout = 5 * time.Second
)

// queuedEvent is an end's event waiting for delivery.
type queuedEvent struct {
	app  *caddyevents.App
	name string
	data map[string]any
}

// eventQueue is a tracker's queue of events to deliver.
type eventQueue struct {
	ctx     caddy.Context // what Emit is called with: the tracker's
	mu      sync.Mutex    // guards ch's creation, on the first event
	ch      chan *queuedEvent
	running atomic.Bool // a delivering goroutine runs
	abandon atomic.Bool // Stop's wait is over: count what is left as dropped
	dropped atomic.Int64
}

// channel returns the queue's channel, created on first use when create is
// set: most configurations never emit an event.
func (q *eventQueue) channel(create bool) chan *queuedEvent {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ch == nil && create {
		q.ch = make(chan *queuedEvent, eventQueueSize)
	}
	return q.ch
}

// push queues ev, starting the delivering goroutine if none runs; it
// reports false when the queue is full.
func (q *eventQueue) push(ev *queuedEvent) bool {
	select {
	case q.channel(true) <- ev:
	default:
		return false
	}
	if !q.running.Load() && q.running.CompareAndSwap(false, true) {
		go q.deliver()
	}
	return true
}

// deliver emits queued events until the queue is empty.
func (q *eventQueue) deliver() {
	ch := q.channel(false)
	for {
		select {
		case ev := <-ch:
			if q.abandon.Load() {
				q.dropped.Add(1)
				continue
			}
			ev.app.Emit(q.ctx, ev.name, ev.data)
			continue
		default:
		}
		q.running.Store(false)
		// An event pushed between the empty receive and the Store saw
		// running still true and started no goroutine: take it back.
		if len(ch) == 0 || !q.running.CompareAndSwap(false, true) {
			return
		}
	}
}

// drain waits until every queued event is delivered, at most timeout, and
// then has the rest dropped. It returns how many were dropped.
func (q *eventQueue) drain(timeout time.Duration) int64 {
	ch := q.channel(false)
	if ch == nil {
		return 0
	}
	// Stop is the only waiter, once per configuration: a short poll is
	// simpler than a signal from the delivering goroutine.
	deadline := time.Now().Add(timeout)
	for (len(ch) > 0 || q.running.Load()) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	q.abandon.Store(true)
	for {
		select {
		case <-ch:
			q.dropped.Add(1)
			continue
		default:
		}
		return q.dropped.Swap(0)
	}
}

// eventData is the data of an end's event. Durations are in seconds, as in
// Caddy's logs.
func (t *tracker) eventData(c *Conn, e *connEnd) map[string]any {
	remote, local := c.addrs()
	data := map[string]any{
		"conid":     c.id,
		"reason":    e.reason,
		"cause":     e.cause,
		"remote":    addrString(remote),
		"local":     addrString(local),
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
	} else if _, local := c.addrs(); local != nil {
		for _, s := range o.servers {
			if la, ok := local.(*net.TCPAddr); ok && listensOn(s.addrs, la) {
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

func endLogLevel(reason, cause string) zapcore.Level {
	if reason == ReasonClosed && cause == CauseEOF {
		return zapcore.DebugLevel
	}
	return zapcore.InfoLevel
}
