package tcpops

import (
	"cmp"
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
	logger   *zap.Logger
	events   *caddyevents.App     // nil when the configuration has no events app
	metrics  *metrics             // the configuration's
	registry *prometheus.Registry // the configuration's, to tell a stop from a reload
	servers  []namedListen        // the servers of the app that provisioned the module
	server   atomic.Pointer[string]

	queue eventQueue // end events waiting for delivery
	// started is closed once the configuration's events app has started
	// (Caddy's "started" event), or at its Cleanup if it never does:
	// until then no event is emitted (eventQueue.deliver).
	started     chan struct{}
	startedOnce sync.Once
	isStopping  atomic.Bool // between the configuration's "stopping" event and its Cleanup
	// retired: another configuration runs now (a reload), from the old
	// one's "stopping" event on; its connections live on, and their ends
	// are reported to the successor.
	retired   atomic.Bool
	successor atomic.Pointer[sink]
	// serverMetrics are the collectors of the tracker's server in the
	// metrics it reports to now (tracker.serverMetrics).
	serverMetrics atomic.Pointer[serverMetrics]
}

// provision gets the events app and registers the metrics of the
// configuration ctx belongs to.
func (o *observer) provision(ctx caddy.Context, mod caddy.Module) error {
	o.mod = mod
	o.logger = ctx.Logger(mod)
	o.registry = ctx.GetMetricsRegistry()
	o.metrics = newMetrics(o.registry)
	// Emit hands an event to no subscriber once its context is canceled,
	// and Caddy cancels a configuration's context before its Cleanup runs:
	// the ends of connections closed at Cleanup, or living on after a
	// reload, must still be delivered.
	o.ctx = ctx
	o.ctx.Context = context.WithoutCancel(ctx.Context)
	o.queue.ctx = o.ctx
	o.queue.gen = connections.queues.generation()
	o.started = make(chan struct{})
	o.queue.started = o.started
	o.servers = listenAddrsOf(ctx)
	if o.metrics != nil {
		for _, s := range o.servers {
			o.metrics.forServer(s.name) // every series from the start, at 0
		}
	}

	// Subscriptions live in the events app's configuration, so without one
	// (and unless another app loaded it: the HTTP app always does) nobody
	// could receive an event, and none is emitted. The app is loaded all
	// the same, as the HTTP app does: Caddy emits "stopping" through it
	// before it stops a configuration's apps (caddy.go, unsyncedStop), and
	// that is when ends start to belong to the next configuration, or to
	// the stop. One can subscribe only while the app is provisioning.
	_, err := ctx.AppIfConfigured("events")
	configured := err == nil
	if err != nil && !errors.Is(err, caddy.ErrNotConfigured) {
		return fmt.Errorf("tcpops: loading the events app: %w", err)
	}
	if !configured && len(ctx.Modules()) == 0 {
		// A context made by hand (caddy.NewContext of an empty Context, in
		// tests) has no configuration to load an app into: ctx.App would
		// dereference it. Caddy's LoadModule always puts the module being
		// provisioned in the context's ancestry.
		o.markStarted()
		return nil
	}
	app, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("tcpops: loading the events app: %w", err)
	}
	ev := app.(*caddyevents.App)
	if configured {
		o.events = ev
	}
	if err := ev.On("stopping", stoppingHook{o}); err != nil {
		o.logger.Debug("tcpops: cannot watch for Caddy stopping; ends while it stops may be classified eof, and reported to the old configuration",
			zap.Error(err))
	}
	// Caddy starts a configuration's apps one after another, in no set
	// order, and the events app binds its subscriptions in its Start,
	// writing the map that Emit reads without a lock (caddyevents,
	// App.Subscribe and ShouldEmit): a connection of an app started
	// before it, ending then, raced it (go test -race, TestEndHandlerError,
	// whose server's first connection ends at once). Events wait for
	// Caddy's "started", which it emits once every app has started.
	if !configured {
		o.markStarted() // nothing is emitted without an events app
	} else if err := ev.On("started", startedHook{o}); err != nil {
		o.markStarted()
	}
	return nil
}

