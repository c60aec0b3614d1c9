package tcpops

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the Prometheus collectors of tcpops, registered on a
// configuration's metrics registry (the one Caddy's /metrics admin endpoint
// serves). Every tcpops module of a configuration shares them; a reload
// brings a new registry, and counters start again from zero there, as
// Caddy's own do.
//
// As Caddy's own HTTP metrics (caddyhttp/metrics.go) label by server, the
// series of connections and ends carry the name of the layer4 or HTTP
// server that accepted the connection (tracker.serverName): its cardinality
// is the configuration's number of servers, and the label is empty where
// the server cannot be known. Durations are a histogram by reason, as
// Caddy's request durations are, with buckets for SIP: a REGISTER that
// failed within seconds, keep-alive connections that live for minutes to
// hours, and phones that stay connected for days.
type metrics struct {
	handled         *prometheus.CounterVec
	open            prometheus.GaugeFunc
	ends            *prometheus.CounterVec
	durations       *prometheus.HistogramVec
	sockoptFailures *prometheus.CounterVec
	rearms          prometheus.Counter
	eventsDrop      prometheus.Counter
	tcp             *tcpMetrics // the TCP statistics (tcpstats.go)
}

// durationBuckets are the upper bounds, in seconds, of the connection
// duration histogram: 1s, 5s, 15s, 1m, 5m, 15m, 1h, 4h, 12h, 1d, 3d, 7d.
var durationBuckets = []float64{1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400}

// reasons are the reasons of an end, each a label value of the duration
// histogram.
var reasons = [...]string{ReasonClosed, ReasonTimeout, ReasonReset}

// serverMetrics are the collectors of one server in one configuration's
// metrics, found once so that counting an end costs no label lookup and no
// allocation.
type serverMetrics struct {
	m         *metrics
	server    string
	handled   prometheus.Counter
	ends      [len(endCauses)]prometheus.Counter
	durations [len(reasons)]prometheus.Observer

	// tcp are the server's series of the TCP statistics, made at the
	// first TCP_INFO read, which says what fields the kernel has: at the
	// server's first tracked connection (tracker.tracked).
	tcp atomic.Pointer[tcpSeries]
}

// forServer returns m's collectors of server, creating its series, each at
// zero, so that rate() and alerts see every series before its first end.
func (m *metrics) forServer(server string) *serverMetrics {
	sm := &serverMetrics{m: m, server: server, handled: m.handled.WithLabelValues(server)}
	for i, ec := range endCauses {
		sm.ends[i] = m.ends.WithLabelValues(server, ec.reason, ec.cause)
	}
	for i, r := range reasons {
		sm.durations[i] = m.durations.WithLabelValues(server, r)
	}
	return sm
}

// tcpSeries returns sm's series of the TCP statistics, made on the first
// call for the fields in have: a kernel's TCP_INFO has the same fields
// every time, and a field it lacks gets no series (never a zero that
// looks measured).
func (sm *serverMetrics) tcpSeries(have tcpFields) *tcpSeries {
	if ts := sm.tcp.Load(); ts != nil {
		return ts
	}
	// Two first calls at once make equal series (WithLabelValues finds
	// the same children); one is kept.
	sm.tcp.CompareAndSwap(nil, newTCPSeries(sm.m.tcp, sm.server, have))
	return sm.tcp.Load()
}

// endCauses are the causes of an end, each with its one reason. Their
// counters exist from the start, at zero, so that rate() and alerts see
// every series before its first end; and finding them costs no allocation.
var endCauses = [...]endClass{
	{ReasonClosed, CauseEOF},
	{ReasonClosed, CauseAdmin},
	{ReasonClosed, CauseShutdown},
	{ReasonClosed, CauseUpstream},
	{ReasonClosed, CauseError},
	{ReasonClosed, CauseLocal},
	{ReasonTimeout, CauseMatching},
	{ReasonTimeout, CauseLifetime},
	{ReasonTimeout, CauseMaxLifetime},
	{ReasonTimeout, CauseMaxLifetimeGrace},
	{ReasonTimeout, CauseLinger},
	{ReasonTimeout, CauseKeepalive},
	{ReasonTimeout, CauseUserTimeout},
	{ReasonTimeout, CauseKernel},
	{ReasonReset, CauseReset},
}

