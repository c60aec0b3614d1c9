package tcpops

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"reflect"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// This file is the test harness every test in the package shares: a real
// in-process Caddy, loopback peers, and conditions to await instead of
// sleeps.

// TestMain runs the tests, or, in a child process that command_test.go
// starts, Caddy's own main instead (caddyMainChild).
func TestMain(m *testing.M) {
	if raw := os.Getenv("TCPOPS_TEST_CADDY_ARGS"); raw != "" {
		caddyMainChild(raw)
	}
	os.Exit(m.Run())
}

// freePort returns a loopback TCP address that was free a moment ago, for a
// server that binds it itself (Caddy's listeners). Its port lies below the
// kernel's ephemeral range (ip_local_port_range, from 32768 by default),
// where the kernel picks the port of every bind to port 0 and every
// connect: a port found free inside that range can be taken by such a pick
// before Caddy binds it, and a cold CI run lost TestFaultTable so ("bind:
// address already in use", among the upstreams and clients of its 21
// cells). Below the range only freePort hands ports out, each once per
// process, from a random start (a fuzz worker, or the namespace child of
// TestFaultTable, is a process of its own).
func freePort(t testing.TB) string {
	t.Helper()
	ports.once.Do(func() {
		top := 32768
		if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
			var lo, hi int
			if _, err := fmt.Sscan(string(b), &lo, &hi); err == nil && lo > 1024+portSpan {
				top = min(top, lo)
			}
		}
		ports.base = top - portSpan
		ports.next.Store(uint32(rand.IntN(portSpan)))
	})
	for range portSpan {
		p := ports.base + int(ports.next.Add(1)%portSpan)
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			continue // another program's
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		return addr
	}
	t.Fatalf("no free loopback port from %d to %d", ports.base, ports.base+portSpan-1)
	return ""
}

// freePort's ports lie below the kernel's ephemeral range, each handed out
// once, while the kernel's own picks (a bind to port 0, a connect) land in
// the range: none of those can take a port freePort gave before Caddy
// binds it.
func TestFreePortBelowEphemeralRange(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Skipf("no ephemeral port range to read: %v", err)
	}
	var lo, hi int
	if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil {
		t.Fatalf("ip_local_port_range %q: %v", b, err)
	}
	portOf := func(addr string) int {
		_, p, _ := net.SplitHostPort(addr)
		n, _ := strconv.Atoi(p)
		return n
	}
	seen := map[int]bool{}
	for range 500 {
		p := portOf(freePort(t))
		if p >= lo || p < 1024 || seen[p] {
			t.Fatalf("freePort gave port %d (seen before: %v); want each port once, from 1024 to below the ephemeral range %d-%d", p, seen[p], lo, hi)
		}
		seen[p] = true
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, p := range []int{portOf(ln.Addr().String()), portOf(c.LocalAddr().String())} {
		if p < lo || p > hi {
			t.Fatalf("the kernel picked port %d, outside its ephemeral range %d-%d: the premise of freePort does not hold", p, lo, hi)
		}
	}
}

// portSpan is how many ports below the ephemeral range freePort hands out.
const portSpan = 8192

// ports is freePort's state: the lowest port it hands out, and a counter
// that picks the next.
var ports struct {
	once sync.Once
	base int
	next atomic.Uint32
}