// markStarted lets o's events be emitted: its events app has started, or
// never will.
func (o *observer) markStarted() {
	o.startedOnce.Do(func() { close(o.started) })
}

// startedHook is subscribed to Caddy's "started" event.
type startedHook struct{ o *observer }

// Handle lets the configuration's end events be emitted: Caddy emits
// "started" once it has started every app of the configuration, the
// events app included.
func (h startedHook) Handle(context.Context, caddy.Event) error {
	h.o.markStarted()
	return nil
}

// eventsSeen reports whether an end event of o's configuration can reach
// anyone: o has an events app (tcpops emits through no other), and its
// configuration subscribes to tcp_closed, tcp_timeout or tcp_reset (or to
// every event), or it logs at debug level, where Caddy's Emit logs each
// event it emits. The app binds its configured subscriptions only when it
// starts, after every module's Provision, so they are read from its
// configuration; ShouldEmit, asked before any is bound, says whether it
// logs at debug level.
func (o *observer) eventsSeen() bool {
	if o.events == nil {
		return false
	}
	for _, sub := range o.events.Subscriptions {
		if len(sub.Events) == 0 {
			return true // every event
		}
		for _, name := range sub.Events {
			switch name {
			case "", EventClosed, EventTimeout, EventReset:
				return true
			}
		}
	}
	return o.events.ShouldEmit(EventClosed)
}

// stoppingHook is subscribed to Caddy's "stopping" event.
type stoppingHook struct{ o *observer }

// Handle marks the configuration as stopping. Caddy emits the event after
// it has made the next configuration the active one on a reload, and none
// on a stop (caddy.go, unsyncedDecodeAndRun and Stop), and before it stops
// the apps, whose servers then close connections (an HTTP server's
// graceful shutdown: idle ones at once, busy ones after their response).
// Those ends, and any other from now on, belong to the configuration
// running when they happen: on a reload the next one, so the
// configuration retires now, not at its Cleanup, which comes after the
// apps stopped; on a stop this one, also for the connections of earlier,
// retired configurations, whose successor this one becomes.
func (h stoppingHook) Handle(context.Context, caddy.Event) error {
	o := h.o
	o.isStopping.Store(true)
	if !stopped(o.registry) {
		o.retired.Store(true)
		return nil
	}
	own := o.ownSink()
	connections.each(func(c *Conn) bool {
		if t := c.tracker; t != nil && t.obs.retired.Load() {
			t.obs.successor.Store(&own)
		}
		return true
	})
	return nil
}

