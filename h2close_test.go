package tcpops

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/tcpops/caddy-tcpops/internal/h2frame"
)

// This file tests the HTTP/2 close of h2close.go: at the frame level on a
// loopback pair, and through a real Caddy serving h2c to a raw HTTP/2
// client that sees every frame.

// h2Client is a raw HTTP/2 client over one connection: it sends what a
// test says and records every frame it reads, and when.
type h2Client struct {
	t    testing.TB
	conn net.Conn
	fr   *http2.Framer
	wmu  sync.Mutex

	frames chan h2Seen // every frame read, then one with err set
}

// h2Seen is a frame the client read (a copy of what matters), or the error
// that ended reading.
type h2Seen struct {
	typ    http2.FrameType
	flags  http2.Flags
	stream uint32
	lastID uint32  // GOAWAY
	code   uint32  // GOAWAY
	ping   [8]byte // PING
	at     time.Time
	err    error
}

func dialH2(t testing.TB, addr string) *h2Client {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return startH2(t, conn)
}

// dialH2TLS dials addr over TLS, with ALPN h2, and starts an HTTP/2
// client on the connection.
func dialH2TLS(t testing.TB, addr string) *h2Client {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, ServerName: "localhost", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	return startH2(t, conn)
}

// startH2 starts an HTTP/2 client on conn (TCP for h2c, or TLS with h2).
func startH2(t testing.TB, conn net.Conn) *h2Client {
	t.Helper()
	t.Cleanup(func() { _ = conn.Close() })
	c := &h2Client{t: t, conn: conn, fr: http2.NewFramer(conn, conn), frames: make(chan h2Seen, 1000)}
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	c.write(func(fr *http2.Framer) error { return fr.WriteSettings() })
	go c.readLoop()
	return c
}

func (c *h2Client) write(f func(fr *http2.Framer) error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = f(c.fr)
}

func (c *h2Client) readLoop() {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			c.frames <- h2Seen{err: err, at: time.Now()}
			close(c.frames)
			return
		}
		s := h2Seen{typ: f.Header().Type, flags: f.Header().Flags, stream: f.Header().StreamID, at: time.Now()}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.write(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
			}
		case *http2.GoAwayFrame:
			s.lastID, s.code = f.LastStreamID, uint32(f.ErrCode)
		case *http2.PingFrame:
			s.ping = f.Data
		}
		c.frames <- s
	}
}

// get sends a GET for path on stream id, ending the stream.
func (c *h2Client) get(id uint32, path string) {
	c.write(func(fr *http2.Framer) error { return writeGet(fr, id, path) })
}

// writeGet writes the HEADERS of a GET for path on stream id, ending the
// stream. Each of its header blocks is encoded on its own (no dynamic
// table entries), so that a block the server never reads leaves the next
// ones readable.
func writeGet(fr *http2.Framer, id uint32, path string) error {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.SetMaxDynamicTableSizeLimit(0)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "localhost"}, {":path", path}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
}

// next returns the next frame that is not SETTINGS, WINDOW_UPDATE or a PING
// ACK, or the error that ended the connection; it fails after within.
func (c *h2Client) next(within time.Duration) h2Seen {
	c.t.Helper()
	timeout := time.After(within)
	for {
		select {
		case s, ok := <-c.frames:
			if !ok {
				return h2Seen{err: io.EOF, at: time.Now()}
			}
			if s.err == nil && (s.typ == http2.FrameSettings || s.typ == http2.FrameWindowUpdate ||
				s.typ == http2.FramePing && s.flags.Has(http2.FlagPingAck)) {
				continue
			}
			return s
		case <-timeout:
			c.t.Fatalf("no frame within %v", within)
		}
	}
}

// awaitStreamEnd reads frames until stream id ends (END_STREAM from the
// server), failing on anything else but more of that stream.
func (c *h2Client) awaitStreamEnd(id uint32, within time.Duration) time.Time {
	c.t.Helper()
	for {
		s := c.next(within)
		if s.err != nil {
			c.t.Fatalf("connection ended before stream %d: %v", id, s.err)
		}
		if s.stream == id && s.flags.Has(http2.FlagDataEndStream) && (s.typ == http2.FrameData || s.typ == http2.FrameHeaders) {
			return s.at
		}
	}
}

// expectGoAwayPing reads the GOAWAY and the PING tcpops sends, in that
// order, and returns the PING's data and when the GOAWAY came.
func (c *h2Client) expectGoAwayPing(within time.Duration) ([8]byte, time.Time) {
	c.t.Helper()
	g := c.next(within)
	if g.err != nil || g.typ != http2.FrameGoAway || g.lastID != h2frame.MaxStreamID || g.code != 0 {
		c.t.Fatalf("want GOAWAY (last stream %d, NO_ERROR); got %v %v last %d code %d", h2frame.MaxStreamID, g.typ, g.err, g.lastID, g.code)
	}
	p := c.next(time.Second)
	if p.err != nil || p.typ != http2.FramePing || p.flags.Has(http2.FlagPingAck) {
		c.t.Fatalf("want a PING after the GOAWAY; got %v %v", p.typ, p.err)
	}
	return p.ping, g.at
}

