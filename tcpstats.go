package tcpops

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// The network's health per server, as Envoy's tcp_stats transport socket
// has it per listener: counters of segments, data segments and
// retransmitted segments, gauges of unsent bytes and unacknowledged
// segments, and histograms of the RTT, its variance and the retransmitted
// percentage, all from the kernel's TCP_INFO.
//
// Every connection counts once at its end, from one TCP_INFO read taken
// while its socket is still open (Conn.snapshotEnd). With stats_period a
// connection also counts while it lives: the registry's sweeper samples it
// every period (statsSampler, sampler.go), and each sample adds only what
// changed since the connection's last one (connStats.last), so that its
// end adds the rest and the totals equal its final TCP_INFO once.

// tcpFields are the groups of TCP_INFO fields a kernel's answer had
// (readTCPSample): a kernel older than a field leaves it out of its answer,
// and the metric, log field and event field built on it are left out too.
type tcpFields uint8

const (
	tcpHasBase     tcpFields = 1 << iota // rtt, rttvar, unacked, lost, total_retrans
	tcpHasBytes                          // bytes_acked, bytes_received
	tcpHasSegs                           // segs_out, segs_in
	tcpHasNotsent                        // notsent_bytes
	tcpHasDataSegs                       // data_segs_out, data_segs_in
)

// tcpSample is what tcpops takes of one TCP_INFO read. Times are in
// microseconds, as the kernel gives them.
type tcpSample struct {
	have                      tcpFields
	rtt, rttVar               uint32
	unacked, lost             uint32
	totalRetrans              uint32
	segsOut, segsIn           uint32
	dataSegsOut, dataSegsIn   uint32
	notsent                   uint32
	bytesAcked, bytesReceived uint64
}

// connStats is what the metrics have of a connection that stats_period
// samples while it lives, kept in its entry of the registry's sampler
// (sampler.go) until its end takes it. Connections without stats_period
// have none: their end counts their whole TCP_INFO.
type connStats struct {
	mu sync.Mutex
	// last is the sample counted so far: the next sample, and the end,
	// add only what changed since.
	last tcpSample
	// into holds last's share of the gauges (unacked, notsent), to take
	// back from there at the next sample or the end: after a reload the
	// connection reports to another configuration's series.
	into *tcpSeries
	// activeAt is the connection's last activity (Conn.lastActive) when
	// last was read: a sample that finds it unchanged, with nothing in
	// flight then, has nothing new to count (quiet).
	activeAt int64
	// ended: the end has taken last over; no sample counts after it.
	ended bool
}

// tcpMetrics are the collectors of the TCP statistics, registered with the
// others (newMetrics).
type tcpMetrics struct {
	segsOut, segsIn         *prometheus.CounterVec
	dataSegsOut, dataSegsIn *prometheus.CounterVec
	retrans                 *prometheus.CounterVec
	notsent, unacked        *prometheus.GaugeVec
	rtt, rttVar             *prometheus.HistogramVec
	retransPct              *prometheus.HistogramVec
}

// rttBuckets are the upper bounds, in seconds, of the RTT and RTT variance
// histograms: 100µs to 5s, about three per decade. One set fits a LAN and
// a mobile network alike (docs/events.md says why): loopback and a LAN
// answer in 20µs to 1ms, a wired path across a country in 10 to 50ms, LTE
// in 30 to 100ms, 3G and a congested radio cell in hundreds of ms, and a
// bloated buffer on a mobile link in seconds.
var rttBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// retransPctBuckets are the upper bounds of the retransmitted-percentage
// histogram: a clean path retransmits nothing (the 0 bucket), a wired one
// under 0.1%, a mobile one 1 to 5%, and above 10% a connection struggles.
var retransPctBuckets = []float64{0, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100}

// newTCPMetrics creates the TCP statistics' collectors on reg, or finds the
// ones another tcpops module of the configuration registered there.
func newTCPMetrics(reg *prometheus.Registry, ns, sub string) *tcpMetrics {
	counter := func(name, help string) *prometheus.CounterVec {
		return registerOrExisting(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: name, Help: help,
		}, []string{"server"}))
	}
	gauge := func(name, help string) *prometheus.GaugeVec {
		return registerOrExisting(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: name, Help: help,
		}, []string{"server"}))
	}
	histogram := func(name, help string, buckets []float64) *prometheus.HistogramVec {
		return registerOrExisting(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: name, Help: help, Buckets: buckets,
		}, []string{"server"}))
	}
	const when = " Counted at each connection's end, and every stats_period while it lives."
	return &tcpMetrics{
		segsOut:     counter("tcp_segments_sent_total", "TCP segments sent (tcpi_segs_out), by server."+when),
		segsIn:      counter("tcp_segments_received_total", "TCP segments received (tcpi_segs_in), by server."+when),
		dataSegsOut: counter("tcp_data_segments_sent_total", "TCP segments with data sent (tcpi_data_segs_out), by server."+when),
		dataSegsIn:  counter("tcp_data_segments_received_total", "TCP segments with data received (tcpi_data_segs_in), by server."+when),
		retrans:     counter("tcp_retransmitted_segments_total", "TCP segments retransmitted (tcpi_total_retrans), by server."+when),
		notsent: gauge("tcp_unsent_bytes", "Bytes written to open connections' sockets and not sent yet (tcpi_notsent_bytes), "+
			"as their last stats_period sample had them, by server."),
		unacked: gauge("tcp_unacked_segments", "Segments sent on open connections and not acknowledged yet (tcpi_unacked), "+
			"as their last stats_period sample had them, by server."),
		rtt: histogram("tcp_rtt_seconds", "Smoothed round-trip time (tcpi_rtt), by server."+
			" Observed at each connection's end, and at each stats_period sample.", rttBuckets),
		rttVar: histogram("tcp_rtt_variance_seconds", "Round-trip time variance (tcpi_rttvar), by server."+
			" Observed at each connection's end, and at each stats_period sample.", rttBuckets),
		retransPct: histogram("tcp_retransmitted_percent", "Percentage of the segments sent that were retransmissions, "+
			"per connection between two of its samples (or its start and its end), by server.", retransPctBuckets),
	}
}

