package tcpops

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// This file tests the end of each connection as the operator sees it: the
// Caddy event, the log line and the metric, each reason produced for real.

func init() {
	caddy.RegisterModule(eventRecorder{})
}

// eventRecorder is a test-only events handler
// (events.handlers.tcpops_test_recorder): Caddy instantiates it from the
// config, so it finds the test's recorder by name.
type eventRecorder struct {
	Name string `json:"name"`
}

// recorders maps a recorder name in a test config to what it received.
var recorders sync.Map // string -> *recorded

type recordedEvent struct {
	name   string
	origin string
	data   map[string]any
}

type recorded struct {
	mu     sync.Mutex
	events []recordedEvent

	// sleep makes the recorder a slow subscriber: it takes this long per
	// event, until wake is closed (when the test ends).
	sleep time.Duration
	wake  chan struct{}
}

func (eventRecorder) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "events.handlers.tcpops_test_recorder",
		New: func() caddy.Module { return new(eventRecorder) },
	}
}

func (r *eventRecorder) Handle(_ context.Context, e caddy.Event) error {
	v, ok := recorders.Load(r.Name)
	if !ok {
		return nil
	}
	rec := v.(*recorded)
	if rec.sleep > 0 {
		select {
		case <-time.After(rec.sleep):
		case <-rec.wake:
		}
	}
	origin := ""
	if m := e.Origin(); m != nil {
		origin = string(m.CaddyModule().ID)
	}
	rec.mu.Lock()
	rec.events = append(rec.events, recordedEvent{name: e.Name(), origin: origin, data: e.Data})
	rec.mu.Unlock()
	return nil
}

var _ caddyevents.Handler = (*eventRecorder)(nil)

// newRecorder registers a recorder under a name unique to the test.
func newRecorder(t testing.TB) (string, *recorded) {
	t.Helper()
	name := fmt.Sprintf("%s-%d", t.Name(), time.Now().UnixNano())
	rec := &recorded{wake: make(chan struct{})}
	recorders.Store(name, rec)
	t.Cleanup(func() { close(rec.wake); recorders.Delete(name) })
	return name, rec
}

// forConn returns the events recorded for the connection id.
func (r *recorded) forConn(id uint64) []recordedEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []recordedEvent
	for _, e := range r.events {
		if v, ok := e.data["conid"].(uint64); ok && v == id {
			out = append(out, e)
		}
	}
	return out
}

// waitEvent waits for the one event of connection id.
func (r *recorded) waitEvent(t testing.TB, id uint64, within time.Duration) recordedEvent {
	t.Helper()
	eventually(t, within, fmt.Sprintf("event for connection %d", id), func() bool { return len(r.forConn(id)) > 0 })
	evs := r.forConn(id)
	if len(evs) != 1 {
		t.Fatalf("connection %d: %d events, want 1: %+v", id, len(evs), evs)
	}
	return evs[0]
}

// eventsTest is a running Caddy for one test: a layer4 server with a tcpops
// handler and a proxy, an events subscription to a recorder, and the
// tcpops log written as JSON to a file.
type eventsTest struct {
	addr    string // the layer4 server's address
	logFile string
	rec     *recorded
	origin  string               // the module reporting: layer4.handlers.tcpops when empty
	reg     *prometheus.Registry // the configuration's metrics registry
}

// eventsConfig returns the JSON config; admin is "" (disabled) or its listen
// address.
func eventsConfig(addr, admin, recorder, logFile string, handlers ...string) string {
	return eventsConfigServers(admin, recorder, logFile, srv0(addr, `"routes":[{"handle":[`+joinJSON(handlers)+`]}]`))
}

// srv0 is the JSON of the layer4 server srv0 listening on addr, with the
// rest of its fields (its routes, and any other) given whole.
func srv0(addr, server string) string {
	return fmt.Sprintf(`"srv0":{"listen":[%q],%s}`, addr, server)
}

