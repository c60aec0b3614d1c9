//go:build linux

package tcpops

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// tcpInfoOf reads c's TCP_INFO with x/sys's own getsockopt: the test's
// truth, independent of readTCPSample.
func tcpInfoOf(t testing.TB, c *net.TCPConn) *unix.TCPInfo {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ti *unix.TCPInfo
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		ti, gerr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return ti
}

// settled waits until every byte tc's server side sent has been
// acknowledged, want bytes in all, and returns its TCP_INFO then: with no
// traffic after it, nothing the end reads can differ from it.
func settled(t testing.TB, tc *Conn, want uint64) *unix.TCPInfo {
	t.Helper()
	var ti *unix.TCPInfo
	eventually(t, 5*time.Second, fmt.Sprintf("all %d bytes sent acknowledged", want), func() bool {
		ti = tcpInfoOf(t, tc.tcp)
		return ti.Unacked == 0 && ti.Bytes_acked == want
	})
	return ti
}

// The end's log line and event carry the connection's last TCP_INFO, each
// field checked against the truth: the byte counts the client sent and
// read, and the server side's TCP_INFO, read with x/sys
// once it had settled (no packet passes after it: the lifetime ends the
// idle connection). The TCP statistics count it once.
func TestEndCarriesLastTCPInfo(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","lifetime":"1500ms","events":true}`, up)
	c := dial(t, et.addr)
	payload := strings.Repeat("phone!", 500) // 3000 bytes, three segments or more each way
	roundTrip(t, c, payload)
	tc := waitTracked(t, c)
	n := uint64(len(payload))
	srv := settled(t, tc, n)
	if srv.Bytes_received != n {
		t.Fatalf("setup: the server side's TCP_INFO has bytes_received %d; the client sent %d", srv.Bytes_received, n)
	}

	d := et.checkEnd(t, c, tc, ReasonTimeout, CauseLifetime, 10*time.Second)
	line := logEnd(t, et.logFile, tc.ID())
	want := map[string]uint64{
		"rtt_us":         uint64(srv.Rtt),
		"rttvar_us":      uint64(srv.Rttvar),
		"total_retrans":  uint64(srv.Total_retrans),
		"lost":           uint64(srv.Lost),
		"unacked":        0,
		"bytes_acked":    n, // the echo the client read
		"bytes_received": n, // what the client sent
	}
	if srv.Rtt == 0 {
		t.Fatalf("setup: the server side's TCP_INFO has rtt 0 after %d bytes each way", n)
	}
	for k, w := range want {
		got, ok := d[k]
		if !ok {
			t.Errorf("event has no %s", k)
		} else if fmt.Sprint(got) != fmt.Sprint(w) {
			t.Errorf("event %s = %v, want %d", k, got, w)
		}
		if lv, ok := line[k].(float64); !ok || uint64(lv) != w {
			t.Errorf("log %s = %v, want %d", k, line[k], w)
		}
	}

	// Counted once, at the end: the totals are the end's TCP_INFO.
	checkCountersAre(t, et.reg, srv)
	for _, name := range []string{"caddy_tcpops_tcp_unsent_bytes", "caddy_tcpops_tcp_unacked_segments"} {
		if v, ok := serverValue(t, et.reg, name); !ok || v != 0 {
			t.Errorf("%s = %v (exists %v), want 0: no connection is sampled", name, v, ok)
		}
	}
	h := serverHistogram(t, et.reg, "caddy_tcpops_tcp_rtt_seconds")
	if h == nil || h.GetSampleCount() != 1 || h.GetSampleSum() != float64(srv.Rtt)/1e6 {
		t.Errorf("caddy_tcpops_tcp_rtt_seconds %v, want one observation of %gs", h, float64(srv.Rtt)/1e6)
	}
}

