package tcpops

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
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
			// The client closes at the server's FIN, as clients do: else
			// the graceful close lingers 5s of quiet first.
			waitClosed(t, c, 5*time.Second)
			_ = c.Close()
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
	// The client closes its side, having read everything: the socket
	// closes at once, not after the quiet time.
	closedAt := time.Now()
	_ = c.CloseWrite()
	eventually(t, 2*time.Second, "socket closed after the client's FIN", tc.socketClosed)
	if d := time.Since(closedAt); d >= lingerQuiet {
		t.Fatalf("socket closed %v after the client's FIN; want at once, not at lingerQuiet", d)
	}
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}

// A request that crosses tcpops' FIN (the server was already waiting in
// Read for the next request when the lifetime closed the connection) is
// discarded, not served: served, it would run at the backend and its
// answer would be lost on the write side tcpops shut. The client here does
// not close its side, so the socket closes lingerQuiet after the request,
// long after a served request would have reached the backend.
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
	eventually(t, lingerQuiet+5*time.Second, "socket closed at lingerQuiet", tc.socketClosed)
	if d := time.Since(lingerFrom); d < lingerQuiet*9/10 {
		t.Fatalf("socket closed %v after the request that crossed the FIN; want lingerQuiet %v after it, the client kept its side open", d, lingerQuiet)
	}
	if n := backend.requests.Load(); n != 1 {
		t.Fatalf("the backend got %d requests; want 1: the one that crossed the FIN was served", n)
	}
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}

// lingerServer runs srv with tcpops' end events recorded and its log in a
// file, for eventsTest.checkEnd.
func lingerServer(t *testing.T, srv httpServer) *eventsTest {
	t.Helper()
	waitRegistryEmpty(t)
	name, rec := newRecorder(t)
	et := &eventsTest{addr: srv.listen, logFile: filepath.Join(t.TempDir(), "tcpops.log"), rec: rec, origin: "caddy.listeners.tcpops"}
	srv.recorder, srv.logFile = name, et.logFile
	loadCaddy(t, srv.config())
	ac := caddy.ActiveContext()
	et.reg = ac.GetMetricsRegistry()
	return et
}

// checkEndTruth checks the end's figures against what the test itself saw:
// the bytes the client wrote and read, its duration within the test's own
// clock (from before the dial to after the end), and its idle time from at
// least minIdle up to the duration.
func checkEndTruth(t *testing.T, d map[string]any, bytesIn, bytesOut uint64, minDuration, wall, minIdle time.Duration) {
	t.Helper()
	if d["bytes_in"] != bytesIn || d["bytes_out"] != bytesOut {
		t.Errorf("end bytes_in/bytes_out %v/%v; the client wrote %d and the server %d", d["bytes_in"], d["bytes_out"], bytesIn, bytesOut)
	}
	dur := time.Duration(d["duration"].(float64) * float64(time.Second))
	idle := time.Duration(d["idle"].(float64) * float64(time.Second))
	if dur < minDuration || dur > wall {
		t.Errorf("end duration %v; want from %v to %v (the test's clock)", dur, minDuration, wall)
	}
	if idle < minIdle || idle > dur {
		t.Errorf("end idle %v; want from %v to the duration %v", idle, minIdle, dur)
	}
}

// readResponseHead reads an HTTP/1.1 response's head from br, and returns
// how many bytes the whole response has: the head and Content-Length.
func readResponseHead(t *testing.T, br *bufio.Reader) (total int) {
	t.Helper()
	cl := -1
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the response head: %v", err)
		}
		total += len(line)
		if v, ok := strings.CutPrefix(strings.ToLower(line), "content-length: "); ok {
			if _, err := fmt.Sscan(v, &cl); err != nil {
				t.Fatalf("Content-Length %q: %v", line, err)
			}
		}
		if line == "\r\n" {
			if cl < 0 {
				t.Fatal("response without Content-Length")
			}
			return total + cl
		}
	}
}

