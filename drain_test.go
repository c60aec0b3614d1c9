package tcpops

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// This file tests request-aware lifetimes and the graceful max_lifetime on
// a real in-process Caddy HTTP server, with the listener wrapper alone, in
// front of a reverse_proxy to a slow backend: the setup.

// slowBackend is an HTTP server that answers each request after the delay
// its query asks for (?delay=2s), with a body of the size it asks for
// (?size=65536), or with the status (?status=204) and a header X-Big of
// the size (?header=30000) it asks for, and counts the requests it got.
type slowBackend struct {
	addr     string
	requests atomic.Int32
}

func startSlowBackend(t testing.TB) *slowBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &slowBackend{addr: ln.Addr().String()}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		b.requests.Add(1)
		delay, _ := time.ParseDuration(r.URL.Query().Get("delay"))
		var size int
		_, _ = fmt.Sscan(r.URL.Query().Get("size"), &size)
		select {
		case <-time.After(delay): // the backend's work, the scenario under test
		case <-r.Context().Done():
			return
		}
		if n, _ := strconv.Atoi(r.URL.Query().Get("header")); n > 0 {
			w.Header().Set("X-Big", string(responseBody(n)))
		}
		if code, _ := strconv.Atoi(r.URL.Query().Get("status")); code > 0 {
			w.WriteHeader(code)
		}
		_, _ = w.Write(responseBody(size))
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return b
}

// responseBody is the body the slow backend sends: size bytes a client can
// check for truncation.
func responseBody(size int) []byte {
	return bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
}

// watchedConn is a client connection that records when its peer closed it
// (the first Read that failed).
type watchedConn struct {
	net.Conn
	dialed time.Time

	mu     sync.Mutex
	closed time.Time
}

func (c *watchedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.mu.Lock()
		if c.closed.IsZero() {
			c.closed = time.Now()
		}
		c.mu.Unlock()
	}
	return n, err
}

// closedAt returns when the peer closed the connection; zero while open.
func (c *watchedConn) closedAt() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// drainClient is an HTTP client speaking one protocol, HTTP/1.1 or h2c,
// whose connections the test can watch.
type drainClient struct {
	*http.Client
	mu    sync.Mutex
	conns []*watchedConn
}

