package tcpops

import (
	"bufio"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// drainHandlerServer is drainServer with the tcpops_drain handler in front
// of reverse_proxy, or without it.
func drainHandlerServer(t testing.TB, wrapper string, backend *slowBackend, withHandler bool) string {
	t.Helper()
	handlers := []string{reverseProxyTo(backend.addr)}
	if withHandler {
		handlers = append([]string{`{"handler":"tcpops_drain"}`}, handlers...)
	}
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"tcpops",` + wrapper + `}`},
		extra:    `"protocols":["h1","h2c"],`,
		handlers: handlers,
	}.config())
	return addr
}

// An HTTP/2 client that keeps streams in flight without pause never leaves
// its connection idle. Once, the listener wrapper alone could only cut it
// at max_lifetime_grace, with the streams then in flight (4 of 67 failed);
// tcpops_drain made Go's server send GOAWAY. Now the wrapper sends GOAWAY
// itself on h2c (h2close.go), and the two behave alike: the client opens a
// new connection for its next streams, and the old one closes once those
// in flight are done.
func TestDrainHandlerBusyHTTP2(t *testing.T) {
	const maxLifetime, grace = time.Second, time.Second
	for _, withHandler := range []bool{false, true} {
		name := map[bool]string{false: "wrapper alone", true: "with tcpops_drain"}[withHandler]
		t.Run(name, func(t *testing.T) {
			backend := startSlowBackend(t)
			addr := drainHandlerServer(t, fmt.Sprintf(`"max_lifetime":%d,"max_lifetime_grace":%d`, maxLifetime, grace), backend, withHandler)
			dc := newDrainClient(t, "h2c")

			// Four streams in flight at any time, for 2.5s: past
			// max_lifetime + grace.
			var wg sync.WaitGroup
			var ok, failed atomic.Int32
			var firstErr atomic.Value
			start := time.Now()
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Since(start) < 2500*time.Millisecond {
						if _, _, err := dc.post("http://" + addr + "/?delay=150ms&size=1000"); err != nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err.Error())
						} else {
							ok.Add(1)
						}
					}
				}()
			}
			wg.Wait()
			conns := dc.dialed()
			t.Logf("%s: %d requests answered, %d failed, over %d connections", name, ok.Load(), failed.Load(), len(conns))
			if e := firstErr.Load(); e != nil {
				t.Logf("first failure: %s", e)
			}
			first := conns[0]
			eventually(t, 3*time.Second, "first connection closed", func() bool { return !first.closedAt().IsZero() })
			closedAt := first.closedAt().Sub(first.dialed)
			if failed.Load() != 0 || len(conns) < 2 {
				t.Fatalf("%d requests failed over %d connections; want none, over more than one", failed.Load(), len(conns))
			}
			// Drained: GOAWAY at max_lifetime, closed once its last
			// streams (150ms) were answered, well before the grace ran out.
			if closedAt < maxLifetime || closedAt > maxLifetime+grace/2 {
				t.Fatalf("first connection closed at %v, want soon after its max_lifetime %v", closedAt, maxLifetime)
			}
		})
	}
}

// HTTP/1.1: the first response that ends past max_lifetime says
// Connection: close, so that the client does not send its next request on
// a connection about to close.
func TestDrainHandlerHTTP1ConnectionClose(t *testing.T) {
	const maxLifetime = time.Second
	backend := startSlowBackend(t)
	addr := drainHandlerServer(t, fmt.Sprintf(`"max_lifetime":%d`, maxLifetime), backend, true)
	dc := newDrainClient(t, "h1")

	// Requests of 300ms back to back: max_lifetime falls in the middle of
	// the fourth, not in the instant between two, when the wrapper would
	// close the idle connection with no response left to say so.
	start := time.Now()
	var closing []time.Duration // when the responses that said Connection: close came
	for time.Since(start) < 1900*time.Millisecond {
		resp, _, err := dc.post("http://" + addr + "/?delay=300ms&size=10")
		if err != nil {
			t.Fatalf("request at %v: %v", time.Since(start), err)
		}
		if resp.Close {
			closing = append(closing, time.Since(start))
		}
	}
	conns := dc.dialed()
	if len(conns) != len(closing)+1 || len(closing) == 0 {
		t.Fatalf("%d connections for %d responses with Connection: close (at %v); want one more connection than such responses",
			len(conns), len(closing), closing)
	}
	if at := closing[0]; at < maxLifetime || at > maxLifetime+500*time.Millisecond {
		t.Fatalf("first Connection: close at %v, want on the first response after max_lifetime %v", at, maxLifetime)
	}
}

// The directive takes nothing; the handler is ordered by the plugin.
func TestDrainHandlerCaddyfile(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"tcpops_drain now", `tcpops_drain: takes no arguments; got "now"`},
		{"tcpops_drain {\nfoo\n}", "tcpops_drain: takes no block"},
	} {
		err := new(DrainHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error containing %q", tc.input, err, tc.want)
		}
	}
	if err := new(DrainHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops_drain")); err != nil {
		t.Errorf("tcpops_drain alone: %v", err)
	}
}

// An error response written past max_lifetime (a 502 from reverse_proxy,
// Caddy's own or a handle_errors route's) says Connection: close too:
// Caddy writes it through its own ResponseWriter, after the handlers
// returned.
func TestDrainHandlerErrorResponses(t *testing.T) {
	const maxLifetime = 300 * time.Millisecond
	for _, handleErrors := range []bool{false, true} {
		t.Run(fmt.Sprintf("handle_errors=%v", handleErrors), func(t *testing.T) {
			backend := startSlowBackend(t)
			addr := freePort(t)
			extra := ""
			if handleErrors {
				extra = `"errors":{"routes":[{"handle":[{"handler":"static_response","status_code":503,"body":"handled"}]}]},`
			}
			loadCaddy(t, httpServer{
				listen:   addr,
				wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","max_lifetime":%d}`, maxLifetime)},
				extra:    extra,
				handlers: []string{`{"handler":"tcpops_drain"}`,
					fmt.Sprintf(`{"handler":"reverse_proxy","transport":{"protocol":"http","response_header_timeout":"700ms"},"upstreams":[{"dial":%q}]}`, backend.addr)},
			}.config())
			c := dial(t, addr)
			resp, _ := rawRequest(t, c, bufio.NewReader(c), "GET /?delay=2s HTTP/1.1\r\nHost: localhost\r\n\r\n")
			want := map[bool]int{false: http.StatusGatewayTimeout, true: 503}[handleErrors]
			if resp.StatusCode != want {
				t.Fatalf("status %d, want %d", resp.StatusCode, want)
			}
			if !resp.Close { // ReadResponse takes Connection: close out of the header into Close
				t.Fatalf("error response past max_lifetime: no Connection: close (header %v)", resp.Header)
			}
		})
	}
}