// tcpSeries are one server's series of the TCP statistics, for the
// TCP_INFO fields the kernel has: a field it lacks has no series (nil).
type tcpSeries struct {
	segsOut, segsIn         prometheus.Counter
	dataSegsOut, dataSegsIn prometheus.Counter
	retrans                 prometheus.Counter
	notsent, unacked        prometheus.Gauge
	rtt, rttVar, retransPct prometheus.Observer
}

// newTCPSeries returns server's series of m for the fields in have, each
// created at zero.
func newTCPSeries(m *tcpMetrics, server string, have tcpFields) *tcpSeries {
	ts := &tcpSeries{}
	if have&tcpHasBase != 0 {
		ts.retrans = m.retrans.WithLabelValues(server)
		ts.unacked = m.unacked.WithLabelValues(server)
		ts.rtt = m.rtt.WithLabelValues(server)
		ts.rttVar = m.rttVar.WithLabelValues(server)
	}
	if have&tcpHasSegs != 0 {
		ts.segsOut = m.segsOut.WithLabelValues(server)
		ts.segsIn = m.segsIn.WithLabelValues(server)
		if have&tcpHasBase != 0 {
			ts.retransPct = m.retransPct.WithLabelValues(server)
		}
	}
	if have&tcpHasDataSegs != 0 {
		ts.dataSegsOut = m.dataSegsOut.WithLabelValues(server)
		ts.dataSegsIn = m.dataSegsIn.WithLabelValues(server)
	}
	if have&tcpHasNotsent != 0 {
		ts.notsent = m.notsent.WithLabelValues(server)
	}
	return ts
}

// add counts cur, of which prev has been counted already (the zero sample
// when nothing has): each counter by the difference, computed modulo 2^32
// as the kernel's counters wrap; each histogram one observation.
func (ts *tcpSeries) add(prev, cur *tcpSample) {
	addDelta(ts.segsOut, cur.segsOut-prev.segsOut)
	addDelta(ts.segsIn, cur.segsIn-prev.segsIn)
	addDelta(ts.dataSegsOut, cur.dataSegsOut-prev.dataSegsOut)
	addDelta(ts.dataSegsIn, cur.dataSegsIn-prev.dataSegsIn)
	addDelta(ts.retrans, cur.totalRetrans-prev.totalRetrans)
	if ts.rtt != nil {
		ts.rtt.Observe(float64(cur.rtt) / 1e6)
		ts.rttVar.Observe(float64(cur.rttVar) / 1e6)
	}
	// Only where segments went out since the last sample: an idle
	// connection's period has no percentage, not a 0% one.
	if sent := cur.segsOut - prev.segsOut; ts.retransPct != nil && sent > 0 {
		ts.retransPct.Observe(100 * float64(cur.totalRetrans-prev.totalRetrans) / float64(sent))
	}
}

// share adds s's share of the gauges, times sign (+1 or -1).
func (ts *tcpSeries) share(sign float64, s *tcpSample) {
	if ts.unacked != nil && s.unacked != 0 {
		ts.unacked.Add(sign * float64(s.unacked))
	}
	if ts.notsent != nil && s.notsent != 0 {
		ts.notsent.Add(sign * float64(s.notsent))
	}
}

func addDelta(c prometheus.Counter, d uint32) {
	if c != nil && d > 0 {
		c.Add(float64(d))
	}
}

// quiet reports whether a sample now would find nothing new: no byte has
// passed either way since the last one (active, Conn.lastActive, is what
// it was then), which had nothing unacknowledged or unsent. Such a
// connection's TCP_INFO changes only by keepalive probes (a segment each
// way per probe): they are counted by the next sample after traffic, or by
// the end, which add every difference since the last read. This keeps the
// samples of idle connections (a registrar's phones, most of the time) to
// no system call (BenchmarkScaleIdleCPUStats). While data is in flight, a
// dead peer's retransmissions, and the gauges, change without traffic: such
// a connection is read every period.
func (cs *connStats) quiet(active int64) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.ended || cs.last.have != 0 && cs.activeAt == active && cs.last.unacked == 0 && cs.last.notsent == 0
}