// loadCaddy runs Caddy in process with the JSON config and stops it when the
// test ends. Caddy is process-global: tests that use it must not be parallel.
func loadCaddy(t testing.TB, config any) {
	t.Helper()
	var raw []byte
	switch c := config.(type) {
	case string:
		raw = []byte(c)
	case []byte:
		raw = c
	default:
		var err error
		if raw, err = json.Marshal(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := caddy.Load(raw, true); err != nil {
		t.Fatalf("loading config: %v\n%s", err, raw)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
}

// l4Config returns a Caddy JSON config with one layer4 server listening on
// listen with the given route handlers (JSON objects) in a single route.
func l4Config(listen string, handlers ...string) string {
	return fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"srv0":{"listen":[%q],"routes":[{"handle":[%s]}]}}}}}`,
		listen, joinJSON(handlers))
}

func joinJSON(parts []string) string {
	s := ""
	for i, p := range parts {
		if i > 0 {
			s += ","
		}
		s += p
	}
	return s
}

// proxyTo is the caddy-l4 proxy handler JSON for one upstream.
func proxyTo(upstream string) string {
	return fmt.Sprintf(`{"handler":"proxy","upstreams":[{"dial":[%q]}]}`, upstream)
}

// upstream is a loopback TCP server that records its connections; by
// default it echoes and closes when the client half-closes.
type upstream struct {
	ln     net.Listener
	handle func(net.Conn)

	mu    sync.Mutex
	conns []net.Conn
	ended chan net.Conn // each connection once its handler returned (the first 1024 unread)
	wg    sync.WaitGroup
}

// startUpstream starts an upstream with handle (nil: echo until EOF, then
// close). It is closed, with all its connections, when the test ends.
func startUpstream(t testing.TB, handle func(net.Conn)) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if handle == nil {
		handle = func(c net.Conn) { _, _ = io.Copy(c, c) }
	}
	u := &upstream{ln: ln, handle: handle, ended: make(chan net.Conn, 1024)}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns = append(u.conns, c)
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.handle(c)
				_ = c.Close()
				select {
				case u.ended <- c:
				default: // nobody is counting past the buffer; never block the close
				}
			}()
		}
	}()
	t.Cleanup(u.close)
	return u
}

func (u *upstream) addr() string { return u.ln.Addr().String() }

func (u *upstream) close() {
	_ = u.ln.Close()
	u.mu.Lock()
	for _, c := range u.conns {
		_ = c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}

// silentUpstream reads and discards until EOF or error, and ignores EOF: it
// keeps its connection open until the test ends. This is the upstream that
// keeps caddy-l4's proxy session alive after the client side is closed.
func silentUpstream(stop <-chan struct{}) func(net.Conn) {
	return func(c net.Conn) {
		_, _ = io.Copy(io.Discard, c)
		<-stop
	}
}

// The loopback helpers shared with test/e2e.
var (
	dial       = testutil.Dial
	roundTrip  = testutil.RoundTrip
	eventually = testutil.Eventually
)

// waitClosed waits up to within for the peer to close c and returns how long
// that took; it fails the test if c is still open then. Data that arrives is
// discarded.
func waitClosed(t testing.TB, c net.Conn, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(within))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection still open after %v", within)
		}
		return time.Since(start)
	}
}

// assertOpen checks that c stays open (no EOF, no error) for d.
func assertOpen(t testing.TB, c net.Conn, d time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	var b [1]byte
	_, err := c.Read(b[:])
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("connection not open for %v: read returned %v", d, err)
	}
}

// busyUntilClosed keeps c busy with exchange (a request and its answer)
// every 50ms until exchange fails because c was closed, and returns how long
// after start that was. It fails the test if c is still open four
// maxLifetimes after start. Within 100ms of the max_lifetime the exchanges
// follow one another without pause, so that the close is seen at once.
func busyUntilClosed(t testing.TB, c net.Conn, start time.Time, maxLifetime time.Duration, exchange func() error) time.Duration {
	t.Helper()
	defer func() { _ = c.SetDeadline(time.Time{}) }()
	_ = c.SetDeadline(start.Add(4 * maxLifetime))
	for exchange() == nil {
		if time.Since(start) < maxLifetime-100*time.Millisecond {
			time.Sleep(50 * time.Millisecond) // the pace of the traffic, not a wait for a condition
		}
	}
	took := time.Since(start)
	if took >= 4*maxLifetime {
		t.Fatalf("busy connection still open %v after it was opened; want it closed by the %v max_lifetime", took, maxLifetime)
	}
	return took
}

// trackedBy returns the tracked connection whose remote address is the
// local address of the client conn c (the server side of c in Caddy).
func trackedBy(c net.Conn) *Conn {
	var found *Conn
	want := c.LocalAddr().String()
	connections.each(func(tc *Conn) bool {
		// The socket's own peer: behind proxy_protocol, tc.RemoteAddr is
		// the PROXY header's, and asking before the header waits for it.
		if tc.tcp != nil && tc.tcp.RemoteAddr().String() == want {
			found = tc
			return false
		}
		return true
	})
	return found
}

// waitTracked waits until Caddy tracks the server side of client c.
func waitTracked(t testing.TB, c net.Conn) *Conn {
	t.Helper()
	var tc *Conn
	eventually(t, 5*time.Second, "connection tracked, its options applied", func() bool {
		tc = trackedBy(c)
		return tc != nil && optionsApplied(tc)
	})
	return tc
}

// optionsApplied reports whether the tracker's options are in force on c:
// track registers a connection (so that it can be found) before it applies
// the options (Conn.change sets the socket's, then c.opts, under c.mu).
func optionsApplied(c *Conn) bool {
	if c.tracker == nil || c.tracker.opts == nil || reflect.ValueOf(*c.tracker.opts).IsZero() {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return !reflect.ValueOf(c.opts).IsZero()
}

// waitRegistryEmpty waits until no connection is tracked.
func waitRegistryEmpty(t testing.TB) {
	t.Helper()
	eventually(t, 5*time.Second, "registry empty", func() bool { return connections.len() == 0 })
}