// With stats_period 1s, a connection alive for 5 seconds with traffic adds
// to the counters while open, several times; at its end the totals are its
// TCP_INFO once, not more. Without stats_period the same connection adds
// nothing until its end.
func TestStatsPeriodCountsWhileOpen(t *testing.T) {
	for _, period := range []string{"1s", ""} {
		t.Run("stats_period="+period, func(t *testing.T) {
			opts := `"lifetime":"2s"`
			if period != "" {
				opts += `,"stats_period":"` + period + `"`
			}
			up := startUpstream(t, nil)
			et := startEventsTest(t, `{"handler":"tcpops",`+opts+`}`, up)
			c := dial(t, et.addr)
			roundTrip(t, c, "hello")
			tc := waitTracked(t, c)
			if p := tc.opts.StatsPeriod.String(); period != "" && p != period {
				t.Fatalf("setup: stats_period in force %s, want %s", p, period)
			}
			// The server's series exist from its first connection on,
			// before any end, at zero.
			if v, ok := serverValue(t, et.reg, "caddy_tcpops_tcp_segments_sent_total"); !ok || period == "" && v != 0 {
				t.Errorf("caddy_tcpops_tcp_segments_sent_total = %v (exists %v) before any end, want a series at 0", v, ok)
			}
			sent := func() float64 {
				v, _ := serverValue(t, et.reg, "caddy_tcpops_tcp_segments_sent_total")
				return v
			}
			// Traffic every 250ms for 5s; the counter's values seen on
			// the way.
			var rises int
			last := sent()
			bytes := uint64(5)
			for start := time.Now(); time.Since(start) < 5*time.Second; {
				roundTrip(t, c, "ping")
				bytes += 4
				if v := sent(); v != last {
					if v < last {
						t.Fatalf("segments sent went down: %v after %v", v, last)
					}
					rises++
					last = v
				}
				time.Sleep(250 * time.Millisecond)
			}
			if tc.isEnded() {
				t.Fatal("setup: the connection ended while exchanging")
			}
			if period != "" && rises < 2 {
				t.Errorf("segments sent rose %d times while the connection was open for 5s, want 2 or more (stats_period 1s)", rises)
			}
			if period == "" && rises != 0 {
				t.Errorf("segments sent rose %d times while the connection was open, without stats_period", rises)
			}
			if period != "" {
				if h := serverHistogram(t, et.reg, "caddy_tcpops_tcp_rtt_seconds"); h.GetSampleCount() < 2 {
					t.Errorf("rtt observed %d times while open, want 2 or more", h.GetSampleCount())
				}
			}
			srv := settled(t, tc, bytes)
			waitClosed(t, c, 10*time.Second)
			if r, cause := tc.endedWith(); r != ReasonTimeout || cause != CauseLifetime {
				t.Fatalf("setup: ended %s/%s, want timeout/lifetime", r, cause)
			}
			eventually(t, 5*time.Second, "end counted", func() bool {
				return endsCounted(t, et.reg, ReasonTimeout, CauseLifetime) == 1
			})
			checkCountersAre(t, et.reg, srv)
			for _, name := range []string{"caddy_tcpops_tcp_unsent_bytes", "caddy_tcpops_tcp_unacked_segments"} {
				if v, _ := serverValue(t, et.reg, name); v != 0 {
					t.Errorf("%s = %v after the only connection ended, want 0", name, v)
				}
			}
		})
	}
}

