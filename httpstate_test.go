package tcpops

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// The HTTP server reports on the connection the listener chain returned,
// which Caddy wraps in ways that differ by where tcpops sits and by the
// protocols served: a *tls.Conn (tcpops before tls), caddyhttp's
// tlsStateConn (after tls), its http2Conn (a server taking only one of
// HTTP/1 and HTTP/2). The request-aware lifetime must find the tracked
// connection under each, and tell HTTP/1.1 from HTTP/2.
func TestRequestAwareLifetimeThroughWrappers(t *testing.T) {
	for _, tc := range []struct {
		name      string
		tls       bool
		wrappers  []string // after the tcpops wrapper
		protocols string
		client    string // h1, h2 (over TLS) or h2c
		proto     uint32 // what tcpops learns
	}{
		{name: "https h2, tcpops before tls", tls: true, wrappers: []string{`{"wrapper":"tls"}`}, client: "h2", proto: protoTLSHTTP2},
		{name: "https h1, tcpops before tls", tls: true, wrappers: []string{`{"wrapper":"tls"}`}, client: "h1", proto: protoHTTP1},
		{name: "https h2, tcpops after tls", tls: true, client: "h2", proto: protoHTTP2},
		{name: "https h1, tcpops after tls", tls: true, client: "h1", proto: protoHTTP1},
		{name: "plain, protocols h1 only", protocols: `"protocols":["h1"],`, client: "h1", proto: protoHTTP1},
		{name: "plain, protocols h2c only", protocols: `"protocols":["h2c"],`, client: "h2c", proto: protoHTTP2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const lifetime = 700 * time.Millisecond
			backend := startSlowBackend(t)
			addr := freePort(t)
			srv := httpServer{
				listen:   addr,
				wrappers: append([]string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)}, tc.wrappers...),
				extra:    tc.protocols,
				handlers: []string{reverseProxyTo(backend.addr)},
			}
			scheme := "http"
			if tc.tls {
				scheme = "https"
				srv.extra += `"tls_connection_policies":[{}],`
				srv.tlsApp = selfSignedTLSApp(t)
			}
			loadCaddy(t, srv.config())
			client := wrapperClient(t, tc.client)

			resp, err := client.Get(scheme + "://" + addr + "/?delay=1200ms&size=20000")
			if err != nil {
				t.Fatalf("request waiting 1.2s under lifetime %v: %v", lifetime, err)
			}
			body, err := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if err != nil || !bytes.Equal(body, responseBody(20000)) {
				t.Fatalf("body: %d bytes, %v", len(body), err)
			}
			if want := map[string]int{"h1": 1, "h2": 2, "h2c": 2}[tc.client]; resp.ProtoMajor != want {
				t.Fatalf("response over %s, want HTTP/%d", resp.Proto, want)
			}
			var tracked *Conn
			connections.each(func(c *Conn) bool { tracked = c; return false })
			if tracked == nil {
				t.Fatal("connection no longer tracked after the response")
			}
			if got := tracked.http.proto.Load(); got != tc.proto {
				t.Fatalf("tcpops took the connection for protocol %d, want %d", got, tc.proto)
			}
			assertEnded(t, tracked, ReasonTimeout, CauseLifetime)
		})
	}
}