// eventsConfigServers is eventsConfig with the layer4 app's servers (name:
// object pairs) given whole.
func eventsConfigServers(admin, recorder, logFile, servers string) string {
	adminJSON := `{"disabled":true}`
	if admin != "" {
		adminJSON = fmt.Sprintf(`{"listen":%q}`, admin)
	}
	return fmt.Sprintf(`{"admin":%s,
"logging":{"logs":{
	"default":{"level":"ERROR","exclude":["layer4.handlers.tcpops"]},
	"tcpops":{"level":"DEBUG","include":["layer4.handlers.tcpops"],"encoder":{"format":"json"},
		"writer":{"output":"file","filename":%q}}}},
"apps":{
	"events":{"subscriptions":[{"events":["tcp_closed","tcp_timeout","tcp_reset"],
		"handlers":[{"handler":"tcpops_test_recorder","name":%q}]}]},
	"layer4":{"servers":{%s}}}}`,
		adminJSON, logFile, recorder, servers)
}

// startEventsTest runs Caddy with tcpops (the handler JSON) in front of a
// proxy to up.
func startEventsTest(t *testing.T, tcpops string, up *upstream) *eventsTest {
	t.Helper()
	return startEventsTestAdmin(t, "", tcpops, up)
}

// startEventsTestAdmin is startEventsTest with Caddy's admin endpoint on
// admin ("" for none).
func startEventsTestAdmin(t *testing.T, admin, tcpops string, up *upstream) *eventsTest {
	t.Helper()
	return startEventsTestSlow(t, admin, tcpops, up, 0)
}

// startEventsTestSlow is startEventsTestAdmin with a subscriber that takes
// sleep per event.
func startEventsTestSlow(t *testing.T, admin, tcpops string, up *upstream, sleep time.Duration) *eventsTest {
	t.Helper()
	return startEventsTestServer(t, admin, `"routes":[{"handle":[`+tcpops+`,`+proxyTo(up.addr())+`]}]`, sleep)
}

// startEventsTestServer is startEventsTestSlow with the layer4 server's
// JSON after its listen address (its routes, its matching_timeout) given
// whole.
func startEventsTestServer(t *testing.T, admin, server string, sleep time.Duration) *eventsTest {
	t.Helper()
	addr := freePort(t)
	return startEventsTestServers(t, admin, srv0(addr, server), addr, sleep)
}

// startEventsTestServers is startEventsTestServer with the layer4 app's
// servers given whole (eventsConfigServers); addr is one's address.
func startEventsTestServers(t *testing.T, admin, servers, addr string, sleep time.Duration) *eventsTest {
	t.Helper()
	return startEventsTestApps(t, admin, servers, addr, sleep, "")
}

// startEventsTestApps is startEventsTestServers with more apps: apps is
// their JSON members, each followed by a comma ("" for none).
func startEventsTestApps(t *testing.T, admin, servers, addr string, sleep time.Duration, apps string) *eventsTest {
	t.Helper()
	waitRegistryEmpty(t)
	name, rec := newRecorder(t)
	rec.sleep = sleep
	et := &eventsTest{addr: addr, logFile: filepath.Join(t.TempDir(), "tcpops.log"), rec: rec}
	if admin != "" {
		// Caddy's Stop leaves the admin endpoint running: load one
		// without, after loadCaddy's Stop (cleanups run last added first).
		t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	}
	loadCaddy(t, strings.Replace(eventsConfigServers(admin, name, et.logFile, servers), `"apps":{`, `"apps":{`+apps, 1))
	ac := caddy.ActiveContext()
	et.reg = ac.GetMetricsRegistry()
	return et
}

// logEnd waits for the "connection ended" log line of connection id and
// returns it decoded.
func logEnd(t testing.TB, file string, id uint64) map[string]any {
	t.Helper()
	var line map[string]any
	eventually(t, 5*time.Second, fmt.Sprintf("log line for connection %d", id), func() bool {
		line = findLogEnd(t, file, id)
		return line != nil
	})
	return line
}