// A kernel older than a TCP_INFO field answers a shorter struct: the field
// is left out of the sample, and its metric gets no series. 104 bytes is
// TCP_INFO up to tcpi_total_retrans (Linux 2.6 to 4.0); 120 adds
// bytes_acked and bytes_received (4.1); 128 segs_out and segs_in (4.2).
func TestTCPInfoShorterStructLeavesFieldsOut(t *testing.T) {
	var ti unix.TCPInfo
	ti.Rtt, ti.Total_retrans, ti.Bytes_acked, ti.Segs_out, ti.Notsent_bytes, ti.Data_segs_out = 7, 1, 2, 3, 4, 5
	base := uint32(unsafe.Offsetof(ti.Total_retrans) + 4)
	bytes := uint32(unsafe.Offsetof(ti.Bytes_received) + 8)
	segs := uint32(unsafe.Offsetof(ti.Segs_in) + 4)
	for _, tc := range []struct {
		n    uint32
		want tcpFields
	}{
		{base - 1, 0},
		{base, tcpHasBase},
		{bytes, tcpHasBase | tcpHasBytes},
		{segs, tcpHasBase | tcpHasBytes | tcpHasSegs},
		{uint32(unsafe.Sizeof(ti)), tcpHasBase | tcpHasBytes | tcpHasSegs | tcpHasNotsent | tcpHasDataSegs},
	} {
		s := tcpSampleOf(&ti, tc.n)
		if s.have != tc.want {
			t.Errorf("%d bytes: fields %05b, want %05b", tc.n, s.have, tc.want)
		}
		if tc.want&tcpHasSegs == 0 && s.segsOut != 0 || tc.want&tcpHasBytes == 0 && s.bytesAcked != 0 {
			t.Errorf("%d bytes: a field past the length was read: %+v", tc.n, s)
		}
	}
	if base != 104 {
		t.Errorf("TCP_INFO up to tcpi_total_retrans is %d bytes, want 104 (include/uapi/linux/tcp.h)", base)
	}

	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	sm := m.forServer("srv0")
	s := tcpSampleOf(&ti, base)
	end := endTCP{last: s}
	end.count(sm)
	if v, ok := serverValue(t, reg, "caddy_tcpops_tcp_retransmitted_segments_total"); !ok || v != 1 {
		t.Errorf("retransmitted segments %v (exists %v), want 1", v, ok)
	}
	for _, name := range []string{"caddy_tcpops_tcp_segments_sent_total", "caddy_tcpops_tcp_data_segments_sent_total",
		"caddy_tcpops_tcp_unsent_bytes", "caddy_tcpops_tcp_retransmitted_percent"} {
		if v, ok := serverValue(t, reg, name); ok {
			t.Errorf("%s = %v: a kernel without its field has it, want no series", name, v)
		}
	}
}

// tcpStatsNetns runs TestTCPStatsDelayAndLoss alone in a private network
// namespace: its qdisc and iptables rule on lo go with it.
var tcpStatsNetns = testutil.Netns{
	Env:     "TCPOPS_NETNS_CHILD",
	Tools:   []string{"tc", "iptables"},
	Timeout: 2 * time.Minute,
}

// bulkUpstream sends the client as many bytes as it asks for (a 4-byte
// big-endian count), then reads until the client's side ends.
func bulkUpstream(c net.Conn) {
	req := make([]byte, 4)
	if _, err := io.ReadFull(c, req); err != nil {
		return
	}
	_, _ = c.Write(make([]byte, binary.BigEndian.Uint32(req)))
	_, _ = io.Copy(io.Discard, c)
}