// stopping reports whether a connection of t closed under us (not after its
// peer's FIN) was closed because t's configuration stopped: from its
// "stopping" event to its Cleanup, and for an HTTP server's connections
// from then on, since a server in graceful shutdown closes a busy
// connection after its response, whenever that is, and after the Cleanup
// that follows a reload (Caddy's HTTP app does not wait for it: app.stop).
func (t *tracker) stopping() bool {
	return t != nil && (t.obs.isStopping.Load() || t.http && t.obs.retired.Load())
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
	// A configuration that failed to start never emits "started"; by its
	// Cleanup its events app has started or never will, so Emit races
	// nothing.
	o.markStarted()
	if stopped(o.registry) {
		// The first tcpops module cleaned up closes the connections of
		// every tcpops module of this configuration, and of earlier
		// configurations (Caddy may have made none active already: see
		// stopped), reported to this last one; then every end event still
		// queued, whichever configuration queued it, is delivered within
		// eventsDrainTimeout, or dropped and counted here.
		own := o.ownSink()
		connections.each(func(c *Conn) bool {
			switch ct := c.tracker; {
			case ct == nil:
				return true
			case ct.obs.registry == o.registry:
			case ct.obs.retired.Load():
				ct.obs.successor.Store(&own)
			default:
				return true
			}
			c.closeWith(ReasonClosed, CauseShutdown)
			return true
		})
		if n := connections.queues.drain(eventsDrainTimeout, o.metrics); n > 0 {
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

// ownSink is the reporting of o's own configuration.
func (o *observer) ownSink() sink {
	return sink{o.registry, o.metrics, o.events, o.logger}
}

// sink returns t's own reporting, or once t is retired the reporting of the
// configuration running now; while Caddy stops, of the one it stops (set by
// its stoppingHook and Cleanup).
func (t *tracker) sink() sink {
	o := &t.obs
	if !o.retired.Load() {
		s := o.ownSink()
		if s.logger == nil {
			// A tracker that was never provisioned (scale_test.go's
			// simulated connections): it logs where it was told to.
			s.logger = cmp.Or(t.logger, zap.NewNop())
		}
		return s
	}
	active := caddy.ActiveContext()
	reg := active.GetMetricsRegistry()
	if s := o.successor.Load(); s != nil && (s.registry == reg || active.Context == nil) {
		return *s
	}
	if active.Context == nil || reg == o.registry {
		// Caddy stops, and no stopping configuration has claimed t's
		// connections yet (a moment between Stop and its "stopping"
		// event, or a stopping configuration without tcpops): t's own
		// configuration is the last one that can count the end.
		return o.ownSink()
	}
	s := &sink{registry: reg, logger: t.logger}
	s.metrics = newMetrics(reg)
	if app, err := active.AppIfConfigured("events"); err == nil {
		s.events, _ = app.(*caddyevents.App)
	}
	s.logger = active.Logger(o.mod)
	o.successor.Store(s)
	return *s
}

// connEnd is what is reported about an end, taken when it happened.
type connEnd struct {
	reason, cause     string
	events            bool
	duration, idle    time.Duration
	bytesIn, bytesOut uint64
	tcp               endTCP // the last TCP_INFO (tcpstats.go)
}

// ended reports the end of c, once: a count in the metrics, a log line (at
// info level, or debug for an ordinary closed/eof), and the event when c
// has events on.
func (t *tracker) ended(c *Conn, e *connEnd) {
	if t == nil {
		return // a Conn made by hand in a test
	}
	s := t.sink()
	sm := t.serverMetrics(s.metrics, c)
	sm.ended(e.reason, e.cause, e.duration)
	e.tcp.count(sm)
	if ce := s.logger.Check(endLogLevel(e.reason, e.cause), "tcpops: connection ended"); ce != nil {
		fields := c.logFields(
			zap.String("reason", e.reason),
			zap.String("cause", e.cause),
			zap.Duration("duration", e.duration),
			zap.Duration("idle", e.idle),
			zap.Uint64("bytes_in", e.bytesIn),
			zap.Uint64("bytes_out", e.bytesOut),
		)
		fields = append(fields, e.tcp.logFields()...)
		if name := t.serverName(c); name != "" {
			fields = append(fields, zap.String("server", name))
		}
		ce.Write(fields...)
	}
	if e.events && s.events != nil {
		ev := &queuedEvent{app: s.events, name: eventName(e.reason), data: t.eventData(c, e)}
		if !t.obs.queue.push(ev) {
			s.metrics.eventDropped()
			msg := "tcpops: events queue full; end event dropped (a subscriber is too slow)"
			if t.obs.queue.abandoned() {
				msg = "tcpops: end event after Caddy stopped; dropped"
			}
			s.logger.Warn(msg, c.logFields(zap.String("event", ev.name), zap.Int("queue", eventQueueSize))...)
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
//
// Its deliverer runs while the queue holds events, and the queue is in the
// set of busy queues (queueSet) exactly while it runs: both change together
// under the set's lock, as do pushes. So Stop, which waits on that set,
// never misses a deliverer, and a push never lands between a deliverer
// finding the channel empty and leaving.
type eventQueue struct {
	ctx caddy.Context // what Emit is called with: the tracker's
	// gen is the set's generation when the queue's configuration was
	// provisioned: once a Stop has moved the set past it, the queue is
	// abandoned, idle or not, and its events are dropped and counted.
	gen uint64
	ch  chan *queuedEvent // created on the first event, under the set's lock
	// running: a deliverer runs (under the set's lock).
	running bool
	// started is closed once events may be emitted (observer.started);
	// nil: at once.
	started chan struct{}
}

// push queues ev, starting the deliverer if none runs; it reports false when
// the queue is full, or Caddy stopped since the queue's configuration was
// provisioned: the caller counts the event as dropped. The set's lock is
// held throughout: an end with events on is rare next to one without, and
// costs some 15µs in Caddy's Emit anyway (docs/events.md).
func (q *eventQueue) push(ev *queuedEvent) bool {
	s := &connections.queues
	s.mu.Lock()
	defer s.mu.Unlock()
	if q.abandoned() {
		return false
	}
	if q.ch == nil {
		q.ch = make(chan *queuedEvent, eventQueueSize) // most configurations never emit one
	}
	select {
	case q.ch <- ev:
	default:
		return false
	}
	if !q.running {
		q.running = true
		s.addLocked(q)
		go q.deliver(q.ch)
	}
	return true
}

// abandoned reports whether a Stop has given up on q's events.
func (q *eventQueue) abandoned() bool { return q.gen < connections.queues.gen.Load() }

// deliver emits queued events until the queue is empty.
func (q *eventQueue) deliver(ch chan *queuedEvent) {
	s := &connections.queues
	if q.started != nil {
		<-q.started // closed by Caddy's "started", or at Cleanup at the latest
	}
	for {
		select {
		case ev := <-ch:
			if q.abandoned() {
				s.dropTo.Load().eventDropped()
				continue
			}
			ev.app.Emit(q.ctx, ev.name, ev.data)
			continue
		default:
		}
		s.mu.Lock()
		if len(ch) == 0 {
			// No push is half done: pushes hold the lock.
			q.running = false
			s.doneLocked(q)
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
	}
}

// discard empties ch and returns how many events it dropped.
func discard(ch chan *queuedEvent) int64 {
	var n int64
	for {
		select {
		case <-ch:
			n++
		default:
			return n
		}
	}
}

// queueSet is the events queues that have events to deliver (their
// deliverer runs), whichever configuration's they are: a configuration
// retired by a reload keeps its queue, and Stop must wait for it too. It
// holds no idle queue, so that a retired configuration is not kept alive
// by it; Stop abandons idle queues by moving gen past theirs.
type queueSet struct {
	mu  sync.Mutex
	m   map[*eventQueue]struct{}
	gen atomic.Uint64 // advanced by each Stop, under mu
	// dropTo is where events abandoned by a Stop are counted: the
	// stopping configuration's metrics.
	dropTo atomic.Pointer[metrics]
}

// generation is the generation a queue provisioned now belongs to.
func (s *queueSet) generation() uint64 { return s.gen.Load() }

func (s *queueSet) addLocked(q *eventQueue) {
	if s.m == nil {
		s.m = map[*eventQueue]struct{}{}
	}
	s.m[q] = struct{}{}
}

func (s *queueSet) doneLocked(q *eventQueue) { delete(s.m, q) }

// busy reports whether a deliverer runs.
func (s *queueSet) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m) > 0
}

// drain waits until every queue has delivered its events, at most timeout
// in all; then it abandons every queue there is, idle ones included, and
// returns how many events it dropped. An event pushed from then on is
// refused (counted by its caller), and one a deliverer takes after this is
// counted in m.
func (s *queueSet) drain(timeout time.Duration, m *metrics) int64 {
	// Stop is the only waiter: a short poll is simpler than a signal from
	// the delivering goroutines.
	deadline := time.Now().Add(timeout)
	for s.busy() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	s.mu.Lock()
	s.dropTo.Store(m) // before gen, which the deliverers read first
	s.gen.Add(1)
	chans := make([]chan *queuedEvent, 0, len(s.m))
	for q := range s.m {
		chans = append(chans, q.ch)
	}
	s.mu.Unlock()
	var n int64
	for _, ch := range chans {
		n += discard(ch)
	}
	return n
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
	e.tcp.addEventData(data)
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
	_ caddyevents.Handler = startedHook{}
)

func endLogLevel(reason, cause string) zapcore.Level {
	if reason == ReasonClosed && cause == CauseEOF {
		return zapcore.DebugLevel
	}
	return zapcore.InfoLevel
}
