package tcpops

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the Prometheus collectors of tcpops, registered on a
// configuration's metrics registry (the one Caddy's /metrics admin endpoint
// serves). Every tcpops module of a configuration shares them; a reload
// brings a new registry, and counters start again from zero there, as
// Caddy's own do.
type metrics struct {
	handled         prometheus.Counter
	open            prometheus.GaugeFunc
	ends            *prometheus.CounterVec
	endsByCause     [len(endCauses)]prometheus.Counter
	sockoptFailures *prometheus.CounterVec
	rearms          prometheus.Counter
	eventsDrop      prometheus.Counter
}

// endCauses are the causes of an end, each with its one reason. Their
// counters exist from the start, at zero, so that rate() and alerts see
// every series before its first end; and finding them costs no allocation.
var endCauses = [...]endClass{
	{ReasonClosed, CauseEOF},
	{ReasonClosed, CauseAdmin},
	{ReasonClosed, CauseShutdown},
	{ReasonTimeout, CauseLifetime},
	{ReasonTimeout, CauseMaxLifetime},
	{ReasonTimeout, CauseMaxLifetimeGrace},
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
		handled: registerOrExisting(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub,
			Name: "connections_total",
			Help: "Connections tcpops started tracking.",
		})),
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
			Help: "Ends of tracked connections by reason (closed, timeout, reset) and cause.",
		}, []string{"reason", "cause"})),
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
			Help: "Lifetime timers that fired on a connection with traffic since, and were re-armed.",
		})),
	}
	for i, ec := range endCauses {
		m.endsByCause[i] = m.ends.WithLabelValues(ec.reason, ec.cause)
	}
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

// tracked counts a connection that tcpops started tracking.
func (t *tracker) tracked() {
	if m := t.sink().metrics; m != nil {
		m.handled.Inc()
	}
}

// rearmed is called when a lifetime timer fired on a connection that had
// seen traffic since, and was re-armed.
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

// ended counts an end.
func (m *metrics) ended(reason, cause string) {
	if m == nil {
		return
	}
	for i, ec := range endCauses {
		if ec.cause == cause && ec.reason == reason {
			m.endsByCause[i].Inc()
			return
		}
	}
	m.ends.WithLabelValues(reason, cause).Inc()
}