// run runs a command of the namespace's network set-up.
func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// The network's health, for real: on loopback in a private network
// namespace (MTU 1500 and no segmentation offload, as on a real link), a bulk transfer from Caddy to a
// client, three times. Clean: the RTT stays at loopback's (well under 5ms)
// and nothing is retransmitted. Behind a tbf rate limit (this kernel has no
// netem), the transfer fills its queue, whose delay the RTT takes on.
// With 2% of Caddy's segments dropped by iptables at random, the
// retransmission counter rises. Each end's rtt_us and total_retrans, in
// its event, are what the histogram and the counter gain.
func TestTCPStatsDelayAndLoss(t *testing.T) {
	if !tcpStatsNetns.Run(t) {
		return
	}
	// A real link's segments: loopback's 64 KiB MTU and GSO would send
	// the transfer in a few dozen packets, too few to drop 2% of.
	run(t, "ip", "link", "set", "lo", "mtu", "1500")
	run(t, "ip", "link", "set", "dev", "lo", "gso_max_size", "1500")
	up := startUpstream(t, bulkUpstream)
	et := startEventsTest(t, `{"handler":"tcpops","events":true}`, up)
	_, port, _ := net.SplitHostPort(et.addr)

	// transfer takes bulk bytes through Caddy and ends the connection
	// once all of it is acknowledged; it returns the end's event data and
	// how long the transfer took.
	transfer := func(bulk int) (map[string]any, time.Duration) {
		t.Helper()
		c := dial(t, et.addr)
		start := time.Now()
		if _, err := c.Write(binary.BigEndian.AppendUint32(nil, uint32(bulk))); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, bulk)); err != nil {
			t.Fatalf("reading the bulk transfer: %v", err)
		}
		took := time.Since(start)
		tc := waitTracked(t, c)
		settled(t, tc, uint64(bulk))
		_ = c.Close()
		return et.rec.waitEvent(t, tc.ID(), 10*time.Second).data, took
	}
	// The series exist from the server's first connection on; before it,
	// they count as empty.
	rtt := func() *dto.Histogram {
		if h := serverHistogram(t, et.reg, "caddy_tcpops_tcp_rtt_seconds"); h != nil {
			return h
		}
		return &dto.Histogram{}
	}
	retrans := func() float64 {
		v, _ := serverValue(t, et.reg, "caddy_tcpops_tcp_retransmitted_segments_total")
		return v
	}
	// observed checks that the end's rtt_us is what the histogram gained.
	observed := func(d map[string]any, before *dto.Histogram) float64 {
		t.Helper()
		us, ok := d["rtt_us"].(uint32)
		if !ok {
			t.Fatalf("end event has no rtt_us: %v", d)
		}
		after := rtt()
		if after.GetSampleCount() != before.GetSampleCount()+1 {
			t.Errorf("rtt histogram count %d, want %d", after.GetSampleCount(), before.GetSampleCount()+1)
		}
		if gained := after.GetSampleSum() - before.GetSampleSum(); abs(gained-float64(us)/1e6) > 1e-9 {
			t.Errorf("rtt histogram gained %gs, the end's rtt_us is %d", gained, us)
		}
		return float64(us) / 1e3
	}

	// Clean.
	bulk := 1 << 20
	h0, r0 := rtt(), retrans()
	d, took := transfer(bulk)
	clean := observed(d, h0)
	t.Logf("clean: %d bytes in %v, rtt %.3fms, total_retrans %v", bulk, took, clean, d["total_retrans"])
	// Loopback's values: an RTT well under a millisecond, and no loss;
	// but a loaded machine can delay an ACK past the tail loss probe's
	// timer (10ms at the least), whose probe the kernel counts as a
	// retransmission, as many times as it is delayed: the full race run
	// saw one, and one beside a cold build of Caddy saw four. So no bound
	// is put on the clean path's retransmissions, only that the counter
	// gains exactly the end's count; and its RTT is bounded by the one
	// thing the delayed path below must exceed, a segment's time on the
	// wire at 1 Mbit/s.
	const minDelay = 1500 * 8 * time.Second / 1_000_000
	cleanRetrans, _ := d["total_retrans"].(uint32)
	if clean >= ms(minDelay) || retrans()-r0 != float64(cleanRetrans) {
		t.Errorf("clean loopback: rtt %.3fms, total_retrans %v, counter %v -> %v; want under %.0fms, and counted once", clean, d["total_retrans"], r0, retrans(), ms(minDelay))
	}

	// Delay: 1 Mbit/s, with a queue of up to 200ms. Sending one
	// full-size segment (1500 bytes) takes 12ms at that rate, so every
	// data segment's RTT is 12ms or more, however short the queue in
	// front of it; the queue of a bulk transfer adds to that.
	run(t, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "4kb", "latency", "200ms")
	bulk = 256 << 10
	h1 := rtt()
	d, took = transfer(bulk)
	delayed := observed(d, h1)
	run(t, "tc", "qdisc", "del", "dev", "lo", "root")
	t.Logf("tbf 1mbit, latency 200ms: %d bytes in %v, rtt %.3fms, total_retrans %v", bulk, took, delayed, d["total_retrans"])
	if took < time.Second {
		t.Fatalf("setup: %d bytes took %v through a 1 Mbit/s limit, want 2s or so", bulk, took)
	}
	if delayed < ms(minDelay) {
		t.Errorf("rtt through a 1 Mbit/s limit: %.3fms, want %.0fms or more, one segment's time on the wire (clean: %.3fms)", delayed, ms(minDelay), clean)
	}
	if bucketCount(rtt(), 0.01) != bucketCount(h1, 0.01) {
		t.Errorf("the delayed rtt was counted at or under 10ms")
	}

	// Loss: 5% of Caddy's segments to the client dropped.
	run(t, "iptables", "-A", "INPUT", "-p", "tcp", "--sport", port, "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")
	bulk = 1 << 20
	h2, r2 := rtt(), retrans()
	d, took = transfer(bulk)
	lossy := observed(d, h2)
	out, _ := exec.Command("iptables", "-L", "INPUT", "-v", "-n", "-x").CombinedOutput()
	t.Logf("5%% loss: %d bytes in %v, rtt %.3fms, total_retrans %v, lost %v\n%s", bulk, took, lossy, d["total_retrans"], d["lost"], out)
	tr, _ := d["total_retrans"].(uint32)
	if tr <= cleanRetrans+5 {
		t.Errorf("total_retrans %d with 5%% of some 700 segments dropped (clean: %d), want far more", tr, cleanRetrans)
	}
	if got := retrans() - r2; got != float64(tr) {
		t.Errorf("retransmitted segments counter rose by %v, the end's total_retrans is %d", got, tr)
	}
	if v, ok := serverValue(t, et.reg, "caddy_tcpops_tcp_retransmitted_percent"); !ok || v != 3 {
		t.Errorf("retransmitted percent observed %v times, want 3 (one per end)", v)
	}
}