func findLogEnd(t testing.TB, file string, id uint64) map[string]any {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line not JSON: %q: %v", sc.Text(), err)
		}
		if m["msg"] == "tcpops: connection ended" && m["conid"] == float64(id) {
			return m
		}
	}
	return nil
}

// metricValue returns the sum of the counters or gauges name whose labels
// include labels (a histogram's count), and false when there is no such
// series.
func metricValue(t testing.TB, reg prometheus.Gatherer, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	found := false
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if hv, ok := have[k]; !ok || hv != v {
					continue series
				}
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			default:
				continue
			}
			found = true
		}
	}
	return sum, found
}

func endsCounted(t testing.TB, reg prometheus.Gatherer, reason, cause string) float64 {
	t.Helper()
	v, ok := metricValue(t, reg, "caddy_tcpops_connections_ended_total", map[string]string{"reason": reason, "cause": cause})
	if !ok {
		t.Fatalf("no series caddy_tcpops_connections_ended_total{reason=%q,cause=%q}", reason, cause)
	}
	return v
}

// checkEnd checks the event, the log line and the metric of connection tc,
// whose client side is client, against the reason and cause. It returns the
// event's data for further checks.
func (et *eventsTest) checkEnd(t *testing.T, client net.Conn, tc *Conn, reason, cause string, within time.Duration) map[string]any {
	t.Helper()
	id := tc.ID()
	ev := et.rec.waitEvent(t, id, within)
	// The documented names (docs/events.md), not eventName's: a test
	// that asked eventName would agree with any mistake in it.
	if want := map[string]string{"closed": "tcp_closed", "timeout": "tcp_timeout", "reset": "tcp_reset"}[reason]; ev.name != want {
		t.Errorf("event %q, want %q", ev.name, want)
	}
	origin := et.origin
	if origin == "" {
		origin = "layer4.handlers.tcpops"
	}
	if ev.origin != origin {
		t.Errorf("event origin %q, want %s", ev.origin, origin)
	}
	d := ev.data
	if d["reason"] != reason || d["cause"] != cause {
		t.Errorf("event reason/cause %v/%v, want %s/%s", d["reason"], d["cause"], reason, cause)
	}
	if d["remote"] != client.LocalAddr().String() || d["local"] != client.RemoteAddr().String() {
		t.Errorf("event remote/local %v/%v, want %v/%v", d["remote"], d["local"], client.LocalAddr(), client.RemoteAddr())
	}
	if d["server"] != "srv0" {
		t.Errorf("event server %v, want srv0", d["server"])
	}
	for _, k := range []string{"duration", "idle"} {
		if v, ok := d[k].(float64); !ok || v < 0 {
			t.Errorf("event %s %v: want seconds >= 0", k, d[k])
		}
	}
	if d["idle"].(float64) > d["duration"].(float64) {
		t.Errorf("event idle %v longer than duration %v", d["idle"], d["duration"])
	}

	line := logEnd(t, et.logFile, id)
	wantLevel := "info"
	if reason == ReasonClosed && cause == CauseEOF {
		wantLevel = "debug"
	}
	if line["level"] != wantLevel || line["logger"] != origin {
		t.Errorf("log level/logger %v/%v, want %s/%s", line["level"], line["logger"], wantLevel, origin)
	}
	for _, k := range []string{"reason", "cause", "remote", "local", "server"} {
		if line[k] != d[k] {
			t.Errorf("log %s %v, event says %v", k, line[k], d[k])
		}
	}
	for _, k := range []string{"bytes_in", "bytes_out"} {
		if line[k] != float64(d[k].(uint64)) {
			t.Errorf("log %s %v, event says %v", k, line[k], d[k])
		}
	}
	for _, k := range []string{"duration", "idle"} {
		if _, ok := line[k].(float64); !ok {
			t.Errorf("log %s %v: want seconds", k, line[k])
		}
	}

	if n := endsCounted(t, et.reg, reason, cause); n != 1 {
		t.Errorf("caddy_tcpops_connections_ended_total{reason=%q,cause=%q} = %v, want 1", reason, cause, n)
	}
	return d
}