// sample counts cur, a sample of a living connection whose last activity
// was active, into ts: what changed since the last sample, and its gauges'
// share moved from the last one's. It counts nothing once the end has
// taken over.
func (cs *connStats) sample(ts *tcpSeries, cur *tcpSample, active int64) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.ended {
		return
	}
	ts.add(&cs.last, cur)
	if cs.into != nil {
		cs.into.share(-1, &cs.last)
	}
	ts.share(1, cur)
	cs.last, cs.into, cs.activeAt = *cur, ts, active
}

// takeOver marks the end: no sample counts after it. It returns what the
// samples counted, for the end to add only the rest, and where its gauges'
// share is.
func (cs *connStats) takeOver() (last tcpSample, into *tcpSeries) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.ended = true
	return cs.last, cs.into
}

// endTCP is the TCP side of an end: the last TCP_INFO and what the
// connection's samples counted before it.
type endTCP struct {
	last tcpSample // have == 0: no TCP_INFO could be read
	prev tcpSample
	into *tcpSeries
}

// takeTCPAtEnd reads c's last TCP_INFO, before its socket closes, and
// stops its sampling. It is the one TCP_INFO read an end adds.
func (c *Conn) takeTCPAtEnd() endTCP {
	var e endTCP
	if c.tcp != nil {
		e.last, _ = readTCPSample(c.tcp)
	}
	if c.statsIdx.Load() != 0 && c.reg != nil {
		if cs := c.reg.stats.take(c); cs != nil {
			e.prev, e.into = cs.takeOver()
		}
	}
	return e
}

// sampleTCP counts a sample of c, whose stats are cs, on its stats_period,
// into the series of
// its server in the metrics c reports to now; nothing, and no TCP_INFO
// read, when c has been quiet since its last sample.
func (c *Conn) sampleTCP(cs *connStats) {
	if c.tcp == nil || c.tracker == nil {
		return
	}
	// Read before TCP_INFO: activity between the two makes the next
	// sample read again.
	active := c.lastActive.Load()
	if cs.quiet(active) {
		return
	}
	sm := c.tracker.serverMetrics(c.tracker.sink().metrics, c)
	if sm == nil {
		return
	}
	cur, ok := readTCPSample(c.tcp)
	if !ok {
		return
	}
	cs.sample(sm.tcpSeries(cur.have), &cur, active)
}

// count adds the end to sm's series: the rest of the counters since the
// last sample, one observation of each histogram, and the gauges' share
// taken back.
func (e *endTCP) count(sm *serverMetrics) {
	if e.into != nil {
		e.into.share(-1, &e.prev)
	}
	if sm != nil && e.last.have != 0 {
		sm.tcpSeries(e.last.have).add(&e.prev, &e.last)
	}
}

// logFields returns the log fields of the last TCP_INFO, those the kernel
// has; none when it could not be read.
func (e *endTCP) logFields() []zap.Field {
	s := &e.last
	var f []zap.Field
	if s.have&tcpHasBase != 0 {
		f = append(f,
			zap.Uint32("rtt_us", s.rtt),
			zap.Uint32("rttvar_us", s.rttVar),
			zap.Uint32("total_retrans", s.totalRetrans),
			zap.Uint32("lost", s.lost),
			zap.Uint32("unacked", s.unacked))
	}
	if s.have&tcpHasBytes != 0 {
		f = append(f, zap.Uint64("bytes_acked", s.bytesAcked), zap.Uint64("bytes_received", s.bytesReceived))
	}
	return f
}

// addEventData adds the last TCP_INFO's fields to an end event's data, under
// the names of the log line.
func (e *endTCP) addEventData(data map[string]any) {
	s := &e.last
	if s.have&tcpHasBase != 0 {
		data["rtt_us"] = s.rtt
		data["rttvar_us"] = s.rttVar
		data["total_retrans"] = s.totalRetrans
		data["lost"] = s.lost
		data["unacked"] = s.unacked
	}
	if s.have&tcpHasBytes != 0 {
		data["bytes_acked"] = s.bytesAcked
		data["bytes_received"] = s.bytesReceived
	}
}

// setStatsPeriodLocked has the registry's sampler sample c on the
// stats_period in force, or no longer. A connection made by hand in a test
// (no registry) is not sampled. c.mu must be held.
func (c *Conn) setStatsPeriodLocked() {
	r := c.reg
	p := c.opts.StatsPeriod.Duration()
	if r == nil || p <= 0 && c.statsIdx.Load() == 0 {
		return // the common case, costs no lock
	}
	if r.stats.set(c, p) {
		r.startSweeper()
	}
}
