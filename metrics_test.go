package tcpops

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// scrape reads Caddy's /metrics admin endpoint and returns each series of
// the tcpops subsystem by its name and labels, the labels sorted
// (`name{a="x",b="y"}`), plus the set of metric names that have a HELP line.
func scrape(t testing.TB, admin string) (series map[string]float64, help map[string]bool) {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("scraping /metrics: status %d: %s", resp.StatusCode, b)
	}
	series, help = map[string]float64{}, map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			help[strings.Fields(rest)[0]] = true
			continue
		}
		if !strings.HasPrefix(line, "caddy_tcpops_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		series[canonicalSeries(line[:i])] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return series, help
}

// canonicalSeries sorts the labels of `name{b="y",a="x"}`.
func canonicalSeries(s string) string {
	name, labels, ok := strings.Cut(s, "{")
	if !ok {
		return s
	}
	parts := strings.Split(strings.TrimSuffix(labels, "}"), ",")
	sort.Strings(parts)
	return name + "{" + strings.Join(parts, ",") + "}"
}

func endedSeries(reason, cause string) string {
	return fmt.Sprintf(`caddy_tcpops_connections_ended_total{cause=%q,reason=%q,server="srv0"}`, cause, reason)
}

func TestMetricsAtAdminEndpoint(t *testing.T) {
	up := startUpstream(t, nil)
	admin := freePort(t)
	et := startEventsTestAdmin(t, admin, `{"handler":"tcpops","lifetime":"400ms"}`, up)

	idle := dial(t, et.addr)
	roundTrip(t, idle, "a")
	waitTracked(t, idle)
	busy := dial(t, et.addr)
	roundTrip(t, busy, "b")
	tcBusy := waitTracked(t, busy)
	// Keep busy busy past a few lifetimes, so its timer re-arms, while idle
	// expires.
	for range 6 {
		time.Sleep(100 * time.Millisecond) // the traffic pattern under test, not a wait
		roundTrip(t, busy, "b")
	}
	// busy must outlive what follows, however slow the machine: its
	// lifetime would close it 400ms after this last round trip, and the
	// socket option below could then not fail on it.
	tcBusy.update(&Options{Lifetime: Off()}, zap.NewNop())
	waitClosed(t, idle, 3*time.Second)

	var m map[string]float64
	eventually(t, 3*time.Second, "idle connection's end counted", func() bool {
		m, _ = scrape(t, admin)
		return m[endedSeries(ReasonTimeout, CauseLifetime)] == 1
	})
	m, help := scrape(t, admin)
	want := map[string]float64{
		`caddy_tcpops_connections_total{server="srv0"}`: 2,
		"caddy_tcpops_connections_open":                 1,
	}
	for _, ec := range endCauses {
		want[endedSeries(ec.reason, ec.cause)] = 0 // every series exists from the start
	}
	want[endedSeries(ReasonTimeout, CauseLifetime)] = 1
	// The duration histogram: the idle connection lived about 400ms.
	want[`caddy_tcpops_connection_duration_seconds_count{reason="timeout",server="srv0"}`] = 1
	want[`caddy_tcpops_connection_duration_seconds_bucket{le="1",reason="timeout",server="srv0"}`] = 1
	want[`caddy_tcpops_connection_duration_seconds_bucket{le="604800",reason="timeout",server="srv0"}`] = 1
	want[`caddy_tcpops_connection_duration_seconds_count{reason="closed",server="srv0"}`] = 0
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("%s missing from /metrics", k)
		} else if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
	if m["caddy_tcpops_lifetime_rearms_total"] < 1 {
		t.Errorf("caddy_tcpops_lifetime_rearms_total = %v, want >= 1", m["caddy_tcpops_lifetime_rearms_total"])
	}
	for _, name := range []string{"caddy_tcpops_connections_total", "caddy_tcpops_connections_open",
		"caddy_tcpops_connections_ended_total", "caddy_tcpops_lifetime_rearms_total", "caddy_tcpops_connection_duration_seconds"} {
		if !help[name] {
			t.Errorf("no HELP for %s", name)
		}
	}

	// A socket option that cannot be set: the socket was closed under a
	// PATCH (the admin API applies options the same way). A connection of
	// busy's tracker of its own: closing busy's socket would end busy at
	// once (the proxy's read fails, and its route ends it), racing the
	// update, which then had nothing to set.
	sock := socketPair(t)
	broken, _ := tcBusy.tracker.track(sock)
	_ = sock.Close()
	broken.update(&Options{Keepalive: &Keepalive{Count: 3}}, zap.NewNop())
	broken.end(ReasonClosed, CauseEOF)
	_ = busy.Close()
	m, help = scrape(t, admin)
	if got := m[`caddy_tcpops_sockopt_failures_total{option="RawConn.Control"}`]; got != 1 {
		t.Errorf("caddy_tcpops_sockopt_failures_total{option=\"RawConn.Control\"} = %v, want 1; have %v", got, m)
	}
	if !help["caddy_tcpops_sockopt_failures_total"] {
		t.Error("no HELP for caddy_tcpops_sockopt_failures_total")
	}
	waitClosed(t, busy, 3*time.Second)
	eventually(t, 3*time.Second, "open gauge back to 0", func() bool {
		m, _ = scrape(t, admin)
		return m["caddy_tcpops_connections_open"] == 0
	})
}