// bucketCount returns the cumulative count of h's bucket with upper bound le.
func bucketCount(h *dto.Histogram, le float64) uint64 {
	for _, b := range h.GetBucket() {
		if b.GetUpperBound() == le {
			return b.GetCumulativeCount()
		}
	}
	return 0
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}

// BenchmarkReadTCPSample is the TCP_INFO read an end adds, and each
// stats_period sample makes, on a real loopback socket.
//
//	go test -run '^$' -bench 'BenchmarkReadTCPSample|BenchmarkSampleTCP' -benchmem .
func BenchmarkReadTCPSample(b *testing.B) {
	sock := socketPair(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := readTCPSample(sock); !ok {
			b.Fatal("TCP_INFO not read")
		}
	}
}

// statsTracker returns a tracker that reports to a metrics registry of its
// own, as the one server srv0, with opts.
func statsTracker(opts *Options) *tracker {
	reg := prometheus.NewRegistry()
	t := &tracker{opts: opts, logger: zap.NewNop()}
	t.obs.registry, t.obs.metrics, t.obs.logger = reg, newMetrics(reg), t.logger
	t.obs.servers = []namedListen{{name: "srv0"}}
	return t
}

// sampledConn returns a connection on a real loopback socket (its server
// side), tracked in r by tr, whose options set stats_period.
func sampledConn(tb testing.TB, r *registry, tr *tracker) *Conn {
	sock := socketPair(tb)
	c := &Conn{Conn: sock, tcp: sock, start: time.Now(), tracker: tr}
	r.add(c)
	c.update(tr.opts, tr.logger)
	tb.Cleanup(func() { c.end(ReasonClosed, CauseEOF) })
	return c
}

// BenchmarkSampleTCP is one stats_period sample of a connection: with
// traffic since the last one, the TCP_INFO read and the metrics it adds
// to; quiet since (an idle connection), the check that skips both.
func BenchmarkSampleTCP(b *testing.B) {
	for _, traffic := range []bool{true, false} {
		b.Run(fmt.Sprintf("traffic=%v", traffic), func(b *testing.B) {
			tr := statsTracker(&Options{StatsPeriod: OptionalDuration(10 * time.Second)})
			c := sampledConn(b, quietRegistry(), tr)
			cs := c.reg.stats.stats(c)
			c.sampleTCP(cs)
			b.ReportAllocs()
			for b.Loop() {
				if traffic {
					c.lastActive.Add(1)
				}
				c.sampleTCP(cs)
			}
		})
	}
}

