package tcpops

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// This file tests request-aware lifetimes and the graceful max_lifetime on
// a real in-process Caddy HTTP server, with the listener wrapper alone, in
// front of a reverse_proxy to a slow backend: the setup.

// slowBackend is an HTTP server that answers each request after the delay
// its query asks for (?delay=2s), with a body of the size it asks for
// (?size=65536), and counts the requests it got.
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