func TestEndIdlePastLifetime(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","lifetime":"300ms","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	took := waitClosed(t, c, 3*time.Second)
	d := et.checkEnd(t, c, tc, ReasonTimeout, CauseLifetime, 3*time.Second)
	if d["bytes_in"] != uint64(5) || d["bytes_out"] != uint64(5) {
		t.Errorf("bytes in/out %v/%v, want 5/5", d["bytes_in"], d["bytes_out"])
	}
	if idle := d["idle"].(float64); idle < 0.3 {
		t.Errorf("idle %vs at the end, want at least the 300ms lifetime (client saw the close after %v)", idle, took)
	}
	if n, _ := metricValue(t, et.reg, "caddy_tcpops_connections_total", nil); n != 1 {
		t.Errorf("caddy_tcpops_connections_total = %v, want 1", n)
	}
}

func TestEndBusyPastMaxLifetime(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","lifetime":"200ms","max_lifetime":"700ms","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "x")
	tc := waitTracked(t, c)
	// Keep it busy: a byte each way every 40ms, well inside the lifetime.
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := []byte{'y'}
		for {
			if _, err := c.Write(b); err != nil {
				return
			}
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			time.Sleep(40 * time.Millisecond)
		}
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("busy connection not closed by max_lifetime")
	}
	d := et.checkEnd(t, c, tc, ReasonTimeout, CauseMaxLifetime, 3*time.Second)
	// tcpops' own duration at the close: one 200ms lifetime late would be
	// a max_lifetime seen only at the lifetime timer's next wake-up.
	if dur := d["duration"].(float64); dur < 0.7 || dur > (700*time.Millisecond+timerSlack).Seconds() {
		t.Errorf("duration %vs, want the 700ms max_lifetime", dur)
	}
	if idle := d["idle"].(float64); idle >= 0.2 {
		t.Errorf("idle %vs at the end of a busy connection", idle)
	}
	// The 200ms lifetime fired on traffic and was re-armed on the way.
	if n, _ := metricValue(t, et.reg, "caddy_tcpops_lifetime_rearms_total", nil); n < 1 {
		t.Errorf("caddy_tcpops_lifetime_rearms_total = %v, want >= 1", n)
	}
}

func TestEndPeerFIN(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, c, 3*time.Second) // the proxy ends the session: upstream EOF, then ours
	et.checkEnd(t, c, tc, ReasonClosed, CauseEOF, 3*time.Second)
}

func TestEndPeerReset(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	if err := c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	_ = c.Close() // SO_LINGER 0: the kernel sends RST, not FIN
	et.checkEnd(t, c, tc, ReasonReset, CauseReset, 3*time.Second)
}