// newMetrics creates the collectors on reg, or finds the ones another tcpops
// module of the configuration registered there.
func newMetrics(reg *prometheus.Registry) *metrics {
	if reg == nil {
		return nil
	}
	const ns, sub = "caddy", "tcpops"
	m := &metrics{
		handled: registerOrExisting(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "connections_total",
			Help: "Connections tcpops started tracking, by server.",
		}, []string{"server"})),
		// The open connections are counted from the connection registry
		// when scraped, not with Inc and Dec: a connection tracked by one
		// configuration may end under the next one (a reload keeps it), and
		// a gauge kept by hand would go negative in one registry and leak
		// in the other.
		open: registerOrExisting(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub,
			Name: "connections_open",
			Help: "Connections tracked by tcpops now, whatever configuration tracked them.",
		}, func() float64 { return float64(connections.len()) })),
		ends: registerOrExisting(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "connections_ended_total",
			Help: "Ends of tracked connections by server, reason (closed, timeout, reset) and cause.",
		}, []string{"server", "reason", "cause"})),
		durations: registerOrExisting(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub,
			Name:    "connection_duration_seconds",
			Help:    "How long tracked connections lived, from tcpops' first sight to their end, by server and reason.",
			Buckets: durationBuckets,
		}, []string{"server", "reason"})),
		sockoptFailures: registerOrExisting(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "sockopt_failures_total",
			Help: "Socket options tcpops could not set, by option; the connection was served without it.",
		}, []string{"option"})),
		eventsDrop: registerOrExisting(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "events_dropped_total",
			Help: "End events not delivered: the events queue was full, or Caddy stopped before a slow subscriber took them.",
		})),
		rearms: registerOrExisting(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "lifetime_rearms_total",
			Help: "Connection timers that fired with nothing due yet and were re-armed: a lifetime with traffic since, or an HTTP drain's quiet window or grace.",
		})),
	}
	m.tcp = newTCPMetrics(reg, ns, sub)
	return m
}

// registerOrExisting registers c on reg, or returns the equal collector
// already registered there by another tcpops module of the configuration
// (as caddy-l4's proxy does). Any other error leaves c unregistered: it
// still counts, unseen, rather than failing the configuration.
func registerOrExisting[C prometheus.Collector](reg *prometheus.Registry, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
	}
	return c
}

// tracked counts a connection that tcpops started tracking. The server's
// first one makes its series of the TCP statistics, at zero, so that
// rate() and alerts see them before the first end; that costs one TCP_INFO
// read, once per server and configuration.
func (t *tracker) tracked(c *Conn) {
	if sm := t.serverMetrics(t.sink().metrics, c); sm != nil {
		sm.handled.Inc()
		if sm.tcp.Load() == nil && c.tcp != nil {
			if s, ok := readTCPSample(c.tcp); ok {
				sm.tcpSeries(s.have)
			}
		}
	}
}

// serverMetrics returns the collectors of c's server in m (nil when m is),
// cached in t: a tracker belongs to one server, whose name it learns from
// its first connection (serverName), and reports to one configuration's
// metrics at a time.
func (t *tracker) serverMetrics(m *metrics, c *Conn) *serverMetrics {
	if m == nil {
		return nil
	}
	server := t.serverName(c)
	if sm := t.obs.serverMetrics.Load(); sm != nil && sm.m == m && sm.server == server {
		return sm
	}
	sm := m.forServer(server)
	t.obs.serverMetrics.Store(sm)
	return sm
}

// rearmed is called when a connection's timer fired with nothing due yet
// and was re-armed: a lifetime with traffic since, or on an HTTP connection
// the drain's quiet window or grace, the GOAWAY's wait to leave the send
// queue, or the linger's polls (lifetime.go, settleLocked).
func (t *tracker) rearmed() {
	if m := t.sink().metrics; m != nil {
		m.rearms.Inc()
	}
}

// sockoptFailed counts a socket option that could not be set.
func (t *tracker) sockoptFailed(option string) {
	if t == nil {
		return
	}
	if m := t.sink().metrics; m != nil {
		m.sockoptFailures.WithLabelValues(option).Inc()
	}
}

// eventDropped counts an end event that was not delivered.
func (m *metrics) eventDropped() { m.eventsDropped(1) }

// eventsDropped counts n end events that were not delivered.
func (m *metrics) eventsDropped(n int64) {
	if m != nil {
		m.eventsDrop.Add(float64(n))
	}
}

// ended counts an end, and how long the connection lived.
func (sm *serverMetrics) ended(reason, cause string, duration time.Duration) {
	if sm == nil {
		return
	}
	for i, ec := range endCauses {
		if ec.cause == cause && ec.reason == reason {
			sm.ends[i].Inc()
			break
		}
	}
	for i, r := range reasons {
		if r == reason {
			sm.durations[i].Observe(duration.Seconds())
			return
		}
	}
}