func newDrainClient(t testing.TB, proto string) *drainClient {
	dc := new(drainClient)
	p := new(http.Protocols)
	switch proto {
	case "h1":
		p.SetHTTP1(true)
	case "h2c":
		p.SetUnencryptedHTTP2(true)
	default:
		t.Fatalf("unknown protocol %q", proto)
	}
	tr := &http.Transport{
		Protocols: p,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			wc := &watchedConn{Conn: c, dialed: time.Now()}
			dc.mu.Lock()
			dc.conns = append(dc.conns, wc)
			dc.mu.Unlock()
			return wc, nil
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	dc.Client = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	return dc
}

func (dc *drainClient) dialed() []*watchedConn {
	dc.mu.Lock()
	defer dc.mu.Unlock()
	return append([]*watchedConn(nil), dc.conns...)
}

// post sends a POST (which Go's client never sends again on its own) and
// reads the whole response.
func (dc *drainClient) post(url string) (*http.Response, []byte, error) {
	resp, err := dc.Post(url, "text/plain", strings.NewReader("payload"))
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// postResult is what post returned, and when.
type postResult struct {
	resp *http.Response
	body []byte
	err  error
	at   time.Time
}

// postTracked sends a POST in the background, waits until Caddy tracks its
// connection, and returns that connection and the result to come: the
// connection may end with the response, before a test could look it up.
func (dc *drainClient) postTracked(t testing.TB, url string) (*Conn, <-chan postResult) {
	t.Helper()
	result := make(chan postResult, 1)
	go func() {
		resp, body, err := dc.post(url)
		result <- postResult{resp, body, err, time.Now()}
	}()
	eventually(t, 3*time.Second, "connection dialed", func() bool { return len(dc.dialed()) > 0 })
	return waitTracked(t, dc.dialed()[0]), result
}

// await returns the result of a postTracked request.
func await(t testing.TB, result <-chan postResult) postResult {
	t.Helper()
	select {
	case r := <-result:
		return r
	case <-time.After(15 * time.Second):
		t.Fatal("request neither answered nor failed")
	}
	return postResult{}
}

// drainServer starts Caddy with the listener wrapper (the given JSON
// fields) in front of a reverse_proxy to backend, serving HTTP/1.1 and h2c
// as in the issue (protocols h1 h2c).
func drainServer(t testing.TB, wrapper string, backend *slowBackend) string {
	t.Helper()
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"tcpops",` + wrapper + `}`},
		extra:    `"protocols":["h1","h2c"],`,
		handlers: []string{reverseProxyTo(backend.addr)},
	}.config())
	return addr
}

// checkOneConn checks that exactly one connection was dialed and that the
// backend saw exactly one request: the client did not try again.
func checkOneConn(t testing.TB, dc *drainClient, backend *slowBackend) *watchedConn {
	t.Helper()
	conns := dc.dialed()
	if len(conns) != 1 || backend.requests.Load() != 1 {
		t.Fatalf("%d connections dialed and %d requests reached the backend; want 1 and 1 (no retry)", len(conns), backend.requests.Load())
	}
	return conns[0]
}

var drainProtos = []string{"h1", "h2c"}

// The first case: lifetime 1s cut a request waiting 2s for its
// backend. The lifetime now waits while a request is in flight, and counts
// from the moment the connection went idle.
func TestDrainLifetimeWaitsForRequest(t *testing.T) {
	for _, proto := range drainProtos {
		t.Run(proto, func(t *testing.T) {
			const lifetime = time.Second
			backend := startSlowBackend(t)
			addr := drainServer(t, fmt.Sprintf(`"lifetime":%d`, lifetime), backend)
			dc := newDrainClient(t, proto)

			resp, body, err := dc.post("http://" + addr + "/?delay=2s&size=70000")
			if err != nil {
				t.Fatalf("request waiting 2s under lifetime 1s: %v", err)
			}
			done := time.Now()
			if resp.StatusCode != http.StatusOK || !bytes.Equal(body, responseBody(70000)) {
				t.Fatalf("response %d with %d body bytes, want 200 with 70000", resp.StatusCode, len(body))
			}
			if want := map[string]int{"h1": 1, "h2c": 2}[proto]; resp.ProtoMajor != want {
				t.Fatalf("response over %s, want HTTP/%d", resp.Proto, want)
			}
			wc := checkOneConn(t, dc, backend)
			tc := waitTracked(t, wc)

			// Idle now: the lifetime runs from here, and closes it.
			eventually(t, 3*time.Second, "connection closed by the client's view", func() bool { return !wc.closedAt().IsZero() })
			idle := wc.closedAt().Sub(done)
			t.Logf("%s: 2s request completed under lifetime 1s; idle connection closed %v after the response", proto, idle)
			if idle < lifetime-50*time.Millisecond || idle > lifetime+quietWindow+400*time.Millisecond {
				t.Fatalf("closed %v after the response, want the %v lifetime", idle, lifetime)
			}
			assertEnded(t, tc, ReasonTimeout, CauseLifetime)
		})
	}
}

// The second case: max_lifetime cut a request in flight. Now the
// request finishes on the same connection, and the connection closes right
// after it.
func TestDrainMaxLifetimeLetsRequestFinish(t *testing.T) {
	for _, proto := range drainProtos {
		t.Run(proto, func(t *testing.T) {
			const maxLifetime = time.Second
			backend := startSlowBackend(t)
			addr := drainServer(t, fmt.Sprintf(`"max_lifetime":%d`, maxLifetime), backend)
			dc := newDrainClient(t, proto)

			tc, result := dc.postTracked(t, "http://"+addr+"/?delay=2s&size=70000")
			r := await(t, result)
			if r.err != nil {
				t.Fatalf("request spanning max_lifetime: %v", r.err)
			}
			done := r.at
			if r.resp.StatusCode != http.StatusOK || !bytes.Equal(r.body, responseBody(70000)) {
				t.Fatalf("response %d with %d body bytes, want 200 with 70000", r.resp.StatusCode, len(r.body))
			}
			wc := checkOneConn(t, dc, backend)
			if took := done.Sub(wc.dialed); took < 2*time.Second {
				t.Fatalf("response after %v: the request did not span max_lifetime", took)
			}
			eventually(t, 3*time.Second, "connection closed by the client's view", func() bool { return !wc.closedAt().IsZero() })
			after := wc.closedAt().Sub(done)
			t.Logf("%s: request spanning max_lifetime %v completed; connection closed %v after the response", proto, maxLifetime, after)
			if after > quietWindow+400*time.Millisecond {
				t.Fatalf("connection closed %v after the response, want right after it", after)
			}
			assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
		})
	}
}

// A request longer than max_lifetime + max_lifetime_grace is cut when the
// grace runs out.
func TestDrainGraceCutsLongRequest(t *testing.T) {
	for _, proto := range drainProtos {
		t.Run(proto, func(t *testing.T) {
			const maxLifetime, grace = time.Second, time.Second
			backend := startSlowBackend(t)
			addr := drainServer(t, fmt.Sprintf(`"max_lifetime":%d,"max_lifetime_grace":%d`, maxLifetime, grace), backend)
			dc := newDrainClient(t, proto)

			tc, result := dc.postTracked(t, "http://"+addr+"/?delay=5s&size=100")
			err := await(t, result).err
			if err == nil {
				t.Fatal("a 5s request survived max_lifetime 1s and grace 1s")
			}
			wc := checkOneConn(t, dc, backend)
			eventually(t, 3*time.Second, "connection closed by the client's view", func() bool { return !wc.closedAt().IsZero() })
			at := wc.closedAt().Sub(wc.dialed)
			t.Logf("%s: 5s request cut %v after the connection opened (%v): %v", proto, at, maxLifetime+grace, err)
			if d := at - (maxLifetime + grace); d < -300*time.Millisecond || d > 300*time.Millisecond {
				t.Fatalf("cut %v after the connection opened, want %v ± 300ms", at, maxLifetime+grace)
			}
			assertEnded(t, tc, ReasonTimeout, CauseMaxLifetimeGrace)
		})
	}
}

// A WebSocket's upgrade request is in flight until the WebSocket ends: past
// max_lifetime it may go on for the grace, then it is cut, busy or not.
func TestDrainGraceCutsWebSocket(t *testing.T) {
	const maxLifetime, grace = 500 * time.Millisecond, 500 * time.Millisecond
	up := startUpstream(t, upgradeBackend)
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","max_lifetime":%d,"max_lifetime_grace":%d}`, maxLifetime, grace)},
		handlers: []string{reverseProxyTo(up.addr())},
	}.config())
	ac := caddy.ActiveContext()
	reg := ac.GetMetricsRegistry()

	dialed := time.Now()
	c := dial(t, addr)
	upgrade(t, c)
	tc := waitTracked(t, c)
	// Traffic past max_lifetime: the WebSocket is drained, not cut.
	for time.Since(dialed) < maxLifetime+grace/2 {
		roundTrip(t, c, "ping")
		time.Sleep(50 * time.Millisecond) // the pace of the traffic
	}
	waitClosed(t, c, 3*time.Second)
	if at := time.Since(dialed); at < maxLifetime+grace || at > maxLifetime+grace+300*time.Millisecond {
		t.Fatalf("WebSocket cut %v after it opened, want %v (+300ms)", at, maxLifetime+grace)
	}
	assertEnded(t, tc, ReasonTimeout, CauseMaxLifetimeGrace)
	eventually(t, 3*time.Second, "end counted", func() bool {
		return endsCounted(t, reg, ReasonTimeout, CauseMaxLifetimeGrace) == 1
	})
}