func TestEndAdminClose(t *testing.T) {
	up := startUpstream(t, nil)
	admin := freePort(t)
	et := startEventsTestAdmin(t, admin, `{"handler":"tcpops","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	adminRequest(t, admin, http.MethodDelete, tc.ID(), "")
	waitClosed(t, c, 3*time.Second)
	et.checkEnd(t, c, tc, ReasonClosed, CauseAdmin, 3*time.Second)
}

// adminRequest sends a request about connection id to the admin API and
// requires 200 OK. The API answers once the change is done: a DELETE has
// closed the connection and reported its end.
func adminRequest(t testing.TB, admin, method string, id uint64, body string) {
	t.Helper()
	req, err := http.NewRequest(method, fmt.Sprintf("http://%s/tcpops/connections/%d", admin, id), strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s connection %d: status %d: %s", method, id, resp.StatusCode, b)
	}
}

func TestEndCaddyStopped(t *testing.T) {
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, c, 3*time.Second)
	et.checkEnd(t, c, tc, ReasonClosed, CauseShutdown, 3*time.Second)
	waitRegistryEmpty(t)
}

// Kamailio's closed_event 0 and 2: off by default, and switched on for one
// connection by a later tcpops or the admin API (tcp_enable_closed_event).
func TestEventsOffEmitsNothing(t *testing.T) {
	up := startUpstream(t, nil)
	admin := freePort(t)
	et := startEventsTestAdmin(t, admin, `{"handler":"tcpops","lifetime":"1m"}`, up)

	quiet := dial(t, et.addr)
	roundTrip(t, quiet, "a")
	tcQuiet := waitTracked(t, quiet)
	opted := dial(t, et.addr)
	roundTrip(t, opted, "b")
	tcOpted := waitTracked(t, opted)
	adminRequest(t, admin, http.MethodPatch, tcOpted.ID(), `{"events":true}`)

	// The DELETE queues the end's event before it answers, and one
	// goroutine delivers a module's events in order (events.go): once the
	// opted-in connection's event, queued second, has arrived, the quiet
	// one's would have arrived before it.
	adminRequest(t, admin, http.MethodDelete, tcQuiet.ID(), "")
	adminRequest(t, admin, http.MethodDelete, tcOpted.ID(), "")
	eventually(t, 5*time.Second, "the opted-in connection's event", func() bool {
		return len(et.rec.forConn(tcOpted.ID())) > 0
	})
	if evs := et.rec.forConn(tcOpted.ID()); len(evs) != 1 || evs[0].name != EventClosed {
		t.Fatalf("switched on for one connection: events %+v, want one tcp_closed", evs)
	}
	if evs := et.rec.forConn(tcQuiet.ID()); len(evs) != 0 {
		t.Fatalf("events off, yet emitted: %+v", evs)
	}
	// Logged and counted all the same.
	logEnd(t, et.logFile, tcQuiet.ID())
	if n := endsCounted(t, et.reg, ReasonClosed, CauseAdmin); n != 2 {
		t.Fatalf("closed/admin counted %v times, want 2", n)
	}
	if evs := et.rec.forConn(tcQuiet.ID()); len(evs) != 0 {
		t.Fatalf("events off, yet emitted: %+v", evs)
	}
}

func TestEventsMerge(t *testing.T) {
	on, off := true, false
	cases := []struct {
		name       string
		first, sec *bool
		want       *bool
	}{
		{"unset stays unset", nil, nil, nil},
		{"later on switches on", &off, &on, &on},
		{"later off switches off", &on, &off, &off},
		{"later unset keeps on", &on, nil, &on},
	}
	for _, tc := range cases {
		got := Options{Events: tc.first}.merge(Options{Events: tc.sec}).Events
		if (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestCaddyfileEvents(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "on", "off", or "" for unset
		err  string
	}{
		{in: "tcpops {\n events on\n}", want: "on"},
		{in: "tcpops {\n events off\n}", want: "off"},
		{in: "tcpops {\n lifetime 30\n}"},
		{in: "tcpops {\n events on\n events off\n}", err: "duplicate option 'events'"},
		{in: "tcpops {\n events\n}", err: "events takes exactly one argument, on or off; got 0"},
		{in: "tcpops {\n events on off\n}", err: "events takes exactly one argument, on or off; got 2"},
		{in: "tcpops {\n events yes\n}", err: `events "yes": want on or off`},
		{in: "tcpops {\n events on {\n x\n }\n}", err: "events does not take a block"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one containing %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		got := ""
		if h.Events != nil {
			got = map[bool]string{true: "on", false: "off"}[*h.Events]
		}
		if got != tc.want {
			t.Errorf("%q: events %q, want %q", tc.in, got, tc.want)
		}
	}
	var o Options
	b, _ := json.Marshal(Options{Events: new(bool)})
	if err := json.Unmarshal(b, &o); err != nil || o.Events == nil || *o.Events {
		t.Errorf("JSON round trip of events false: %s -> %v, %v", b, o.Events, err)
	}
}

// trackBench runs Caddy with the tcpops handler JSON, an events subscriber,
// and returns the handler's provisioned tracker and a loopback socket for
// it to track over and over.
func trackBench(b testing.TB, tcpops string) (*tracker, *net.TCPConn) {
	b.Helper()
	up := startUpstream(b, nil)
	name, _ := newRecorder(b)
	addr := freePort(b)
	cfg := eventsConfig(addr, "", name, filepath.Join(b.TempDir(), "tcpops.log"), tcpops, proxyTo(up.addr()))
	cfg = strings.Replace(cfg, `"level":"DEBUG"`, `"level":"INFO"`, 1) // closed/eof is logged at debug
	loadCaddy(b, cfg)
	c := dial(b, addr)
	roundTrip(b, c, "x")
	tr := waitTracked(b, c).tracker
	return tr, socketPair(b)
}

func eventsHandler(events string) string {
	switch events {
	case "off":
		return `{"handler":"tcpops","events":false}`
	case "on":
		return `{"handler":"tcpops","events":true}`
	}
	return `{"handler":"tcpops"}`
}

// With events off, tracking a connection and reporting its end allocates
// exactly what it does when events were never mentioned; with them on, the
// event costs allocations.
func TestEventsOffCostsNoAllocation(t *testing.T) {
	allocs := map[string]float64{}
	for _, events := range []string{"unset", "off", "on"} {
		t.Run("events="+events, func(t *testing.T) {
			tr, sock := trackBench(t, eventsHandler(events))
			allocs[events] = testing.AllocsPerRun(200, func() {
				c, _ := tr.track(sock)
				c.end(ReasonClosed, CauseEOF)
			})
			_ = caddy.Stop()
		})
	}
	t.Logf("allocations per tracked connection: %v", allocs)
	if allocs["off"] != allocs["unset"] || allocs["on"] <= allocs["off"] {
		t.Fatalf("allocations per tracked connection: %v; want off == unset < on", allocs)
	}
}

// BenchmarkTrackEvents tracks a connection and ends it, as every connection
// through tcpops is, with events unset, off and on. Unset and off must cost
// the same: no allocation for events.
//
//	go test -run '^$' -bench BenchmarkTrackEvents -benchmem .
func BenchmarkTrackEvents(b *testing.B) {
	for _, events := range []string{"unset", "off", "on"} {
		b.Run("events="+events, func(b *testing.B) {
			tr, sock := trackBench(b, eventsHandler(events))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				c, _ := tr.track(sock)
				c.end(ReasonClosed, CauseEOF)
			}
		})
	}
}

// The listener wrapper reports through the same path; its events name the
// HTTP server, found among several by the address that accepted the
// connection.
func TestListenerEndEvent(t *testing.T) {
	waitRegistryEmpty(t)
	name, rec := newRecorder(t)
	addr0, addr1 := freePort(t), freePort(t)
	server := func(addr string) string {
		return fmt.Sprintf(`{"listen":[%q],"listener_wrappers":[{"wrapper":"tcpops","events":true}],
			"automatic_https":{"disable":true},"routes":[{"handle":[{"handler":"static_response","body":"ok"}]}]}`, addr)
	}
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{
	"events":{"subscriptions":[{"events":["tcp_closed"],"modules":["caddy.listeners.tcpops"],
		"handlers":[{"handler":"tcpops_test_recorder","name":%q}]}]},
	"http":{"servers":{"srv0":%s,"srv1":%s}}}}`, name, server(addr0), server(addr1)))
	ac := caddy.ActiveContext()
	reg := ac.GetMetricsRegistry()

	c := dial(t, addr1)
	rawRequest(t, c, bufio.NewReader(c), getKeepAlive)
	tc := waitTracked(t, c)
	if err := c.CloseWrite(); err != nil { // the server reads EOF and closes
		t.Fatal(err)
	}
	waitClosed(t, c, 3*time.Second)

	ev := rec.waitEvent(t, tc.ID(), 3*time.Second)
	d := ev.data
	if ev.name != EventClosed || d["cause"] != CauseEOF || ev.origin != "caddy.listeners.tcpops" || d["server"] != "srv1" {
		t.Errorf("event %s from %q: %v; want tcp_closed/eof from caddy.listeners.tcpops, server srv1", ev.name, ev.origin, d)
	}
	if n := endsCounted(t, reg, ReasonClosed, CauseEOF); n != 1 {
		t.Errorf("closed/eof counted %v, want 1", n)
	}
}