// A sample of a connection quiet since its last one (no byte either way,
// nothing in flight then) reads no TCP_INFO and counts nothing; one with
// traffic since, or with data in flight at the last one, reads and counts.
func TestStatsQuietConnectionIsNotRead(t *testing.T) {
	tr := statsTracker(&Options{StatsPeriod: OptionalDuration(10 * time.Second)})
	r := quietRegistry()
	c := sampledConn(t, r, tr)
	if r.stats.len() != 1 || r.stats.stats(c) == nil {
		t.Fatalf("setup: stats_period 10s did not make the connection sampled")
	}
	reads := func() uint64 {
		return serverHistogram(t, tr.obs.registry, "caddy_tcpops_tcp_rtt_seconds").GetSampleCount()
	}
	c.sampleTCP(c.reg.stats.stats(c))
	if n := reads(); n != 1 {
		t.Fatalf("the first sample observed the rtt %d times, want 1", n)
	}
	c.sampleTCP(c.reg.stats.stats(c))
	if n := reads(); n != 1 {
		t.Errorf("a sample of a quiet connection observed the rtt: %d observations, want still 1", n)
	}
	if _, err := c.Write([]byte("register")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the write acknowledged", func() bool { return tcpInfoOf(t, c.tcp).Unacked == 0 })
	sentBefore, _ := serverValue(t, tr.obs.registry, "caddy_tcpops_tcp_segments_sent_total")
	c.sampleTCP(c.reg.stats.stats(c))
	sent, _ := serverValue(t, tr.obs.registry, "caddy_tcpops_tcp_segments_sent_total")
	if n := reads(); n != 2 || sent <= sentBefore {
		t.Errorf("after a write: %d rtt observations (want 2), segments sent %v -> %v (want more)", n, sentBefore, sent)
	}
	// Data in flight at the last sample: the kernel may retransmit it
	// with no traffic through tcpops, so the next sample reads.
	cs := r.stats.stats(c)
	cs.mu.Lock()
	cs.last.unacked = 1
	cs.mu.Unlock()
	c.sampleTCP(c.reg.stats.stats(c))
	if n := reads(); n != 3 {
		t.Errorf("after a sample with data in flight: %d rtt observations, want 3", n)
	}
}

// BenchmarkScaleIdleCPUStats is the process's CPU while 18,000 tracked
// connections are idle and the real sweeper runs, without stats_period and
// with stats_period 10s, in % of a core, measured with getrusage over 10
// seconds (a whole period). A process here may hold 20,000 descriptors, and
// 18,000 connection pairs would take 36,000: the connections are simulated
// (scale_test.go), and each is given one of 1,000 real loopback sockets,
// so that every sweep check and every sample makes its real system call.
// Their due times are spread over the period, as connections that came
// over time have them. Run it with -benchtime 1x.
//
//	go test -run '^$' -bench BenchmarkScaleIdleCPUStats -benchtime 1x -count 3 .
func BenchmarkScaleIdleCPUStats(b *testing.B) {
	const n, sockets = 18_000, 1_000
	socks := make([]*net.TCPConn, sockets)
	for i := range socks {
		socks[i] = socketPair(b)
	}
	for _, period := range []time.Duration{0, 10 * time.Second} {
		b.Run(fmt.Sprintf("stats_period=%v", period), func(b *testing.B) {
			opts := *scaleOptions
			if period > 0 {
				opts.StatsPeriod = OptionalDuration(period)
			}
			r, tr := quietRegistry(), statsTracker(&opts)
			conns := make([]*Conn, n)
			for i := range conns {
				c := &Conn{Conn: &simConn{remote: simAddr(i), local: simLocal}, tcp: socks[i%sockets], start: time.Now(), tracker: tr}
				r.add(c)
				c.update(tr.opts, tr.logger)
				watchSim(r, c)
				conns[i] = c
			}
			if got := r.stats.len(); period > 0 && got != n || period == 0 && got != 0 {
				b.Fatalf("setup: %d connections sampled", got)
			}
			// The first sample of each reads its TCP_INFO; from then
			// on an idle connection's are quiet (connStats.quiet).
			for _, c := range conns {
				if cs := r.stats.stats(c); cs != nil {
					c.sampleTCP(cs)
				}
			}
			r.stats.mu.Lock()
			for i := range r.stats.list {
				r.stats.list[i].next = monoNow() + int64(1+i%10)*int64(time.Second)
			}
			r.stats.mu.Unlock()
			for b.Loop() {
				r.sweeping.Store(false)
				r.startSweeper()
				runtime.GC()
				before, start := cpuTime(b), time.Now()
				time.Sleep(10 * time.Second)
				used, wall := cpuTime(b)-before, time.Since(start)
				b.ReportMetric(100*used.Seconds()/wall.Seconds(), "%core")
			}
			// Stop the sweeper: it exits once nothing is watched or
			// sampled.
			for _, c := range conns {
				c.tcp = nil // the sockets are shared: ending must not close them
				c.end(ReasonClosed, CauseEOF)
			}
			for r.sweeping.Load() {
				time.Sleep(10 * time.Millisecond)
			}
			if h := serverHistogram(b, tr.obs.registry, "caddy_tcpops_tcp_rtt_seconds"); period > 0 && h.GetSampleCount() < n {
				b.Fatalf("rtt observed %d times, want the 18,000 first samples and the ends", h.GetSampleCount())
			}
		})
	}
}

// The registry's sweeper samples connections on their stats_period even
// when none is watched (a listener wrapper's, a terminal route's), and
// stops once the last sampled one has ended: no goroutine is left behind.
func TestSweeperSamplesUnwatchedConnections(t *testing.T) {
	tr := statsTracker(&Options{StatsPeriod: OptionalDuration(2 * time.Second)})
	r := newRegistry()
	c := sampledConn(t, r, tr)
	if r.watched.Load() != 0 || !r.sweeping.Load() {
		t.Fatalf("setup: %d watched, sweeper running %v; want none watched and a sweeper", r.watched.Load(), r.sweeping.Load())
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	// Due 2s after it was tracked: the sweeper's first wake-up (1s) has
	// nothing to do, and must keep running.
	eventually(t, 10*time.Second, "a sample by the sweeper", func() bool {
		h := serverHistogram(t, tr.obs.registry, "caddy_tcpops_tcp_rtt_seconds")
		return h.GetSampleCount() >= 1
	})
	c.end(ReasonClosed, CauseEOF)
	eventually(t, 10*time.Second, "the sweeper stopped", func() bool { return !r.sweeping.Load() })
}

// A connection whose stats_period is switched off (a later tcpops, a
// PATCH) is sampled no more, and its end still adds only what its samples
// had not counted: the totals are its TCP_INFO once.
func TestStatsPeriodOffKeepsWhatWasCounted(t *testing.T) {
	tr := statsTracker(&Options{StatsPeriod: OptionalDuration(10 * time.Second)})
	r := quietRegistry()
	c := sampledConn(t, r, tr)
	if _, err := c.Write([]byte("register")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the write acknowledged", func() bool { return tcpInfoOf(t, c.tcp).Unacked == 0 })
	c.sampleTCP(r.stats.stats(c))
	sampled, _ := serverValue(t, tr.obs.registry, "caddy_tcpops_tcp_segments_sent_total")
	if sampled == 0 {
		t.Fatal("setup: the sample counted no segment sent")
	}
	c.update(&Options{StatsPeriod: Off()}, tr.logger)
	// Traffic since the sample, so that a sample now would read and
	// count (it is not quiet).
	if _, err := c.Write([]byte("again")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the write acknowledged", func() bool { return tcpInfoOf(t, c.tcp).Unacked == 0 })
	r.stats.step(math.MaxInt64) // everything due: a connection still sampled would be
	if h := serverHistogram(t, tr.obs.registry, "caddy_tcpops_tcp_rtt_seconds"); h.GetSampleCount() != 1 {
		t.Errorf("rtt observed %d times after stats_period off, traffic and a sweep, want 1", h.GetSampleCount())
	}
	final := tcpInfoOf(t, c.tcp)
	c.end(ReasonClosed, CauseEOF)
	if v, _ := serverValue(t, tr.obs.registry, "caddy_tcpops_tcp_segments_sent_total"); v != float64(final.Segs_out) {
		t.Errorf("segments sent %v after the end, want its TCP_INFO's %d once (the sample had counted %v)", v, final.Segs_out, sampled)
	}
	if r.stats.len() != 0 || c.statsIdx.Load() != 0 {
		t.Errorf("the ended connection is still in the sampler (%d entries)", r.stats.len())
	}
}

// checkCountersAre checks that the server's TCP counters equal ti, one
// connection's TCP_INFO: what it added, counted once.
func checkCountersAre(t *testing.T, reg *prometheus.Registry, ti *unix.TCPInfo) {
	t.Helper()
	for name, w := range map[string]uint32{
		"caddy_tcpops_tcp_segments_sent_total":          ti.Segs_out,
		"caddy_tcpops_tcp_segments_received_total":      ti.Segs_in,
		"caddy_tcpops_tcp_data_segments_sent_total":     ti.Data_segs_out,
		"caddy_tcpops_tcp_data_segments_received_total": ti.Data_segs_in,
		"caddy_tcpops_tcp_retransmitted_segments_total": ti.Total_retrans,
	} {
		if v, ok := serverValue(t, reg, name); !ok || v != float64(w) {
			t.Errorf("%s = %v (exists %v), want %d: the connection's TCP_INFO, once", name, v, ok, w)
		}
	}
}