// A reload keeps tracked connections (caddy-l4 keeps proxied sessions):
// their ends are reported to the configuration running then, the open
// gauge neither leaks nor goes negative, and a stop closes what was kept.
func TestMetricsAndEventsAcrossReload(t *testing.T) {
	up := startUpstream(t, nil)
	admin := freePort(t)
	handler := `{"handler":"tcpops","lifetime":"1m","events":true}`
	et := startEventsTestAdmin(t, admin, handler, up)

	kept := dial(t, et.addr)
	roundTrip(t, kept, "a")
	tcKept := waitTracked(t, kept)
	stopped := dial(t, et.addr)
	roundTrip(t, stopped, "b")
	tcStopped := waitTracked(t, stopped)

	// Reload: the same server, another subscriber and log file.
	name2, rec2 := newRecorder(t)
	log2 := filepath.Join(t.TempDir(), "tcpops2.log")
	if err := caddy.Load([]byte(eventsConfig(et.addr, admin, name2, log2, handler, proxyTo(up.addr()))), true); err != nil {
		t.Fatal(err)
	}
	ac := caddy.ActiveContext()
	reg2 := ac.GetMetricsRegistry()
	if reg2 == et.reg {
		t.Fatal("no reload happened")
	}

	roundTrip(t, kept, "still here") // the reload did not end the session
	if trackedBy(kept) != tcKept {
		t.Fatal("connection no longer tracked after the reload")
	}
	m, _ := scrape(t, admin)
	if m["caddy_tcpops_connections_open"] != 2 || m[`caddy_tcpops_connections_total{server="srv0"}`] != 0 {
		t.Fatalf("after reload: open %v (want 2), total %v (want 0: a new registry)",
			m["caddy_tcpops_connections_open"], m[`caddy_tcpops_connections_total{server="srv0"}`])
	}

	if err := kept.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, kept, 3*time.Second)
	ev := rec2.waitEvent(t, tcKept.ID(), 3*time.Second)
	if ev.name != EventClosed || ev.data["cause"] != CauseEOF || ev.origin != "layer4.handlers.tcpops" {
		t.Errorf("event after reload: %s %v from %q", ev.name, ev.data, ev.origin)
	}
	if evs := et.rec.forConn(tcKept.ID()); len(evs) != 0 {
		t.Errorf("the unloaded configuration's subscriber got %+v", evs)
	}
	logEnd(t, log2, tcKept.ID())
	eventually(t, 3*time.Second, "end counted in the new registry", func() bool {
		m, _ = scrape(t, admin)
		return m[endedSeries(ReasonClosed, CauseEOF)] == 1
	})
	if m["caddy_tcpops_connections_open"] != 1 {
		t.Errorf("open %v after one of two ended, want 1", m["caddy_tcpops_connections_open"])
	}

	// Stop: the connection the unloaded configuration tracked is closed too.
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, stopped, 3*time.Second)
	ev = rec2.waitEvent(t, tcStopped.ID(), 3*time.Second)
	if ev.name != EventClosed || ev.data["cause"] != CauseShutdown {
		t.Errorf("event at stop: %s %v", ev.name, ev.data)
	}
	if n := endsCounted(t, reg2, ReasonClosed, CauseShutdown); n != 1 {
		t.Errorf("closed/shutdown counted %v, want 1", n)
	}
	if v, _ := metricValue(t, reg2, "caddy_tcpops_connections_open", nil); v != 0 {
		t.Errorf("open %v after stop, want 0", v)
	}
	waitRegistryEmpty(t)
}