// A subscriber that takes a second per event must not hold up tcpops:
// events are delivered from a queue, off the timer that closes the
// connection. Connections whose 300ms lifetimes expire within about a
// second close as late (by tcpops' own account in its log: the idle time at
// the close) as a control: the same number of connections to a second
// server of the same Caddy whose tcpops emits no events, opened alternately
// with the first, so that the load of the machine weighs on both alike.
// And Stop, which closes 20 more, delivers what it can within its wait and
// counts the rest as dropped instead of hanging for over a thousand
// seconds.
func TestSlowSubscriberDoesNotStall(t *testing.T) {
	up := startUpstream(t, nil)
	const lifetime, n = 300 * time.Millisecond, 600
	handler := func(events bool) string {
		return fmt.Sprintf(`{"handler":"tcpops","lifetime":%q,"events":%t}`, lifetime, events)
	}
	waitRegistryEmpty(t)
	name, rec := newRecorder(t)
	rec.sleep = time.Second
	et := &eventsTest{addr: freePort(t), logFile: filepath.Join(t.TempDir(), "tcpops.log"), rec: rec}
	controlAddr := freePort(t)
	config := eventsConfig(et.addr, "", name, et.logFile, handler(true), proxyTo(up.addr()))
	// A second layer4 server, srv1, after srv0: the config ends with the
	// servers, layer4, apps and root objects.
	config = strings.TrimSuffix(config, "}}}}") +
		fmt.Sprintf(`,"srv1":{"listen":[%q],"routes":[{"handle":[%s,%s]}]}}}}}`, controlAddr, handler(false), proxyTo(up.addr()))
	loadCaddy(t, config)
	ac := caddy.ActiveContext()
	et.reg = ac.GetMetricsRegistry()

	late := lifetimeLateness(t, et.logFile, n, lifetime, et.addr, controlAddr)
	slow, control := late["srv0"], late["srv1"]
	// The 90th percentile: the few latest closes of a run are the
	// machine's (a loaded 2-core machine delays some timers by more than
	// 50ms now and then, with or without a subscriber); a subscriber that
	// held up the closes would delay most of them by up to seconds.
	p90 := func(d []time.Duration) time.Duration { return d[len(d)*9/10] }
	t.Logf("%d lifetime closes each, lateness p90 / max: without events %.1f / %.1fms, with a slow subscriber %.1f / %.1fms",
		n, ms(p90(control)), ms(control[n-1]), ms(p90(slow)), ms(slow[n-1]))
	if p90(slow) > p90(control)+50*time.Millisecond {
		t.Fatalf("with a subscriber that takes 1s per event, 90%% of the lifetime closes came within %v of their lifetime; "+
			"without events, within %v: want at most 50ms more", p90(slow), p90(control))
	}

	// Connections still open when Caddy stops are closed by Stop, which
	// reports their ends one after the other: 20 of them would hold a
	// synchronous Stop for 20 seconds.
	const open = 20
	for range open {
		c := dial(t, et.addr)
		roundTrip(t, c, "y")
		waitTracked(t, c).update(&Options{Lifetime: Off()}, zap.NewNop())
	}

	stopped := make(chan struct{})
	start := time.Now()
	go func() { _ = caddy.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(eventsDrainTimeout + 5*time.Second):
		t.Fatalf("Stop still waiting %v after it began, with a subscriber that takes 1s per event", time.Since(start))
	}
	et.rec.mu.Lock()
	delivered := len(et.rec.events)
	et.rec.mu.Unlock()
	dropped, _ := metricValue(t, et.reg, "caddy_tcpops_events_dropped_total", nil)
	t.Logf("Stop took %v: %d events delivered, %v dropped", time.Since(start).Round(time.Millisecond), delivered, dropped)
	// One event may be in the subscriber's hands when Stop gives up: it is
	// delivered, but after dropped was counted.
	if total := delivered + int(dropped); total < n+open-1 || total > n+open || dropped == 0 {
		t.Fatalf("%d delivered + %v dropped, want %d in all, some dropped", delivered, dropped, n+open)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// lifetimeLateness opens n connections to each of addrs, alternately, each
// sending a byte, waits for all to be closed by their lifetime, and returns
// for each server (by name, from tcpops' log file), sorted, how long after
// the lifetime each was closed, by tcpops' own account (the idle time in
// its log line). It does not wait for the echo: on a loaded machine the
// lifetime may close a connection before its echo is back (a reset).
func lifetimeLateness(t *testing.T, logFile string, n int, lifetime time.Duration, addrs ...string) map[string][]time.Duration {
	t.Helper()
	var clients []*net.TCPConn
	for i := range n {
		for _, addr := range addrs {
			c := dial(t, addr)
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatalf("connection %d of %d to %s: write: %v", i+1, n, addr, err)
			}
			clients = append(clients, c)
		}
	}
	for _, c := range clients {
		waitClosed(t, c, 5*time.Second)
		_ = c.Close()
	}
	var late map[string][]time.Duration
	eventually(t, 10*time.Second, "every end logged", func() bool {
		late = map[string][]time.Duration{}
		f, err := os.Open(logFile)
		if err != nil {
			return false
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		ends := 0
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil || m["msg"] != "tcpops: connection ended" {
				continue
			}
			if m["cause"] != CauseLifetime {
				t.Fatalf("an end that is not the lifetime's: %s", sc.Text())
			}
			server, _ := m["server"].(string)
			late[server] = append(late[server], time.Duration(m["idle"].(float64)*float64(time.Second))-lifetime)
			ends++
		}
		return ends == n*len(addrs)
	})
	for server, d := range late {
		if len(d) != n {
			t.Fatalf("%d ends logged for server %q, want %d", len(d), server, n)
		}
		slices.Sort(d)
	}
	return late
}

// `events on` where nothing can receive an event warns at provision,
// naming the fix (issue 28: it emitted nothing and said nothing): no events
// app; and an events app with no subscription to tcpops' events, logging
// below debug. An events app with a subscription, or an empty one with
// debug logging (docs/events.md's way to watch them), does not warn.
func TestEventsOnWithoutEventsAppWarns(t *testing.T) {
	const warning = "tcpops: events on, but nothing in this configuration receives tcp_closed, tcp_timeout or tcp_reset: " +
		"add a global events block that subscribes to them (events { on tcp_timeout exec ... }, docs/events.md), " +
		"or, to see each event in the log, a global `events {}` block and the `debug` option"
	name, _ := newRecorder(t)
	subscribed := fmt.Sprintf(`"events":{"subscriptions":[{"events":["tcp_reset"],"handlers":[{"handler":"tcpops_test_recorder","name":%q}]}]},`, name)
	for _, tc := range []struct {
		name, events, level string
		warn                bool
	}{
		{"no events app", "", "INFO", true},
		{"no events app, debug", "", "DEBUG", true},
		{"an events app without a subscription", `"events":{},`, "INFO", true},
		{"an events app with a subscription", subscribed, "INFO", false},
		{"an empty events app and debug", `"events":{},`, "DEBUG", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logFile := filepath.Join(t.TempDir(), "caddy.log")
			addr := freePort(t)
			loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},
"logging":{"logs":{"default":{"level":%q,"writer":{"output":"file","filename":%q}}}},
"apps":{%s"layer4":{"servers":{"srv0":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops","events":true},{"handler":"echo"}]}]}}}}}`,
				tc.level, logFile, tc.events, addr))
			// The setup is real: the route tracks its connections.
			c := dial(t, addr)
			roundTrip(t, c, "hello")
			waitTracked(t, c)
			// Provision is over once the configuration serves: the
			// warning is in the log by now, or never.
			log, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			if got := bytes.Contains(log, []byte(warning)); got != tc.warn {
				t.Fatalf("warning logged: %v, want %v\n%s", got, tc.warn, log)
			}
		})
	}
}