// max_lifetime_grace: the forms taken, the errors, and the layer4 handler
// refusing it with the reason, at adapt time and at load time.
func TestDrainGraceOption(t *testing.T) {
	for _, tc := range []struct {
		block string
		want  OptionalDuration
	}{
		{"max_lifetime_grace 45s", OptionalDuration(45 * time.Second)},
		{"max_lifetime_grace 2", OptionalDuration(2 * time.Second)},
		{"max_lifetime_grace off", Off()},
	} {
		var lw ListenerWrapper
		if err := lw.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.block + "\n}")); err != nil {
			t.Errorf("%s: %v", tc.block, err)
		} else if lw.MaxLifetimeGrace != tc.want {
			t.Errorf("%s: parsed %v, want %v", tc.block, lw.MaxLifetimeGrace, tc.want)
		}
	}
	for _, tc := range []struct{ block, want string }{
		{"max_lifetime_grace 0", "tcpops: max_lifetime_grace 0: must be between 1ms and 3650d (87600h), or off"},
		{"max_lifetime_grace -5s", "tcpops: max_lifetime_grace -5s: must be between 1ms and 3650d (87600h), or off"},
		{"max_lifetime_grace soon", `max_lifetime_grace: duration "soon"`},
		{"max_lifetime_grace 1s 2s", "max_lifetime_grace takes exactly one argument, a duration or off; got 2"},
	} {
		var lw ListenerWrapper
		err := lw.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.block + "\n}"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want one containing %q", tc.block, err, tc.want)
		}
	}
	var lw ListenerWrapper
	if err := caddy.StrictUnmarshalJSON([]byte(`{"max_lifetime_grace":500}`), &lw); err == nil ||
		!strings.Contains(err.Error(), `tcpops: max_lifetime_grace 500: a JSON number is nanoseconds, so this is 500ns, below the 1ms minimum; for 500 seconds write "500s"`) {
		t.Errorf("JSON grace of 500ns: %v", err)
	}

	const why = "tcpops: max_lifetime_grace 10s: not available in a layer4 route: caddy-l4 routes have no requests to wait for"
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\nmax_lifetime 1h\nmax_lifetime_grace 10s\n}")); err == nil || !strings.Contains(err.Error(), why) {
		t.Errorf("handler with max_lifetime_grace in the Caddyfile: %v, want %q", err, why)
	}
	caddyfileText := "{\n\tlayer4 {\n\t\t:7000 {\n\t\t\troute {\n\t\t\t\ttcpops {\n\t\t\t\t\tmax_lifetime_grace 10s\n\t\t\t\t}\n\t\t\t}\n\t\t}\n\t}\n}\n"
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), nil); err == nil || !strings.Contains(err.Error(), why) {
		t.Errorf("caddy adapt of a layer4 route with max_lifetime_grace: %v, want %q", err, why)
	}
	err := caddy.Load([]byte(l4Config(freePort(t), `{"handler":"tcpops","max_lifetime_grace":"10s"}`)), true)
	if err == nil {
		_ = caddy.Stop()
	}
	if err == nil || !strings.Contains(err.Error(), why) {
		t.Errorf("loading a layer4 route with max_lifetime_grace: %v, want %q", err, why)
	}
}