// wrapperClient returns a client for one protocol: h1 or h2 over TLS
// (trusting anything), or h2c.
func wrapperClient(t testing.TB, proto string) *http.Client {
	p := new(http.Protocols)
	switch proto {
	case "h1":
		p.SetHTTP1(true)
	case "h2":
		p.SetHTTP2(true)
	case "h2c":
		p.SetUnencryptedHTTP2(true)
	}
	tr := &http.Transport{
		Protocols:       p,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true, ServerName: "localhost"},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// What the first bytes read tell.
func TestSniffProto(t *testing.T) {
	for _, tc := range []struct {
		first string
		want  uint32
	}{
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", protoHTTP2},
		{"PRI ", protoHTTP2},
		{"GET / HTTP/1.1\r\n", protoHTTP1},
		{"POST /x HTTP/1.1\r\n", protoHTTP1},
		// Too short to tell: the preface, POST, PUT, PATCH, PROXY...
		{"P", protoUnsniffed},
		{"PR", protoUnsniffed},
		{"PRI", protoUnsniffed},
		{"GE", protoUnsniffed},
		{"PROXY", protoUnsniffed},
		{"", protoUnsniffed},
		{"PUT ", protoHTTP1},
		{"PRX", protoUnsniffed},
		{"P\r", protoOther},
		{"\x16\x03\x01\x02\x00", protoTLS},
		{"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n", protoOther},
		{"\r\n\r\n\x00\r\nQUIT\n", protoOther}, // PROXY protocol v2
		{"get / HTTP/1.1", protoOther},
		{strings.Repeat("A", 30) + " ", protoOther},
	} {
		if got := sniffProto([]byte(tc.first)); got != tc.want {
			t.Errorf("sniffProto(%q) = %d, want %d", tc.first, got, tc.want)
		}
	}
}

// The first bytes, read one at a time, tell what they tell read at once:
// before, a first read of "P", "PR" or "PRI" was taken for an unknown
// protocol, and HTTP/2 then got a FIN without its GOAWAY.
func TestSniffSplit(t *testing.T) {
	for _, first := range []string{
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET / HTTP/1.1\r\n",
		"PATCH /x HTTP/1.1\r\n",
		"PROPFIND / HTTP/1.1\r\n",
		"\x16\x03\x01\x02\x00",
		"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n",
		strings.Repeat("A", 30) + " ",
	} {
		want := sniffProto([]byte(first))
		h := new(httpState)
		for i := range len(first) {
			if h.proto.Load() != protoUnsniffed {
				break
			}
			h.sniffMore([]byte(first[i : i+1]))
		}
		if got := h.proto.Load(); got != want || want == protoUnsniffed {
			t.Errorf("%q a byte at a time: %d, at once: %d", first, got, want)
		}
	}
}

// A WebSocket has no requests once upgraded: the server reports it
// hijacked, and its lifetime counts bytes again (the upgrade request itself,
// in flight until the WebSocket ends, does not hold the lifetime off).
func TestRequestAwareLifetimeHijacked(t *testing.T) {
	const lifetime = 500 * time.Millisecond
	up := startUpstream(t, upgradeBackend)
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)},
		handlers: []string{reverseProxyTo(up.addr())},
	}.config())

	c := dial(t, addr)
	upgrade(t, c)
	tc := waitTracked(t, c)
	eventually(t, 3*time.Second, "connection reported hijacked", func() bool {
		tc.mu.Lock()
		defer tc.mu.Unlock()
		return tc.http.phase == httpHijacked
	})
	roundTrip(t, c, "ping")
	last := time.Now()
	waitClosed(t, c, 3*time.Second)
	if took := time.Since(last); took < lifetime-50*time.Millisecond {
		t.Fatalf("closed %v after the last bytes, before the %v lifetime", took, lifetime)
	}
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}

// BenchmarkHTTPStateChange is what a request costs the listener wrapper on
// an HTTP server: the server's two reports (StateActive when it starts,
// StateIdle when it ends), through tls as tcpops before tls sees them, on a
// connection with a lifetime and a max_lifetime.
//
//	go test -run '^$' -bench BenchmarkHTTPStateChange -benchmem .
func BenchmarkHTTPStateChange(b *testing.B) {
	_, server := loopbackPair(b)
	lw := &ListenerWrapper{}
	lw.logger = zap.NewNop()
	lw.tracker.http = true
	lw.tracker.opts = &Options{Lifetime: OptionalDuration(time.Minute), MaxLifetime: OptionalDuration(time.Hour)}
	c, _ := lw.tracker.track(server)
	b.Cleanup(func() { c.end(ReasonClosed, CauseEOF) })
	nc := tls.Server(httpConn{c}, &tls.Config{}) // never handshakes: only unwrapped
	lw.connState(nc, http.StateNew)
	b.ReportAllocs()
	for b.Loop() {
		lw.connState(nc, http.StateActive)
		lw.connState(nc, http.StateIdle)
	}
}

