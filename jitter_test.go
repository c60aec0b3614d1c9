package tcpops

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The third case: with max_lifetime 4s, 200 connections opened
// together all closed within the same 20ms. With max_lifetime_jitter 50%
// each draws its own max_lifetime from [2s, 4s].
func TestJitterSpreadsMaxLifetime(t *testing.T) {
	const n = 200
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"tcpops","max_lifetime":"4s","max_lifetime_jitter":50}`},
		handlers: []string{respond("ok")},
	}.config())

	// Open them together, one request each, then leave them idle.
	conns := make([]net.Conn, n)
	dialed := make([]time.Time, n) // each connection's age is measured from here
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range conns {
		dialed[i] = time.Now()
		c := dial(t, addr)
		conns[i] = c
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(c, getKeepAlive); err != nil {
				errs <- err
				return
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				errs <- err
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = c.SetDeadline(time.Time{})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("request: %v", err)
	}

	// Every connection's own max_lifetime is in the range, and the admin
	// API would show it.
	for _, c := range conns[:10] {
		tc := waitTracked(t, c)
		info := connectionInfoOf(tc)
		if ms := *info.MaxLifetimeMs; ms < 2000 || ms > 4000 {
			t.Fatalf("connection %d: max_lifetime_ms %d, want within [2000, 4000]", tc.ID(), ms)
		}
	}

	// Wait for each close, in parallel.
	closed := make([]time.Duration, n)
	errs = make(chan error, n)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.SetReadDeadline(dialed[i].Add(10 * time.Second))
			_, err := c.Read(make([]byte, 1))
			if err == nil {
				errs <- fmt.Errorf("connection %d: unexpected data", i)
			}
			closed[i] = time.Since(dialed[i])
			// As a client does at the server's FIN: the graceful close
			// lingers until then (or 5s of quiet), and the registry
			// empties below only once every linger has ended.
			_ = c.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	slices.Sort(closed)
	p10, p50, p90 := closed[n/10], closed[n/2], closed[n*9/10]
	t.Logf("%d connections under max_lifetime 4s, jitter 50%%: first closed at %v, p10 %v, p50 %v, p90 %v, last %v",
		n, closed[0].Round(time.Millisecond), p10.Round(time.Millisecond), p50.Round(time.Millisecond),
		p90.Round(time.Millisecond), closed[n-1].Round(time.Millisecond))
	// The upper end has the slack of a timer on a loaded machine (a close
	// 211ms after 4s was seen at load average 19); the spread is bounded by
	// the percentiles below.
	if closed[0] < 1900*time.Millisecond || closed[n-1] > 4500*time.Millisecond {
		t.Fatalf("closes from %v to %v, want all within [1.9s, 4.5s]", closed[0], closed[n-1])
	}
	if p10 >= 2800*time.Millisecond || p90 <= 3200*time.Millisecond {
		t.Fatalf("p10 %v, p90 %v: not spread over [2s, 4s] (want p10 < 2.8s, p90 > 3.2s)", p10, p90)
	}
	waitRegistryEmpty(t)
}

// The draw itself: uniform over [max_lifetime × (1 − p), max_lifetime], the
// configured value a maximum; 0% draws max_lifetime, and no draw is 0 (no
// max_lifetime at all).
func TestDrawMaxLifetime(t *testing.T) {
	const ml = 10 * time.Second
	if got := drawMaxLifetime(ml, 0); got != ml {
		t.Fatalf("jitter 0%%: drew %v, want %v", got, ml)
	}
	if got := drawMaxLifetime(0, 50); got != 0 {
		t.Fatalf("no max_lifetime: drew %v, want 0", got)
	}
	for _, p := range []float64{10, 50, 100} {
		lo := time.Duration(float64(ml) * (1 - p/100))
		var buckets [10]int
		const draws = 20000
		for range draws {
			d := drawMaxLifetime(ml, p)
			if d < lo || d > ml || d <= 0 {
				t.Fatalf("jitter %v%%: drew %v, outside [%v, %v]", p, d, lo, ml)
			}
			buckets[min(9, int(float64(d-lo)/float64(ml-lo)*10))]++
		}
		// Uniform: each tenth of the range gets 2,000 ± 5 standard
		// deviations (about 212).
		for i, b := range buckets {
			if math.Abs(float64(b)-draws/10) > 5*math.Sqrt(draws*0.1*0.9) {
				t.Fatalf("jitter %v%%: tenth %d of the range drawn %d times of %d: not uniform (%v)", p, i, b, draws, buckets)
			}
		}
	}
	for _, p := range []float64{1, 50, 99.99999999999999, 100} {
		if got := drawMaxLifetime(math.MaxInt64, p); got <= 0 || got < time.Duration(float64(math.MaxInt64)*(1-p/100))-1e6 {
			t.Fatalf("the longest max_lifetime with %v%%: drew %v", p, got)
		}
	}
	for range 100 {
		if got := drawMaxLifetime(time.Nanosecond, 100); got != time.Nanosecond {
			t.Fatalf("1ns with 100%%: drew %v, want 1ns (0 would be no max_lifetime)", got)
		}
	}
}

// max_lifetime_jitter in the Caddyfile and in JSON: the forms taken, and
// the errors, each naming the option, the value and the range.
func TestJitterOptionForms(t *testing.T) {
	for _, tc := range []struct {
		block string
		want  float64
	}{
		{"max_lifetime_jitter 50%", 50},
		{"max_lifetime_jitter 12.5%", 12.5},
		{"max_lifetime_jitter 10", 10},
		{"max_lifetime_jitter 0%", 0},
		{"max_lifetime_jitter 100%", 100},
	} {
		var o Options
		if err := o.unmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.block + "\n}")); err != nil {
			t.Errorf("%s: %v", tc.block, err)
			continue
		}
		if o.MaxLifetimeJitter == nil || float64(*o.MaxLifetimeJitter) != tc.want {
			t.Errorf("%s: parsed %v, want %v", tc.block, o.MaxLifetimeJitter, tc.want)
		}
	}
	for _, tc := range []struct{ block, want string }{
		{"max_lifetime_jitter 150%", "tcpops: max_lifetime_jitter 150%: must be between 0% and 100%"},
		{"max_lifetime_jitter -1%", "tcpops: max_lifetime_jitter -1%: must be between 0% and 100%"},
		{"max_lifetime_jitter NaN", `max_lifetime_jitter: percentage "NaN": want a number of percent such as 10% or 12.5%`},
		{"max_lifetime_jitter 1e2", `percentage "1e2": want a number of percent`},
		{"max_lifetime_jitter lots", `percentage "lots": want a number of percent`},
		{"max_lifetime_jitter", "max_lifetime_jitter takes exactly one argument, a percentage such as 10%; got 0"},
		{"max_lifetime_jitter 10% 20%", "max_lifetime_jitter takes exactly one argument, a percentage such as 10%; got 2"},
		{"max_lifetime_jitter 10% {\nfoo\n}", "max_lifetime_jitter does not take a block"},
		{"max_lifetime_jitter 10%\nmax_lifetime_jitter 20%", "duplicate option 'max_lifetime_jitter'"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.block + "\n}"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.block, err, tc.want)
		}
	}

	for _, tc := range []struct {
		json string
		want float64
	}{
		{`{"max_lifetime_jitter":50}`, 50},
		{`{"max_lifetime_jitter":"50%"}`, 50},
		{`{"max_lifetime_jitter":"12.5"}`, 12.5},
		{`{"max_lifetime_jitter":0}`, 0},
	} {
		var h Handler
		if err := caddy.StrictUnmarshalJSON([]byte(tc.json), &h); err != nil {
			t.Errorf("%s: %v", tc.json, err)
			continue
		}
		if err := h.Validate(); err != nil || h.MaxLifetimeJitter == nil || float64(*h.MaxLifetimeJitter) != tc.want {
			t.Errorf("%s: got %v (%v), want %v", tc.json, h.MaxLifetimeJitter, err, tc.want)
		}
		if b, _ := json.Marshal(h.Options); !strings.Contains(string(b), fmt.Sprintf(`"max_lifetime_jitter":%v`, tc.want)) {
			t.Errorf("%s: marshals as %s, want a number of percent", tc.json, b)
		}
	}
	for _, tc := range []struct{ json, want string }{
		{`{"max_lifetime_jitter":101}`, "tcpops: max_lifetime_jitter 101%: must be between 0% and 100%"},
		{`{"max_lifetime_jitter":-0.5}`, "tcpops: max_lifetime_jitter -0.5%: must be between 0% and 100%"},
		{`{"max_lifetime_jitter":"half"}`, `percentage "half": want a number of percent`},
		{`{"max_lifetime_jitter":true}`, `tcpops: max_lifetime_jitter true: want a number of percent (10 is 10%) or a string such as "10%"`},
		{`{"max_lifetime_jitter":1e400}`, "tcpops: max_lifetime_jitter 1e400: must be between 0% and 100%"},
	} {
		var h Handler
		err := caddy.StrictUnmarshalJSON([]byte(tc.json), &h)
		if err == nil {
			err = h.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.json, err, tc.want)
		}
	}

	// The same at caddy adapt and at load (caddy validate), for the
	// listener wrapper.
	const want = "tcpops: max_lifetime_jitter 150%: must be between 0% and 100%"
	caddyfileText := "{\n\tservers {\n\t\tlistener_wrappers {\n\t\t\ttcpops {\n\t\t\t\tmax_lifetime 1h\n\t\t\t\tmax_lifetime_jitter 150%\n\t\t\t}\n\t\t}\n\t}\n}\n:8080 {\n\trespond ok\n}\n"
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), nil); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("caddy adapt: %v, want an error containing %q", err, want)
	}
	cfg := httpServer{
		listen:   freePort(t),
		wrappers: []string{`{"wrapper":"tcpops","max_lifetime":"1h","max_lifetime_jitter":150}`},
		handlers: []string{respond("ok")},
	}.config()
	err := caddy.Load([]byte(cfg), true)
	if err == nil {
		_ = caddy.Stop()
	}
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("load: %v, want an error containing %q", err, want)
	}
}

// In a caddy-l4 route jitter applies too: each connection is cut at its own
// drawn max_lifetime, within [max_lifetime × (1 − p), max_lifetime].
func TestJitterLayer4Route(t *testing.T) {
	const n = 20
	up := startUpstream(t, nil)
	addr := freePort(t)
	loadCaddy(t, l4Config(addr, `{"handler":"tcpops","max_lifetime":"1s","max_lifetime_jitter":"50%"}`, proxyTo(up.addr())))

	drawn := map[time.Duration]bool{}
	type conn struct {
		c      net.Conn
		tc     *Conn
		dialed time.Time
		ml     time.Duration
	}
	conns := make([]conn, n)
	for i := range conns {
		dialed := time.Now()
		c := dial(t, addr)
		roundTrip(t, c, "x")
		tc := waitTracked(t, c)
		tc.mu.Lock()
		ml := tc.maxLifetime
		tc.mu.Unlock()
		if ml < 500*time.Millisecond || ml > time.Second {
			t.Fatalf("connection %d drew max_lifetime %v, want within [500ms, 1s]", tc.ID(), ml)
		}
		drawn[ml] = true
		conns[i] = conn{c, tc, dialed, ml}
	}
	if len(drawn) < n/2 {
		t.Fatalf("%d connections drew only %d distinct max_lifetimes", n, len(drawn))
	}
	ages := make([]time.Duration, n)
	var wg sync.WaitGroup
	for i, cn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = cn.c.SetReadDeadline(cn.dialed.Add(5 * time.Second))
			_, _ = cn.c.Read(make([]byte, 1))
			ages[i] = time.Since(cn.dialed)
		}()
	}
	wg.Wait()
	for i, cn := range conns {
		// Closed at its own max_lifetime: not before, and within the
		// timer's lateness on a loaded machine.
		if ages[i] < cn.ml || ages[i] > cn.ml+300*time.Millisecond {
			t.Fatalf("connection %d closed at age %v, its max_lifetime %v", cn.tc.ID(), ages[i], cn.ml)
		}
		assertEnded(t, cn.tc, ReasonTimeout, CauseMaxLifetime)
	}
}

// The admin API shows each connection's own drawn max_lifetime; a PATCH
// that changes max_lifetime or its jitter draws again, and one whose range
// starts below the connection's age is refused (409): it could close the
// connection within the request.
func TestJitterAdminPatch(t *testing.T) {
	admin, id := layer4AdminConn(t, `{"handler":"tcpops","max_lifetime":"1h"}`)

	if ci := admin.get(id); *ci.MaxLifetimeMs != 3600000 {
		t.Fatalf("without jitter: max_lifetime_ms %d, want 3600000", *ci.MaxLifetimeMs)
	}
	ci := admin.patch(id, `{"max_lifetime_jitter":"50%"}`)
	if ms := *ci.MaxLifetimeMs; ms < 1800000 || ms > 3600000 || ci.Options.MaxLifetime.Duration() != time.Hour {
		t.Fatalf("jitter 50%% on 1h: max_lifetime_ms %d, options %s; want a drawn value within [1800000, 3600000] and the options' 1h kept",
			ms, mustJSON(ci.Options))
	}

	eventually(t, 5*time.Second, "connection 600ms old", func() bool { return admin.get(id).AgeMs >= 600 })
	status, body := admin.do(http.MethodPatch, fmt.Sprintf("/tcpops/connections/%d", id), `{"max_lifetime":"1s"}`)
	if want := "max_lifetime 1s with max_lifetime_jitter 50%: connection"; status != http.StatusConflict || !strings.Contains(string(body), want) ||
		!strings.Contains(string(body), "drawn from [500ms, 1s]") {
		t.Fatalf("PATCH max_lifetime 1s under jitter 50%% at 600ms: %d %s; want 409 naming the range [500ms, 1s]", status, body)
	}
	if ci := admin.get(id); ci.Options.MaxLifetime.Duration() != time.Hour {
		t.Fatalf("refused PATCH changed the options: %s", mustJSON(ci.Options))
	}
	ci = admin.patch(id, `{"max_lifetime":"1m","max_lifetime_jitter":0}`)
	if *ci.MaxLifetimeMs != 60000 {
		t.Fatalf("max_lifetime 1m, jitter 0: max_lifetime_ms %d, want 60000", *ci.MaxLifetimeMs)
	}
}

// layer4AdminConn runs a layer4 route with the tcpops handler (JSON) in
// front of an echo upstream, with the admin API on, and opens one
// connection through it; it returns the admin client and the connection's
// id.
func layer4AdminConn(t *testing.T, tcpops string) (*adminClient, uint64) {
	t.Helper()
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, tcpops+","+proxyTo(up.addr()))
	c := dial(t, addr)
	roundTrip(t, c, "x")
	return admin, waitTracked(t, c).ID()
}