// A pipelined HTTP/1.1 request that crosses tcpops' FIN after the idle
// lifetime, sent while the client still has most of the last response
// unread, destroys none of it: the socket lingers, discards the request
// (the backend never gets it) and closes when the client has every byte
// and closes. Before, the socket closed 500ms after the FIN, and the
// request, sent a second after it, drew an RST that dropped what the
// client's kernel held.
func TestLingerPipelinedRequestLosesNothing(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	const size = 256 << 10
	backend := startSlowBackend(t)
	et := lingerServer(t, httpServer{
		listen:   freePort(t),
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d,"events":true}`, lifetime)},
		extra:    `"protocols":["h1"],`,
		handlers: []string{reverseProxyTo(backend.addr)},
	})
	start := time.Now()
	c := dial(t, et.addr)
	tc := waitTracked(t, c)
	req1 := fmt.Sprintf("GET /?size=%d HTTP/1.1\r\nHost: localhost\r\n\r\n", size)
	req2 := "GET /?size=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
	if _, err := io.WriteString(c, req1); err != nil {
		t.Fatal(err)
	}
	// A slow reader: 4 KiB every 20ms until the server has written the
	// whole response (the rest waits in the sockets' buffers) and tcpops
	// has sent its FIN at the lifetime. The response is chunked: the
	// client counts bytes, and reads to the end.
	read := 0
	buf := make([]byte, 4096)
	for !tc.http.lingering.Load() {
		n, err := c.Read(buf)
		read += n
		if err != nil {
			t.Fatalf("after %d bytes: %v", read, err)
		}
		time.Sleep(20 * time.Millisecond) // the client's pace, not a wait for a condition
	}
	// The client is busy for a second, longer than Go's 500ms linger,
	// then sends its next request, which crosses the FIN.
	time.Sleep(time.Second) // the scenario: a client that sends late
	if _, err := io.WriteString(c, req2); err != nil {
		t.Fatalf("pipelined request: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c)
	read += int(n)
	if err != nil {
		t.Fatalf("after %d response bytes: %v; want all, then EOF", read, err)
	}
	if n == 0 {
		t.Fatal("nothing left to read after the pipelined request; the test needs bytes unread when it crosses the FIN")
	}
	if got := backend.requests.Load(); got != 1 {
		t.Fatalf("the backend got %d requests; want 1: the one that crossed the FIN was served", got)
	}
	if tc.isEnded() {
		t.Fatal("ended before the client closed its side, with nothing left to send")
	}
	_ = c.CloseWrite()
	d := et.checkEnd(t, c, tc, ReasonTimeout, CauseLifetime, 5*time.Second)
	// What the server wrote is what the client read: not a byte lost.
	checkEndTruth(t, d, uint64(len(req1)+len(req2)), uint64(read), lifetime, time.Since(start), 0)
}

// stuckClient is a client of a server with tcpops' options whose
// response waits, most of it unread, in the sockets' buffers after tcpops'
// FIN: it read the head and then only until the server had written the
// whole response into its socket, through a 4 KiB window.
type stuckClient struct {
	et    *eventsTest
	c     *net.TCPConn
	br    *bufio.Reader
	tc    *Conn
	total int       // bytes of the response
	start time.Time // before the dial
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func startStuckClient(t *testing.T, options string) *stuckClient {
	t.Helper()
	const size = 256 << 10
	sc := &stuckClient{et: lingerServer(t, httpServer{
		listen:   freePort(t),
		wrappers: []string{`{"wrapper":"tcpops","events":true,` + options + `}`},
		extra:    `"protocols":["h1"],`,
		handlers: []string{fmt.Sprintf(`{"handler":"static_response","headers":{"Content-Length":["%d"]},"body":%q}`, size, responseBody(size))},
	})}
	sc.start = time.Now()
	sc.c = dialSmallWindow(t, sc.et.addr)
	sc.tc = waitTracked(t, sc.c)
	if _, err := io.WriteString(sc.c, getKeepAlive); err != nil {
		t.Fatal(err)
	}
	cr := &countingReader{r: sc.c}
	sc.br = bufio.NewReaderSize(cr, 1024)
	sc.total = readResponseHead(t, sc.br)
	// Read until the whole response is in the kernel (read, waiting in
	// the client's receive queue, or in the server's send queue), not
	// until the server's Write has returned: under load the server's
	// goroutine can return long after, and a client reading on meanwhile
	// took every byte, then the FIN (the EOF this loop failed on).
	buf := make([]byte, 1024)
	for sc.tc.bytesOut.Load() < uint64(sc.total) {
		inq, ok1 := recvQueue(sc.c)
		q, ok2 := sendQueue(sc.tc.tcp)
		if ok1 && ok2 && int(cr.n.Load())+inq+q.outq >= sc.total {
			eventually(t, 5*time.Second, "the response written", func() bool { return sc.tc.bytesOut.Load() >= uint64(sc.total) })
			break
		}
		if _, err := sc.br.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 5*time.Second, "FIN sent, lingering", sc.tc.http.lingering.Load)
	if q, ok := sendQueue(sc.tc.tcp); !ok || q.outq == 0 {
		t.Fatalf("send queue %+v (%v) after the FIN; the test needs bytes queued", q, ok)
	}
	return sc
}

// readRest reads what is left of the response, and the FIN.
func (sc *stuckClient) readRest(t *testing.T) {
	t.Helper()
	_ = sc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, sc.br); err != nil {
		t.Fatalf("reading the rest of the response: %v", err)
	}
}

// A client that never reads the rest of its response, and never closes,
// is released at the linger's bound (cause linger), or at
// max_lifetime_grace when a drain's comes first (cause max_lifetime_grace);
// closed gracefully even then, the socket still delivers what it held.
func TestLingerNeverReadingClient(t *testing.T) {
	for _, tt := range []struct {
		name    string
		options string
		cause   string
		// when the end comes at the earliest, and how long the
		// connection was idle then at least
		minDuration, minIdle time.Duration
	}{
		{"grace", `"max_lifetime":"1s","max_lifetime_grace":"1s"`, CauseMaxLifetimeGrace, 2 * time.Second, time.Second},
		{"bound", `"lifetime":"300ms"`, CauseLinger, lingerMax + 300*time.Millisecond, lingerMax + 300*time.Millisecond},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sc := startStuckClient(t, tt.options)
			d := sc.et.checkEnd(t, sc.c, sc.tc, ReasonTimeout, tt.cause, tt.minDuration+10*time.Second)
			checkEndTruth(t, d, uint64(len(getKeepAlive)), uint64(sc.total), tt.minDuration, time.Since(sc.start), tt.minIdle)
			sc.readRest(t) // closed, not reset
		})
	}
}

// A client that closes its side with most of its response still queued
// does not end the linger: the socket closes, and the end is reported,
// once the client has acknowledged every byte.
func TestLingerClientFINWaitsForQueue(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	sc := startStuckClient(t, fmt.Sprintf(`"lifetime":%d`, lifetime))
	if err := sc.c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the linger read the client's FIN", sc.tc.http.peerEOF.Load)
	// Through the next polls of the queue, with bytes still in it.
	for range 3 {
		q, ok := sendQueue(sc.tc.tcp)
		if !ok || q.outq == 0 {
			t.Fatalf("send queue %+v (%v); the test needs bytes queued", q, ok)
		}
		if sc.tc.isEnded() || sc.tc.socketClosed() {
			t.Fatalf("ended or closed at the client's FIN with %d bytes queued", q.outq)
		}
		time.Sleep(sendQueuePoll) // a poll of the queue passes
	}
	sc.readRest(t)
	d := sc.et.checkEnd(t, sc.c, sc.tc, ReasonTimeout, CauseLifetime, 5*time.Second)
	checkEndTruth(t, d, uint64(len(getKeepAlive)), uint64(sc.total), lifetime, time.Since(sc.start), 0)
}

// A DELETE of a connection that lingers (admin.go's closeWith, as the
// admin API and its door call it) closes its socket at once and names the
// end closed/admin: the operator's close cuts the linger.
func TestLingerCutByAdminClose(t *testing.T) {
	sc := startStuckClient(t, `"lifetime":"300ms"`)
	if !sc.tc.closeWith(ReasonClosed, CauseAdmin) {
		t.Fatal("the DELETE found the lingering connection ended")
	}
	if !sc.tc.socketClosed() {
		t.Fatal("socket still open after the DELETE")
	}
	sc.et.checkEnd(t, sc.c, sc.tc, ReasonClosed, CauseAdmin, 5*time.Second)
}

// A PATCH to a connection that lingers after its graceful close is refused
// with the close's cause (404, as after the end): its FIN is out and no
// option can take it back, so an answer of 200 with an hour's lifetime
// would claim a state the connection will never have (issue 31, item 3).
// The connection stays listed until the linger closes it.
func TestLingerRefusesChange(t *testing.T) {
	sc := startStuckClient(t, `"lifetime":"300ms"`)
	err := sc.tc.change(&Options{Lifetime: OptionalDuration(time.Hour)}, zap.NewNop(), true)
	if !errors.Is(err, errConnEnded) {
		t.Fatalf("a change while lingering: %v, want errConnEnded", err)
	}
	var apiErr caddy.APIError
	if !errors.As(changeError(sc.tc, err), &apiErr) || apiErr.HTTPStatus != http.StatusNotFound ||
		!strings.Contains(apiErr.Error(), "ended (timeout, lifetime)") {
		t.Fatalf("the answer to a change while lingering: %v, want 404 with the close's cause", changeError(sc.tc, err))
	}
	sc.tc.mu.Lock()
	lifetime := sc.tc.opts.Lifetime.Duration()
	sc.tc.mu.Unlock()
	if sc.tc.isEnded() || lifetime != 300*time.Millisecond {
		t.Fatalf("after the refused change: ended %v, lifetime %v; want lingering, 300ms", sc.tc.isEnded(), lifetime)
	}
	sc.readRest(t)
	_ = sc.c.Close()
	sc.et.checkEnd(t, sc.c, sc.tc, ReasonTimeout, CauseLifetime, 10*time.Second)
}

// A client that resets a lingering connection answers tcpops' close: the
// end is the close's (timeout/lifetime), not reset, since tcpops' FIN came
// first (docs/events.md's precedence), and the socket closes at once.
func TestLingerClientResetAnswersTheClose(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	sc := startStuckClient(t, fmt.Sprintf(`"lifetime":%d`, lifetime))
	if err := sc.c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	_ = sc.c.Close() // RST, with the response unread
	eventually(t, 5*time.Second, "socket closed after the client's RST", sc.tc.socketClosed)
	sc.et.checkEnd(t, sc.c, sc.tc, ReasonTimeout, CauseLifetime, 5*time.Second)
}

// curl reading 2 MB/s downloads 10 MiB through the listener wrapper while
// its connection passes max_lifetime (1s, grace 60s), over h2c and over
// TLS with tcpops after tls: the GOAWAY and PING go out at 1s behind
// megabytes already queued, the client reads them seconds later, and
// sends its WINDOW_UPDATEs and the PING's ACK after tcpops' FIN. Every
// download completes, and each connection ends as the drain's
// (timeout/max_lifetime), with everything it was sent. Before, 13 of 17
// were reset (issue 26). TCPOPS_SLOW_READER_RUNS sets the runs per
// protocol (2 by default; 20 by hand).
func TestLingerSlowReaderCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("no curl")
	}
	runs := 2
	if v := os.Getenv("TCPOPS_SLOW_READER_RUNS"); v != "" {
		if runs, err = strconv.Atoi(v); err != nil || runs < 1 {
			t.Fatalf("TCPOPS_SLOW_READER_RUNS %q: want a count of at least 1", v)
		}
	}
	const size = 10 << 20
	dir := t.TempDir()
	want := make([]byte, size)
	_, _ = rand.Read(want)
	if err := os.WriteFile(filepath.Join(dir, "big"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	tcpops := `{"wrapper":"tcpops","events":true,"lifetime":"1m","max_lifetime":"1s","max_lifetime_grace":"60s"}`
	for _, tt := range []struct {
		name string
		tls  bool
	}{{"h2c", false}, {"tls", true}} {
		t.Run(tt.name, func(t *testing.T) {
			srv := httpServer{
				listen:   freePort(t),
				wrappers: []string{tcpops},
				extra:    `"protocols":["h1","h2","h2c"],`,
				handlers: []string{fmt.Sprintf(`{"handler":"file_server","root":%q}`, dir)},
			}
			url := "http://" + srv.listen + "/big"
			args := []string{"--http2-prior-knowledge"}
			if tt.tls {
				// tls first, as Caddy puts it when listener_wrappers
				// leave it out: tcpops sees the frames.
				srv.extra += `"tls_connection_policies":[{}],`
				srv.tlsApp = selfSignedTLSApp(t)
				_, port, _ := net.SplitHostPort(srv.listen)
				url = "https://localhost:" + port + "/big"
				args = []string{"--http2", "-k", "--resolve", "localhost:" + port + ":127.0.0.1"}
			}
			et := lingerServer(t, srv)
			for i := range runs {
				out := filepath.Join(t.TempDir(), "out")
				cmd := exec.Command(curl, append(args, "-sS", "--limit-rate", "2M", "-o", out,
					"-w", "%{http_version} %{size_download}", url)...)
				res, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("run %d of %d: curl: %v: %s", i+1, runs, err, res)
				}
				got, err := os.ReadFile(out)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("run %d: %d of %d bytes, or not the file (%v); curl says %s", i+1, len(got), size, err, res)
				}
				if !strings.HasPrefix(string(res), "2 ") {
					t.Fatalf("run %d: curl spoke HTTP %s; want 2", i+1, res)
				}
			}
			// Each connection got tcpops' GOAWAY (it saw the frames), and
			// ends as the drain's, after sending it all.
			eventually(t, 5*time.Second, "a GOAWAY logged per connection", func() bool {
				b, _ := os.ReadFile(et.logFile)
				return bytes.Count(b, []byte(`"msg":"tcpops: HTTP/2 GOAWAY and PING sent"`)) == runs
			})
			eventually(t, lingerQuiet+5*time.Second, "every connection ended", func() bool {
				et.rec.mu.Lock()
				defer et.rec.mu.Unlock()
				return len(et.rec.events) >= runs
			})
			et.rec.mu.Lock()
			defer et.rec.mu.Unlock()
			if len(et.rec.events) != runs {
				t.Fatalf("%d ends for %d connections", len(et.rec.events), runs)
			}
			for _, e := range et.rec.events {
				d := e.data
				if d["reason"] != ReasonTimeout || d["cause"] != CauseMaxLifetime || d["bytes_out"].(uint64) < size {
					t.Errorf("connection %v ended %v/%v with %v bytes out; want timeout/max_lifetime and the file's %d at least",
						d["conid"], d["reason"], d["cause"], d["bytes_out"], size)
				}
			}
		})
	}
}

// BenchmarkSendQueue is the cost of one poll of a lingering connection's
// send queue (TCP_INFO and SIOCOUTQ), made every sendQueuePoll while it
// holds bytes, and of each look at an HTTP/2 GOAWAY still queued.
//
//	go test -run '^$' -bench BenchmarkSendQueue -benchmem .
func BenchmarkSendQueue(b *testing.B) {
	tc := socketPair(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := sendQueue(tc); !ok {
			b.Fatal("send queue unreadable")
		}
	}
}