// Request tracking through every order of Caddy's listener wrappers that
// change what the HTTP server reports on: tcpops before and after
// proxy_protocol (go-proxyproto's Conn, seen through its Raw method), and
// before and after tls (TestRequestAwareLifetimeThroughWrappers). A request
// waiting 1.2s for its backend under lifetime 700ms must be answered: cut at
// 0.7s, it was not tracked.
func TestRequestTrackingProxyProtocolOrders(t *testing.T) {
	const lifetime = 700 * time.Millisecond
	tcpops := fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)
	pp := `{"wrapper":"proxy_protocol","allow":["127.0.0.0/8"]}`
	for _, tc := range []struct {
		name     string
		wrappers []string
	}{
		{"tcpops before proxy_protocol", []string{tcpops, pp}},
		{"tcpops after proxy_protocol", []string{pp, tcpops}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := startSlowBackend(t)
			addr := freePort(t)
			loadCaddy(t, httpServer{listen: addr, wrappers: tc.wrappers, handlers: []string{reverseProxyTo(backend.addr)}}.config())
			c := dial(t, addr)
			start := time.Now()
			resp, body := rawRequest(t, c, bufio.NewReader(c),
				"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\nGET /?delay=1200ms&size=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")
			if resp.StatusCode != http.StatusOK || body != string(responseBody(100)) {
				t.Fatalf("after %v: %d, %d bytes; want the backend's answer", time.Since(start), resp.StatusCode, len(body))
			}
			tracked := waitTracked(t, c)
			if p := tracked.http.proto.Load(); p != protoHTTP1 {
				// Else its close would wait for a quiet window, for HTTP/2.
				t.Fatalf("protocol sniffed %d, want HTTP/1.1 (%d) past the PROXY header", p, protoHTTP1)
			}
			eventually(t, 2*time.Second, "the server's StateIdle reached tcpops", func() bool {
				tracked.mu.Lock()
				defer tracked.mu.Unlock()
				return tracked.http.phase == httpIdle
			})
			assertEnded(t, tracked, ReasonTimeout, CauseLifetime)
		})
	}
}

// An idle HTTP connection tcpops closes is closed as an HTTP server closes
// one: the write side first (the client reads EOF), while the socket stays
// open and discards what the client still sends (no RST, which could
// destroy the end of the last response), until the client closes its side.
func TestGracefulIdleCloseFINThenLinger(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)},
		extra:    `"protocols":["h1"],`,
		handlers: []string{respond("ok")},
	}.config())
	c := dial(t, addr)
	br := bufio.NewReader(c)
	if resp, body := rawRequest(t, c, br, getKeepAlive); resp.StatusCode != http.StatusOK || body != "ok" {
		t.Fatalf("response %d %q", resp.StatusCode, body)
	}
	tc := waitTracked(t, c)
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("want the server's FIN (EOF) at the lifetime; got %v", err)
	}
	if tc.socketClosed() {
		t.Fatal("socket closed at once with the FIN; want it open while the client may still send")
	}
	// A request that crossed the FIN: read and discarded, not answered
	// with a RST.
	if _, err := io.WriteString(c, getKeepAlive); err != nil {
		t.Fatalf("write after the FIN: %v", err)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after a request that crossed the FIN: %v, want EOF (no RST)", err)
	}
	// The client closes its side: the socket closes, before lingerTimeout.
	closedAt := time.Now()
	_ = c.CloseWrite()
	eventually(t, 2*time.Second, "socket closed after the client's FIN", tc.socketClosed)
	if d := time.Since(closedAt); d >= lingerTimeout {
		t.Fatalf("socket closed %v after the client's FIN; want at once, not at lingerTimeout", d)
	}
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}

// A request that crosses tcpops' FIN (the server was already waiting in
// Read for the next request when the lifetime closed the connection) is
// discarded, not served: served, it would run at the backend and its
// answer would be lost on the write side tcpops shut. The client here does
// not close its side, so the socket closes at lingerTimeout, long after a
// served request would have reached the backend.
func TestGracefulIdleCloseDiscardsCrossingRequest(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	backend := startSlowBackend(t)
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)},
		extra:    `"protocols":["h1"],`,
		handlers: []string{reverseProxyTo(backend.addr)},
	}.config())
	c := dial(t, addr)
	br := bufio.NewReader(c)
	if resp, _ := rawRequest(t, c, br, getKeepAlive); resp.StatusCode != http.StatusOK {
		t.Fatalf("response %d", resp.StatusCode)
	}
	tc := waitTracked(t, c)
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("want the server's FIN (EOF) at the lifetime; got %v", err)
	}
	if _, err := io.WriteString(c, "POST /?size=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi"); err != nil {
		t.Fatalf("write after the FIN: %v", err)
	}
	lingerFrom := time.Now()
	eventually(t, 3*time.Second, "socket closed at lingerTimeout", tc.socketClosed)
	if d := time.Since(lingerFrom); d < lingerTimeout/2 {
		t.Fatalf("socket closed %v after the request that crossed the FIN; want at lingerTimeout %v, the client kept its side open", d, lingerTimeout)
	}
	if n := backend.requests.Load(); n != 1 {
		t.Fatalf("the backend got %d requests; want 1: the one that crossed the FIN was served", n)
	}
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}