// PATCH max_lifetime_grace is refused (409) on a connection no HTTP server
// serves: it has no requests to wait for.
func TestDrainGraceAdminPatchLayer4(t *testing.T) {
	admin, id := layer4AdminConn(t, `{"handler":"tcpops","max_lifetime":"1h"}`)
	status, body := admin.do(http.MethodPatch, fmt.Sprintf("/tcpops/connections/%d", id), `{"max_lifetime_grace":"5s"}`)
	if want := fmt.Sprintf("max_lifetime_grace 5s: connection %d is not served by an HTTP server", id); status != http.StatusConflict || !strings.Contains(string(body), want) {
		t.Fatalf("PATCH grace on a layer4 connection: %d %s, want 409 containing %q", status, body, want)
	}
	if ci := admin.get(id); ci.Options.MaxLifetimeGrace.IsSet() {
		t.Fatalf("refused PATCH changed the options: %s", mustJSON(ci.Options))
	}
}

// PATCH max_lifetime_grace on an HTTP connection bounds a drain under way
// from its max_lifetime; one that would cut the connection at once is
// refused (409).
func TestDrainGraceAdminPatch(t *testing.T) {
	const maxLifetime = 300 * time.Millisecond
	backend := startSlowBackend(t)
	addr, adminAddr := freePort(t), freePort(t)
	cfg := httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","max_lifetime":%d}`, maxLifetime)},
		extra:    `"protocols":["h1","h2c"],`,
		handlers: []string{reverseProxyTo(backend.addr)},
	}.config()
	loadCaddy(t, strings.Replace(cfg, `"admin":{"disabled":true}`, fmt.Sprintf(`"admin":{"listen":%q,"config":{"persist":false}}`, adminAddr), 1))
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	admin := &adminClient{t: t, base: "http://" + adminAddr, http: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
	patchPath := func(id uint64) string { return fmt.Sprintf("/tcpops/connections/%d", id) }

	dc := newDrainClient(t, "h2c")
	tc, result := dc.postTracked(t, "http://"+addr+"/?delay=5s&size=100")
	eventually(t, 3*time.Second, "a request in flight past max_lifetime", func() bool {
		tc.mu.Lock()
		defer tc.mu.Unlock()
		return tc.http.phase == httpActive && tc.since() > maxLifetime+200*time.Millisecond
	})
	status, body := admin.do(http.MethodPatch, patchPath(tc.ID()), `{"max_lifetime_grace":"100ms"}`)
	if want := "has been draining since its max_lifetime 300ms"; status != http.StatusConflict || !strings.Contains(string(body), want) {
		t.Fatalf("PATCH a grace already run out: %d %s, want 409 containing %q", status, body, want)
	}
	ci := admin.patch(tc.ID(), `{"max_lifetime_grace":"1500ms"}`)
	if ci.Options.MaxLifetimeGrace != OptionalDuration(1500*time.Millisecond) {
		t.Fatalf("PATCH answer: %s", mustJSON(ci.Options))
	}
	// The request is cut at max_lifetime + the patched grace, not the
	// default 30s.
	if err := await(t, result).err; err == nil {
		t.Fatal("5s request survived max_lifetime 300ms and a patched grace of 1.5s")
	}
	wc := dc.dialed()[0]
	if at := wc.closedAt().Sub(wc.dialed); at < maxLifetime+1500*time.Millisecond || at > maxLifetime+1500*time.Millisecond+300*time.Millisecond {
		t.Fatalf("cut %v after it opened, want %v (+300ms)", at, maxLifetime+1500*time.Millisecond)
	}
	assertEnded(t, tc, ReasonTimeout, CauseMaxLifetimeGrace)
}
