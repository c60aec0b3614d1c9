package tcpops

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// serverHistogram returns the histogram name of server srv0 in reg; nil
// when it has no such series.
func serverHistogram(t testing.TB, reg prometheus.Gatherer, name string) *dto.Histogram {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "server" && lp.GetValue() == "srv0" {
					return m.GetHistogram()
				}
			}
		}
	}
	return nil
}

// serverValue returns the counter or gauge name of server srv0 in reg, and
// whether the series exists.
func serverValue(t testing.TB, reg prometheus.Gatherer, name string) (float64, bool) {
	t.Helper()
	return metricValue(t, reg, name, map[string]string{"server": "srv0"})
}

// The counting of a sampled connection, with samples made up: each sample
// adds what changed since the last, the end adds the rest, and the totals
// are the end's figures once; the gauges hold the last sample's share while
// it lives, wherever it reports (a reload moves it to another
// configuration's series), and nothing after its end. A sample after the
// end counts nothing.
func TestConnStatsCountsEachSegmentOnce(t *testing.T) {
	regA, regB := prometheus.NewRegistry(), prometheus.NewRegistry()
	smA, smB := newMetrics(regA).forServer("srv0"), newMetrics(regB).forServer("srv0")
	all := tcpHasBase | tcpHasBytes | tcpHasSegs | tcpHasNotsent | tcpHasDataSegs
	sample := func(segsOut, retrans, unacked, notsent uint32) *tcpSample {
		return &tcpSample{have: all, segsOut: segsOut, segsIn: segsOut / 2, dataSegsOut: segsOut - 1, dataSegsIn: 1,
			totalRetrans: retrans, unacked: unacked, notsent: notsent, rtt: 1000, rttVar: 500}
	}
	value := func(reg *prometheus.Registry, name string) float64 {
		v, _ := serverValue(t, reg, name)
		return v
	}
	check := func(when string, reg *prometheus.Registry, sent, retrans, unacked, notsent float64) {
		t.Helper()
		for name, want := range map[string]float64{
			"caddy_tcpops_tcp_segments_sent_total":          sent,
			"caddy_tcpops_tcp_retransmitted_segments_total": retrans,
			"caddy_tcpops_tcp_unacked_segments":             unacked,
			"caddy_tcpops_tcp_unsent_bytes":                 notsent,
		} {
			if got := value(reg, name); got != want {
				t.Errorf("%s: %s = %v, want %v", when, name, got, want)
			}
		}
	}

	cs := new(connStats)
	cs.sample(smA.tcpSeries(all), sample(10, 1, 3, 100), 0)
	check("first sample", regA, 10, 1, 3, 100)
	cs.sample(smA.tcpSeries(all), sample(25, 2, 1, 0), 0)
	check("second sample", regA, 25, 2, 1, 0)
	// A reload: the connection now reports to B. Its counters go on
	// from what A has; its gauges' share moves.
	cs.sample(smB.tcpSeries(all), sample(30, 2, 4, 50), 0)
	check("after the reload, A", regA, 25, 2, 0, 0)
	check("after the reload, B", regB, 5, 0, 4, 50)

	last := sample(40, 3, 2, 7)
	prev, into := cs.takeOver()
	cs.sample(smB.tcpSeries(all), sample(99, 9, 9, 9), 0) // too late: the end has it
	end := endTCP{last: *last, prev: prev, into: into}
	end.count(smB)
	check("end, A", regA, 25, 2, 0, 0)
	check("end, B", regB, 15, 1, 0, 0)
	if total := value(regA, "caddy_tcpops_tcp_segments_sent_total") + value(regB, "caddy_tcpops_tcp_segments_sent_total"); total != float64(last.segsOut) {
		t.Errorf("segments sent in all %v, want the end's %d once", total, last.segsOut)
	}
	// Histograms: one observation per sample and one at the end.
	if n, _ := serverValue(t, regB, "caddy_tcpops_tcp_rtt_seconds"); n != 2 {
		t.Errorf("B's rtt observed %v times, want 2 (a sample and the end)", n)
	}
	// Retransmitted percent, between samples: 0 of 5 after the reload,
	// then 1 of 10 at the end.
	if h := serverHistogram(t, regB, "caddy_tcpops_tcp_retransmitted_percent"); h.GetSampleCount() != 2 || h.GetSampleSum() != 10 {
		t.Errorf("B's retransmitted percent: %d observations summing to %v, want 2 summing to 10 (0%% and 10%%)", h.GetSampleCount(), h.GetSampleSum())
	}
}

// A connection never sampled counts its whole TCP_INFO at its end, and the
// kernel's 32-bit counters are differenced modulo 2^32.
func TestConnStatsEndWithoutSamples(t *testing.T) {
	reg := prometheus.NewRegistry()
	sm := newMetrics(reg).forServer("srv0")
	all := tcpHasBase | tcpHasSegs
	end := endTCP{last: tcpSample{have: all, segsOut: 7, totalRetrans: 2, unacked: 5}}
	end.count(sm)
	if v, _ := serverValue(t, reg, "caddy_tcpops_tcp_segments_sent_total"); v != 7 {
		t.Errorf("segments sent %v, want 7", v)
	}
	if v, _ := serverValue(t, reg, "caddy_tcpops_tcp_unacked_segments"); v != 0 {
		t.Errorf("unacked gauge %v after an end of a connection never sampled, want 0", v)
	}
	cs := new(connStats)
	cs.sample(sm.tcpSeries(all), &tcpSample{have: all, segsOut: 1<<32 - 2}, 0)
	cs.sample(sm.tcpSeries(all), &tcpSample{have: all, segsOut: 3}, 0) // wrapped: 5 more
	if v, _ := serverValue(t, reg, "caddy_tcpops_tcp_segments_sent_total"); v != 7+1<<32-2+5 {
		t.Errorf("segments sent %v across the counter's wrap, want %v", v, 7+1<<32-2+5)
	}
}