// expectFinalGoAway reads the final GOAWAY tcpops sends once its PING is
// acknowledged, with last as its last stream id, and returns when it came.
func (c *h2Client) expectFinalGoAway(last uint32, within time.Duration) time.Time {
	c.t.Helper()
	g := c.next(within)
	if g.err != nil || g.typ != http2.FrameGoAway || g.lastID != last || g.code != 0 {
		c.t.Fatalf("want the final GOAWAY (last stream %d, NO_ERROR); got %v %v last %d code %d", last, g.typ, g.err, g.lastID, g.code)
	}
	return g.at
}

// h2cServer starts Caddy serving h2c only, with the wrapper's JSON fields,
// a route that answers "ok" or proxies to backend when one is given.
func h2cServer(t testing.TB, wrapper string, backend *slowBackend) string {
	t.Helper()
	addr := freePort(t)
	handler := respond("ok")
	if backend != nil {
		handler = reverseProxyTo(backend.addr)
	}
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"tcpops",` + wrapper + `}`},
		extra:    `"protocols":["h1","h2c"],`,
		handlers: []string{handler},
	}.config())
	return addr
}

// An idle h2c connection whose lifetime runs out gets GOAWAY and PING, and
// is closed once the client acknowledges the PING; a client that does not
// is closed h2AckTimeout later. Before, tcpops closed with a FIN alone.
func TestH2IdleLifetimeGoAwayThenClose(t *testing.T) {
	const lifetime = 400 * time.Millisecond
	addr := h2cServer(t, fmt.Sprintf(`"lifetime":%d`, lifetime), nil)
	for _, ack := range []bool{true, false} {
		t.Run(fmt.Sprintf("ack=%v", ack), func(t *testing.T) {
			c := dialH2(t, addr)
			c.get(1, "/")
			idleFrom := c.awaitStreamEnd(1, 3*time.Second)
			tc := waitTracked(t, c.conn)
			data, goawayAt := c.expectGoAwayPing(3 * time.Second)
			if d := goawayAt.Sub(idleFrom); d < lifetime-50*time.Millisecond {
				t.Fatalf("GOAWAY %v after the response; want the lifetime %v", d, lifetime)
			}
			if ack {
				c.write(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
				c.expectFinalGoAway(1, 3*time.Second)
			}
			end := c.next(3 * time.Second)
			if end.err == nil {
				t.Fatalf("after GOAWAY and PING: frame %v, want the close", end.typ)
			}
			took := end.at.Sub(goawayAt)
			if ack && took >= h2AckTimeout-100*time.Millisecond {
				t.Fatalf("closed %v after the acknowledged PING; want at once", took)
			}
			if !ack && took < h2AckTimeout-50*time.Millisecond {
				t.Fatalf("closed %v after an unanswered PING; want h2AckTimeout %v", took, h2AckTimeout)
			}
			_ = c.conn.Close() // at the server's FIN, as clients do: else the close lingers 5s of quiet first
			assertEnded(t, tc, ReasonTimeout, CauseLifetime)
		})
	}
}

// max_lifetime sends its GOAWAY by the timer, while a stream is in flight,
// not at the next response; the stream completes, and the connection
// closes after it.
func TestH2MaxLifetimeGoAwayByTimer(t *testing.T) {
	const maxLifetime = 500 * time.Millisecond
	backend := startSlowBackend(t)
	addr := h2cServer(t, fmt.Sprintf(`"max_lifetime":%d,"max_lifetime_grace":"5s"`, maxLifetime), backend)
	c := dialH2(t, addr)
	start := time.Now()
	c.get(1, "/?delay=1500ms&size=10")
	tc := waitTracked(t, c.conn)
	data, goawayAt := c.expectGoAwayPing(3 * time.Second)
	if d := goawayAt.Sub(start); d < maxLifetime-20*time.Millisecond || d > maxLifetime+400*time.Millisecond {
		t.Fatalf("GOAWAY %v after the connection opened; want at max_lifetime %v", d, maxLifetime)
	}
	c.write(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
	c.expectFinalGoAway(1, 3*time.Second)
	doneAt := c.awaitStreamEnd(1, 5*time.Second)
	if d := doneAt.Sub(start); d < 1500*time.Millisecond {
		t.Fatalf("stream ended %v after the start; the backend answers after 1.5s", d)
	}
	end := c.next(3 * time.Second)
	if end.err == nil {
		t.Fatalf("after the last stream: frame %v, want the close", end.typ)
	}
	if d := end.at.Sub(doneAt); d > 500*time.Millisecond {
		t.Fatalf("closed %v after the last stream ended; want at once", d)
	}
	_ = c.conn.Close() // at the server's FIN, as clients do: else the close lingers 5s of quiet first
	assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
}

// The server's frames, of random sizes, written by several goroutines in
// pieces of random sizes (as Go's server writes through its buffer), while
// tcpops makes its own frames pending again and again: the client reads a
// stream of whole frames, the server's intact and in order per writer, and
// every frame of tcpops'.
func TestH2FramesOnlyAtBoundaries(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	tr := &tracker{opts: &Options{}, logger: zap.NewNop(), http: true}
	conn, _ := tr.track(sc)
	if conn == nil {
		t.Fatal("not tracked")
	}
	defer conn.Close()
	hc := httpConn{conn}
	if _, err := io.WriteString(client, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(hc, buf); err != nil || hc.http.h2.Load() == nil {
		t.Fatalf("preface: %v; tracker %v", err, hc.http.h2.Load())
	}

	const writers, minInjections = 4, 30
	var serverMu sync.Mutex // the server's own serialization of its writes
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 7))
			var fb bytes.Buffer
			fr := http2.NewFramer(&fb, nil)
			id := uint32(2*w + 1)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				fb.Reset()
				payload := bytes.Repeat([]byte{byte(w)}, r.IntN(40000))
				if i%3 == 0 {
					_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: payload[:min(len(payload), 500)]})
					_ = fr.WriteContinuation(id, false, payload[:min(len(payload), 300)])
					_ = fr.WriteContinuation(id, true, []byte{byte(i)})
				} else {
					_ = fr.WriteData(id, false, payload)
				}
				b := fb.Bytes()
				serverMu.Lock()
				for len(b) > 0 {
					k := min(len(b), 1+r.IntN(9000))
					if _, err := hc.Write(b[:k]); err != nil {
						serverMu.Unlock()
						return // the reader failed, and says why
					}
					b = b[k:]
				}
				serverMu.Unlock()
			}
		})
	}
	// tcpops' frames, made pending while the writers write, until enough
	// went out between theirs.
	var injected atomic.Int32
	injector := make(chan struct{})
	go func() {
		defer close(injector)
		defer close(stop)
		tracker := hc.http.h2.Load()
		for injected.Load() < minInjections {
			f := h2frame.AppendGoAway(nil, h2frame.MaxStreamID, 0)
			if hc.http.pending.CompareAndSwap(nil, &f) {
				injected.Add(1)
				hc.flushPending(tracker)
			}
			time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond) // spreads the injections over the writes
		}
	}()

	// The client reads whole frames until the server's last, a PING.
	read := make(chan error, 1)
	goaways, frames := 0, 0
	_ = client.SetReadDeadline(time.Now().Add(20 * time.Second))
	go func() {
		fr := http2.NewFramer(nil, client)
		fr.SetMaxReadFrameSize(1 << 20)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				_ = sc.Close() // the writers stop
				read <- err
				return
			}
			switch f := f.(type) {
			case *http2.GoAwayFrame:
				goaways++
			case *http2.PingFrame:
				read <- nil
				return
			case *http2.DataFrame:
				for _, b := range f.Data() {
					if b != byte((f.StreamID-1)/2) {
						_ = sc.Close()
						read <- fmt.Errorf("DATA of stream %d carries a byte of writer %d", f.StreamID, b)
						return
					}
				}
				frames++
			case *http2.ContinuationFrame:
				// Framer checks that only a header block's CONTINUATIONs
				// follow its HEADERS.
				if f.HeadersEnded() {
					frames++
				}
			}
		}
	}()
	<-injector
	wg.Wait()
	// The last: any frame of tcpops' still pending goes out before it.
	var fb bytes.Buffer
	_ = http2.NewFramer(&fb, nil).WritePing(false, [8]byte{'e', 'n', 'd'})
	_, _ = hc.Write(fb.Bytes())
	if err := <-read; err != nil {
		t.Fatalf("client read: %v (after %d frames, %d GOAWAYs)", err, frames, goaways)
	}
	if n := int(injected.Load()); goaways != n {
		t.Fatalf("client read %d GOAWAYs, tcpops injected %d", goaways, n)
	}
	t.Logf("%d frames of the server's, %d of tcpops' between them", frames, goaways)
}

// pingEvery sends a PING every d until stop is closed: bytes both ways on
// an idle connection.
func (c *h2Client) pingEvery(d time.Duration, stop <-chan struct{}) {
	for i := byte(0); ; i++ {
		select {
		case <-stop:
			return
		case <-time.After(d):
		}
		c.write(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{'c', i}) })
	}
}

// PINGs on an idle HTTP/2 connection (bytes both ways) do not extend its
// lifetime: it counts from the moment the last stream ended, as gRPC-Go's
// MaxConnectionIdle does.
func TestH2PingsDoNotExtendLifetime(t *testing.T) {
	const lifetime = 600 * time.Millisecond
	addr := h2cServer(t, fmt.Sprintf(`"lifetime":%d`, lifetime), nil)
	c := dialH2(t, addr)
	c.get(1, "/")
	idleFrom := c.awaitStreamEnd(1, 3*time.Second)
	stop := make(chan struct{})
	defer close(stop)
	go c.pingEvery(100*time.Millisecond, stop)
	_, goawayAt := c.expectGoAwayPing(3 * time.Second)
	if d := goawayAt.Sub(idleFrom); d > lifetime+300*time.Millisecond {
		t.Fatalf("GOAWAY %v after the connection went idle, with PINGs every 100ms; want at the lifetime %v", d, lifetime)
	}
}

// Where tcpops cannot write frames (h2 over TLS, tcpops before tls), an idle
// connection that may speak HTTP/2 closes once nothing has passed for the
// quiet window, and at most quietMax after it went idle, however chatty
// the client: PINGs every 50ms never leave it quiet.
func TestQuietCapClosesChattyConnection(t *testing.T) {
	const lifetime = 200 * time.Millisecond
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime), `{"wrapper":"tls"}`},
		extra:    `"tls_connection_policies":[{}],`,
		handlers: []string{respond("ok")},
		tlsApp:   selfSignedTLSApp(t),
	}.config())
	c := dialH2TLS(t, addr)
	c.get(1, "/")
	idleFrom := c.awaitStreamEnd(1, 3*time.Second)
	tc := waitTracked(t, c.conn)
	stop := make(chan struct{})
	defer close(stop)
	go c.pingEvery(50*time.Millisecond, stop)
	end := c.next(5 * time.Second)
	_, reason, cause := endOf(tc)
	t.Logf("closed %v after idle: %s/%s (%v)", end.at.Sub(idleFrom), reason, cause, end.err)
	// tcpops sees TLS records here: it must not take them for frames, nor
	// write any of its own into the TLS stream.
	if tc.http.h2.Load() != nil || tc.http.goaway.Load() {
		t.Fatal("tcpops followed HTTP/2 frames on a connection it sees only as TLS records")
	}
	if end.err == nil {
		t.Fatalf("frame %v; want the close", end.typ)
	}
	if d := end.at.Sub(idleFrom); d < quietMax-100*time.Millisecond || d > quietMax+500*time.Millisecond {
		t.Fatalf("closed %v after it went idle; want at the quiet cap %v", d, quietMax)
	}
}

// discardConn is a connection that accepts every write and serves reads
// from src over and over: the data path without the kernel.
type discardConn struct {
	net.Conn
	src []byte
	off int
}

func (d *discardConn) Write(p []byte) (int, error) { return len(p), nil }

func (d *discardConn) Read(p []byte) (int, error) {
	if d.off == len(d.src) {
		d.off = 0
	}
	n := copy(p, d.src[d.off:])
	d.off += n
	return n, nil
}

// benchConn returns the connection the listener wrapper hands an HTTP
// server, in the state a protocol leaves it: "conn" (a tracked Conn of a
// non-HTTP server), "http1" (sniffed HTTP/1.1), "h2" (plaintext HTTP/2,
// frames followed), reading from src.
func benchConn(kind string, src []byte) net.Conn {
	c := &Conn{Conn: &discardConn{src: src}, start: time.Now()}
	if kind == "conn" {
		return c
	}
	c.http = new(httpState)
	hc := httpConn{c}
	switch kind {
	case "http1":
		c.http.proto.Store(protoHTTP1)
	case "h2":
		c.http.proto.Store(protoHTTP2)
		c.http.h2Tracker().In([]byte(http2.ClientPreface), 0)
	}
	return hc
}

// The data path's cost per write: the server writes 16KB DATA frames in
// 4KB pieces (its buffer's size), as Go's HTTP/2 server does.
func BenchmarkDataPathWrite(b *testing.B) {
	var fb bytes.Buffer
	_ = http2.NewFramer(&fb, nil).WriteData(1, false, make([]byte, 16384))
	frame := fb.Bytes()
	for _, kind := range []string{"conn", "http1", "h2"} {
		b.Run(kind, func(b *testing.B) {
			c := benchConn(kind, nil)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				for p := frame; len(p) > 0; {
					k := min(len(p), 4096)
					_, _ = c.Write(p[:k])
					p = p[k:]
				}
			}
		})
	}
}

// The data path's cost per read: the client's 16KB DATA frames, read 4KB
// at a time (Go's server reads through a 4KB buffer).
func BenchmarkDataPathRead(b *testing.B) {
	var fb bytes.Buffer
	_ = http2.NewFramer(&fb, nil).WriteData(1, false, make([]byte, 16384))
	frame := fb.Bytes()
	buf := make([]byte, 4096)
	for _, kind := range []string{"conn", "http1", "h2"} {
		b.Run(kind, func(b *testing.B) {
			c := benchConn(kind, frame)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				for n := 0; n < len(frame); {
					k, _ := c.Read(buf[:min(len(buf), len(frame)-n)])
					n += k
				}
			}
		})
	}
}

// With tcpops after tls (here: tls left out of listener_wrappers, so Caddy
// puts it first), tcpops sees HTTP/2's frames inside TLS and closes an idle
// h2 connection with GOAWAY and PING.
func TestH2OverTLSAfterTLSGoAway(t *testing.T) {
	const lifetime = 400 * time.Millisecond
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)},
		extra:    `"tls_connection_policies":[{}],`,
		handlers: []string{respond("ok")},
		tlsApp:   selfSignedTLSApp(t),
	}.config())
	c := dialH2TLS(t, addr)
	c.get(1, "/")
	c.awaitStreamEnd(1, 3*time.Second)
	tc := waitTracked(t, c.conn)
	data, _ := c.expectGoAwayPing(3 * time.Second)
	c.write(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
	c.expectFinalGoAway(1, 3*time.Second)
	if end := c.next(3 * time.Second); end.err == nil {
		t.Fatalf("frame %v after the acknowledged PING; want the close", end.typ)
	}
	_ = c.conn.Close() // at the server's FIN, as clients do: else the close lingers 5s of quiet first
	assertEnded(t, tc, ReasonTimeout, CauseLifetime)
}

// The provision warning: tcpops before tls on a server that serves TLS and
// may speak h2 over it, and only there.
func TestTLSRecordsOnly(t *testing.T) {
	raw := func(ws ...string) []json.RawMessage {
		var out []json.RawMessage
		for _, w := range ws {
			out = append(out, json.RawMessage(`{"wrapper":"`+w+`"}`))
		}
		return out
	}
	policies := caddytls.ConnectionPolicies{{}}
	for _, tc := range []struct {
		name string
		srv  *caddyhttp.Server
		want bool
	}{
		{"before tls, default protocols", &caddyhttp.Server{ListenerWrappersRaw: raw("tcpops", "tls"), TLSConnPolicies: policies}, true},
		{"before tls, h1 h2", &caddyhttp.Server{ListenerWrappersRaw: raw("proxy_protocol", "tcpops", "tls"), TLSConnPolicies: policies, Protocols: []string{"h1", "h2"}}, true},
		{"before tls, h1 only", &caddyhttp.Server{ListenerWrappersRaw: raw("tcpops", "tls"), TLSConnPolicies: policies, Protocols: []string{"h1"}}, false},
		{"after tls", &caddyhttp.Server{ListenerWrappersRaw: raw("proxy_protocol", "tls", "tcpops"), TLSConnPolicies: policies}, false},
		{"no tls entry", &caddyhttp.Server{ListenerWrappersRaw: raw("tcpops"), TLSConnPolicies: policies}, false},
		{"no TLS served", &caddyhttp.Server{ListenerWrappersRaw: raw("tcpops", "tls")}, false},
	} {
		if got := tlsRecordsOnly(tc.srv); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// proxyV2Header is a PROXY protocol version 2 header: TCP over IPv4 from
// 203.0.113.7:40000 to 127.0.0.1:80.
var proxyV2Header = []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" +
	"\xcb\x00\x71\x07\x7f\x00\x00\x01\x9c\x40\x00\x50")

// bytewiseConn writes its next left bytes one at a time, each once the
// server side tc has read every byte before it (sent so far), so that each
// of the server's reads gets one byte: the most a client's writes, or a
// relay, can split them.
type bytewiseConn struct {
	net.Conn
	t    testing.TB
	tc   *Conn
	sent uint64 // bytes written to Conn so far
	left int
}

func (c *bytewiseConn) Write(p []byte) (int, error) {
	n := 0
	for ; c.left > 0 && n < len(p); n++ {
		eventually(c.t, 5*time.Second, fmt.Sprintf("the server read %d bytes (%d so far)", c.sent, c.tc.bytesIn.Load()),
			func() bool { return c.tc.bytesIn.Load() >= c.sent })
		if _, err := c.Conn.Write(p[n : n+1]); err != nil {
			return n, err
		}
		c.sent++
		c.left--
	}
	m, err := c.Conn.Write(p[n:])
	c.sent += uint64(m)
	return n + m, err
}

// With tcpops before proxy_protocol in listener_wrappers, the client's
// first bytes are a PROXY header (version 1 or 2), then HTTP/2's preface:
// tcpops skips the header, recognises h2c and closes the idle connection
// with GOAWAY and PING, as without the header. Before, it took the header
// for an unknown protocol and closed with a FIN alone. The same when every
// byte of the header and the preface comes in a read of its own: before,
// a first read of "P" was taken for an unknown protocol. A version 1
// header goes at once even then: Caddy's proxy_protocol (go-proxyproto
// v0.15.0, v1.go) refuses one that takes more than one read, as the PROXY
// protocol's text allows ("the sender must always ensure that the header is
// sent at once"); tcpops' own skipper takes it split anyhow (TestSkip).
func TestH2GoAwayBeforeProxyProtocol(t *testing.T) {
	const lifetime = 400 * time.Millisecond
	tcpops := fmt.Sprintf(`{"wrapper":"tcpops","lifetime":%d}`, lifetime)
	pp := `{"wrapper":"proxy_protocol","allow":["127.0.0.0/8"]}`
	for _, tc := range []struct {
		name     string
		wrappers []string
		header   []byte
		bytewise int // of the header, the bytes that may go one at a time (-1: none of the header or preface)
	}{
		{"no header", []string{tcpops}, nil, 0},
		{"v1, tcpops before proxy_protocol", []string{tcpops, pp}, []byte("PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"), 0},
		{"v2, tcpops before proxy_protocol", []string{tcpops, pp}, proxyV2Header, len(proxyV2Header)},
		{"v2, tcpops after proxy_protocol", []string{pp, tcpops}, proxyV2Header, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := freePort(t)
			loadCaddy(t, httpServer{
				listen:   addr,
				wrappers: tc.wrappers,
				extra:    `"protocols":["h1","h2c"],`,
				handlers: []string{respond("ok")},
			}.config())
			for _, bytewise := range []bool{false, true} {
				if bytewise && tc.bytewise < 0 {
					continue
				}
				t.Logf("a byte at a time: %v", bytewise)
				raw, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				var conn net.Conn = raw
				atOnce := tc.header[:len(tc.header)-max(tc.bytewise, 0)]
				if _, err := raw.Write(atOnce); err != nil {
					t.Fatal(err)
				}
				if bytewise {
					conn = &bytewiseConn{Conn: raw, t: t, tc: waitTracked(t, raw), sent: uint64(len(atOnce)), left: tc.bytewise + len(http2.ClientPreface)}
				}
				if _, err := conn.Write(tc.header[len(tc.header)-max(tc.bytewise, 0):]); err != nil {
					t.Fatal(err)
				}
				c := startH2(t, conn)
				c.get(1, "/")
				c.awaitStreamEnd(1, 3*time.Second)
				tracked := waitTracked(t, raw)
				if p := tracked.http.proto.Load(); p != protoHTTP2 {
					t.Fatalf("protocol sniffed %d, want HTTP/2 (%d)", p, protoHTTP2)
				}
				data, goawayAt := c.expectGoAwayPing(3 * time.Second)
				c.write(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
				c.expectFinalGoAway(1, 3*time.Second)
				end := c.next(3 * time.Second)
				if end.err == nil {
					t.Fatalf("after GOAWAY and PING: frame %v, want the close", end.typ)
				}
				if took := end.at.Sub(goawayAt); took >= h2AckTimeout-100*time.Millisecond {
					t.Fatalf("closed %v after the acknowledged PING; want at once", took)
				}
				_ = raw.Close() // as a client does at the FIN: the linger ends at once
				assertEnded(t, tracked, ReasonTimeout, CauseLifetime)
			}
		})
	}
}

// A client that sends fewer bytes than tell its protocol ("PR": HTTP/2's
// preface or a method) and stops holds nothing up: its bytes went on to
// the server, the connection stays unsniffed, and its lifetime closes it
// (gracefully, as one that may speak HTTP/2: no stream to save, so a FIN).
func TestSniffPartialThenSilentCloses(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	addr := h2cServer(t, fmt.Sprintf(`"lifetime":%d`, lifetime), nil)
	for _, first := range []string{"P", "PR", "PRI", "GE"} {
		t.Run(first, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() })
			tc := waitTracked(t, conn)
			if _, err := io.WriteString(conn, first); err != nil {
				t.Fatal(err)
			}
			eventually(t, 3*time.Second, "the server read the bytes", func() bool { return tc.bytesIn.Load() == uint64(len(first)) })
			if p := tc.http.proto.Load(); p != protoUnsniffed {
				t.Fatalf("%q sniffed as %d; too short to tell", first, p)
			}
			if d := waitClosed(t, conn, 5*time.Second); d > lifetime+quietMax+time.Second {
				t.Fatalf("closed after %v; want about the lifetime %v", d, lifetime)
			}
			_ = conn.Close() // at the server's FIN, as clients do: else the close lingers 5s of quiet first
			assertEnded(t, tc, ReasonTimeout, CauseLifetime)
		})
	}
}

// The PING's timeout counts from when the GOAWAY and PING left the send
// queue, not from the decision: a client that reads nothing for longer
// than h2AckTimeout after max_lifetime, its flow-control window open and
// its TCP window full, then reads on and acknowledges the PING only after
// its stream's end, is closed after its ACK. Counted from the decision,
// the timeout had passed before the client could read the GOAWAY, and the
// connection closed as the stream ended, before the ACK.
func TestH2PingTimerFromSendQueue(t *testing.T) {
	const maxLifetime = 300 * time.Millisecond
	backend := startSlowBackend(t)
	addr := h2cServer(t, fmt.Sprintf(`"max_lifetime":%d,"max_lifetime_grace":"30s"`, maxLifetime), backend)
	conn := dialSmallWindow(t, addr)
	c := &h2Client{t: t, conn: conn, fr: http2.NewFramer(conn, conn), frames: make(chan h2Seen, 1000)}
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	c.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	})
	c.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(0, 1<<31-1-65535) })
	tc := waitTracked(t, conn)
	c.get(1, "/?size=4194304")
	eventually(t, 5*time.Second, "GOAWAY decided at max_lifetime", tc.http.goaway.Load)
	time.Sleep(h2AckTimeout + 500*time.Millisecond) // the scenario: a client that reads nothing for that long
	tc.mu.Lock()
	left, _ := tc.goawayLeftLocked()
	tc.mu.Unlock()
	if left {
		t.Fatal("the GOAWAY and PING left the send queue while the client read nothing; the test needs them queued")
	}
	go c.readLoop()
	var ping [8]byte
	var sawGoAway, sawPing bool
	for {
		s := c.next(10 * time.Second)
		if s.err != nil {
			t.Fatalf("connection ended before stream 1 did: %v (GOAWAY %v, PING %v)", s.err, sawGoAway, sawPing)
		}
		switch {
		case s.typ == http2.FrameGoAway:
			sawGoAway = true
		case s.typ == http2.FramePing:
			ping, sawPing = s.ping, true
		}
		if s.stream == 1 && s.typ == http2.FrameData && s.flags.Has(http2.FlagDataEndStream) {
			break
		}
	}
	if !sawGoAway || !sawPing {
		t.Fatalf("stream 1 ended; GOAWAY %v, PING %v: want both before", sawGoAway, sawPing)
	}
	c.write(func(fr *http2.Framer) error { return fr.WritePing(true, ping) })
	if final := c.next(5 * time.Second); final.err != nil || final.typ != http2.FrameGoAway {
		t.Fatalf("after the PING's ACK: frame %v (%v), want the final GOAWAY", final.typ, final.err)
	}
	if end := c.next(5 * time.Second); end.err == nil {
		t.Fatalf("after the final GOAWAY: frame %v, want the close", end.typ)
	}
	if !tc.http.h2.Load().Acked() {
		t.Fatal("closed before the PING's ACK came, though it came within h2AckTimeout of the client reaching the PING")
	}
	_ = conn.Close()
	assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
}

// A header block larger than one frame (HEADERS with END_STREAM, then
// CONTINUATIONs, which Go's server writes straight to the conn in separate
// Writes, its buffer being 4KB) that finishes during the drain arrives
// whole: a 204 with a 30KB header, read by x/net's HTTP/2 client and by
// curl. Before, the stream counted as ended when its HEADERS passed, and
// the connection closed before the CONTINUATIONs: curl reported "stream 1
// was not closed cleanly".
func TestH2HeaderBlockFinishesDuringDrain(t *testing.T) {
	const maxLifetime, delay, header = 300 * time.Millisecond, time.Second, 30000
	backend := startSlowBackend(t)
	addr := h2cServer(t, fmt.Sprintf(`"max_lifetime":%d,"max_lifetime_grace":"10s"`, maxLifetime), backend)
	path := fmt.Sprintf("/?delay=%v&status=204&header=%d", delay, header)
	want := string(responseBody(header))

	t.Run("x/net", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		cc, err := (&http2.Transport{AllowHTTP: true}).NewClientConn(conn)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
		type result struct {
			resp *http.Response
			err  error
		}
		done := make(chan result, 1)
		go func() {
			resp, err := cc.RoundTrip(req)
			done <- result{resp, err}
		}()
		tc := waitTracked(t, conn)
		// The setup: the GOAWAY goes out (by max_lifetime's timer) while
		// the request waits for the backend.
		eventually(t, 3*time.Second, "GOAWAY sent while the request is in flight", tc.http.goaway.Load)
		r := <-done
		if r.err != nil {
			t.Fatalf("request: %v", r.err)
		}
		_ = r.resp.Body.Close()
		if r.resp.StatusCode != 204 || r.resp.Header.Get("X-Big") != want {
			t.Fatalf("status %d, X-Big of %d bytes; want 204 and %d", r.resp.StatusCode, len(r.resp.Header.Get("X-Big")), header)
		}
		assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
	})

	t.Run("curl", func(t *testing.T) {
		curl, err := exec.LookPath("curl")
		if err != nil {
			t.Skip("no curl (.ci/run installs it)")
		}
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(curl, "-sS", "-v", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "http://"+addr+path)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("curl: %v\n%s", err, stderr.String())
		}
		// The setup: curl saw tcpops' GOAWAY before the response.
		if !strings.Contains(stderr.String(), "GOAWAY") {
			t.Fatalf("curl saw no GOAWAY:\n%s", stderr.String())
		}
		head := stdout.String()
		if !strings.HasPrefix(head, "HTTP/2 204") || !strings.Contains(head, "x-big: "+want+"\r\n") {
			t.Fatalf("curl's response head (%d bytes) lacks the 204 or the whole X-Big:\n%.300s", len(head), head)
		}
	})
}

// A client that opens a stream after its PING ACK (which RFC 9113 section
// 6.8 forbids after a GOAWAY, but a client may race) receives the final
// GOAWAY, whose last stream id is the last stream it opened before the
// ACK, below the late one, and then the close; the server never reads the
// late stream (the backend counts the requests), so the GOAWAY's word that
// it was not processed holds. Idle: the ACK and the late HEADERS in one
// write; max_lifetime: a stream in flight, the late HEADERS in a write of
// its own, and the stream in flight completes.
func TestH2FinalGoAwayAfterPingAck(t *testing.T) {
	for _, tc := range []struct {
		name, wrapper, first string
		conns                int // one after the other: the ACK races the first GOAWAY's Write
	}{
		{"idle, one write", `"lifetime":"400ms"`, "/?size=10", 8},
		{"stream in flight, later write", `"max_lifetime":"400ms","max_lifetime_grace":"10s"`, "/?delay=1500ms&size=10", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := startSlowBackend(t)
			addr := h2cServer(t, tc.wrapper, backend)
			for i := range tc.conns {
				finalGoAwayAfterPingAck(t, addr, tc.first, backend, int32(i+1))
			}
		})
	}
}

// finalGoAwayAfterPingAck is one connection of TestH2FinalGoAwayAfterPingAck,
// its first request to path; the backend has then served served requests.
func finalGoAwayAfterPingAck(t *testing.T, addr, path string, backend *slowBackend, served int32) {
	t.Helper()
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	bc := &bytewiseConn{Conn: raw, t: t} // counts what the client sends
	c := startH2(t, bc)
	c.get(1, path)
	inFlight := strings.Contains(path, "delay")
	if !inFlight {
		c.awaitStreamEnd(1, 3*time.Second)
	}
	tracked := waitTracked(t, raw)
	data, _ := c.expectGoAwayPing(3 * time.Second)
	if inFlight {
		c.write(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
		// The late stream once tcpops has seen the ACK.
		eventually(t, 3*time.Second, "the ACK seen", func() bool { return tracked.http.h2.Load().Acked() })
		c.get(3, "/?size=10")
	} else {
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		_ = fr.WritePing(true, data)
		_ = writeGet(fr, 3, "/?size=10")
		c.write(func(*http2.Framer) error { _, err := c.conn.Write(b.Bytes()); return err })
	}
	c.expectFinalGoAway(1, 3*time.Second)
	if inFlight {
		// A frame the server must read, split a byte per read
		// after the ACK (where tcpops holds a frame header back
		// until it is whole): a PING, which Go's server
		// answers; the stream in flight still completes.
		c.write(func(fr *http2.Framer) error {
			bc.tc, bc.left = tracked, h2frame.HeaderLen+8
			return fr.WritePing(false, [8]byte{'b', 'y', 't', 'e'})
		})
		for acked := false; !acked; {
			select {
			case f := <-c.frames:
				if f.err != nil {
					t.Fatalf("connection ended before the PING's ACK: %v", f.err)
				}
				acked = f.typ == http2.FramePing && f.flags.Has(http2.FlagPingAck) && f.ping == [8]byte{'b', 'y', 't', 'e'}
			case <-time.After(3 * time.Second):
				t.Fatal("no ACK of the PING sent a byte per read")
			}
		}
		c.awaitStreamEnd(1, 5*time.Second)
	}
	if end := c.next(3 * time.Second); end.err == nil {
		t.Fatalf("frame %v of stream %d after the final GOAWAY; want the close", end.typ, end.stream)
	}
	if n := backend.requests.Load(); n != served {
		t.Fatalf("the backend served %d requests; want %d (stream 3 withheld)", n, served)
	}
	cause := CauseLifetime
	if inFlight {
		cause = CauseMaxLifetime
	}
	_ = raw.Close() // as a client does at the FIN: the linger ends at once
	assertEnded(t, tracked, ReasonTimeout, cause)
}
