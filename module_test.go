package tcpops

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	zapobserver "go.uber.org/zap/zaptest/observer"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// handleOnPair runs a tcpops handler with options opts on the server side of
// a fresh loopback connection, as caddy-l4's server would, and returns the
// server-side socket for reading options back. next runs as the rest of the
// route.
func handleOnPair(t *testing.T, opts string, before func(*net.TCPConn)) *net.TCPConn {
	t.Helper()
	var h Handler
	if err := json.Unmarshal([]byte(opts), &h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client := dial(t, ln.Addr().String())
	_ = client
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	server := sc.(*net.TCPConn)
	t.Cleanup(func() { _ = server.Close() })
	if before != nil {
		before(server)
	}
	cx := layer4.WrapConnection(server, nil, zap.NewNop())
	var inNext net.Conn
	err = h.Handle(cx, layer4.HandlerFunc(func(cx *layer4.Connection) error {
		inNext = cx.Conn
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := inNext.(*Conn); !ok {
		t.Fatalf("next saw %T, want the tcpops *Conn", inNext)
	}
	return server
}

// TestSocketOptionsReadBack sets each option on a real socket and reads it
// back with getsockopt.
func TestSocketOptionsReadBack(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   string
		before func(*net.TCPConn)
		want   sockopts
	}{
		{"kamailio positional", `{"keepalive":{"idle":"60s","count":5,"interval":"5s"},"user_timeout":"75s"}`, nil,
			sockopts{keepalive: 1, idle: 60, count: 5, interval: 5, userTimeout: 75000}},
		{"extremes", `{"keepalive":{"idle":"32767s","count":127,"interval":"1s"},"user_timeout":"1ms"}`, nil,
			sockopts{keepalive: 1, idle: 32767, count: 127, interval: 1, userTimeout: 1}},
		{"off reads back 0", `{"keepalive":{"off":true},"user_timeout":"off"}`,
			func(c *net.TCPConn) {
				_ = c.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 20 * time.Second, Interval: 10 * time.Second, Count: 3})
			},
			sockopts{keepalive: 0, idle: 20, count: 3, interval: 10, userTimeout: 0}},
		{"fields left out keep earlier values", `{"keepalive":{"count":2}}`,
			func(c *net.TCPConn) {
				_ = c.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 40 * time.Second, Interval: 20 * time.Second, Count: 7})
			},
			sockopts{keepalive: 1, idle: 40, count: 2, interval: 20}},
		{"on keeps go defaults", `{"keepalive":{}}`, nil,
			sockopts{keepalive: 1, idle: 15, count: 9, interval: 15}},
		{"no keepalive leaves it alone", `{"lifetime":"1h"}`,
			func(c *net.TCPConn) { _ = c.SetKeepAlive(false) },
			sockopts{keepalive: 0, idle: 15, count: 9, interval: 15}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := readSockopts(t, handleOnPair(t, tc.opts, tc.before))
			if got != tc.want {
				t.Fatalf("getsockopt: got %+v, want %+v", got, tc.want)
			}
		})
	}
	waitRegistryEmpty(t)
}

// goroutineSet counts the goroutines running now by what they run: the
// functions on each one's stack, outermost last, without arguments, lines
// or ids. The calling goroutine is left out.
type goroutineSet map[string]int

func goroutines() goroutineSet {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	set := goroutineSet{}
	// The first stack is the caller's.
	for _, stack := range strings.Split(string(buf), "\n\n")[1:] {
		var funcs []string
		for _, line := range strings.Split(stack, "\n")[1:] { // after "goroutine N [state]:"
			if line == "" || line[0] == '\t' {
				continue // the file:line of the function above
			}
			if i := strings.LastIndex(line, "("); i > 0 && !strings.HasPrefix(line, "created by ") {
				line = line[:i]
			}
			if i := strings.Index(line, " in goroutine "); i > 0 {
				line = line[:i]
			}
			funcs = append(funcs, line)
		}
		set[strings.Join(funcs, " < ")]++
	}
	return set
}

// goroutinesSettle waits until no goroutine runs but the kinds of base, as
// many of each at most (goroutines): one that a test left behind is found
// even where another that was running at base has ended meanwhile.
func goroutinesSettle(t *testing.T, base goroutineSet) {
	t.Helper()
	var extra []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		extra = extra[:0]
		for stack, n := range goroutines() {
			if n > base[stack] {
				extra = append(extra, fmt.Sprintf("%d more (%d at the start): %s", n-base[stack], base[stack], stack))
			}
		}
		if len(extra) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines left 5s after the test, beyond those running at its start:\n%s", strings.Join(extra, "\n"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// layer4Accepting returns the goroutines running once the accept loops of
// n layer4 servers are in Accept. Load starts each loop in a goroutine of
// its own, which on a loaded machine may not have run yet when Load
// returns; its stack then is not the one it settles in, and
// goroutinesSettle took it for one a test left behind (2 more
// "layer4.(*Server).serve < ... Accept", 0 at the start, in a shuffled
// run beside two CPU burners). Only a loop parked in the poller counts:
// one still inside the accept4 call that found no connection has another
// stack, and a cold CI run failed on "1 more (1 at the start)" of the
// parked kind when one of two loops was caught there at the start.
func layer4Accepting(t *testing.T, n int) goroutineSet {
	t.Helper()
	var set goroutineSet
	eventually(t, 5*time.Second, fmt.Sprintf("%d layer4 servers in Accept", n), func() bool {
		set = goroutines()
		k := 0
		for stack, m := range set {
			if strings.HasPrefix(stack, "internal/poll.runtime_pollWait <") &&
				strings.Contains(stack, "layer4.(*Server).serve") && strings.Contains(stack, ".Accept") {
				k += m
			}
		}
		return k >= n
	})
	return set
}

func TestProxyDataAndHalfClose(t *testing.T) {
	// The upstream answers "bye", then closes: the client must see EOF at
	// once, not when the (long) lifetime fires.
	up := startUpstream(t, func(c net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err == nil {
			_, _ = io.WriteString(c, "bye:"+string(buf))
		}
	})
	echo := startUpstream(t, nil)
	addr, addr2 := freePort(t), freePort(t)
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{
 "a":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops","lifetime":"1h","keepalive":{"idle":"9s"}},%s]}]},
 "b":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops_test_hold","name":"half-close"},{"handler":"tcpops","lifetime":"1h"},%s]}]}}}}}`,
		addr, proxyTo(up.addr()), addr2, proxyTo(echo.addr())))
	base := layer4Accepting(t, 2)

	t.Run("upstream closes first", func(t *testing.T) {
		c := dial(t, addr)
		if _, err := io.WriteString(c, "hello"); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "bye:hello" {
			t.Fatalf("got %q, %v; want bye:hello and EOF", got, err)
		}
	})
	t.Run("client half-closes first", func(t *testing.T) {
		// The route holds the connection open after the proxy is done
		// (holdAfter), so the client can see EOF only through the proxy's
		// CloseWrite of the client side, which must cross tcpops' wrapper
		// to the socket, and not through the server's Close.
		release := holdAfter(t, "half-close")
		c := dial(t, addr2)
		roundTrip(t, c, "ping")
		if _, err := io.WriteString(c, "last words"); err != nil {
			t.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		// The echo upstream gets the proxy's half-close of its side,
		// finishes echoing and closes; the proxy then half-closes the
		// client's side.
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "last words" {
			t.Fatalf("got %q, %v after half-close; want the echo, then EOF while the route still holds the connection "+
				"(the proxy's CloseWrite through tcpops' wrapper)", got, err)
		}
		release()
	})
	waitRegistryEmpty(t)
	goroutinesSettle(t, base)
}

// timerSlack is how late a close from a lifetime timer may come in these
// tests: the timer's own lateness, the close and the wake-up of the peer's
// read, on a loaded machine under -race. It is below every lifetime the
// max_lifetime tests run alongside, so that a max_lifetime honoured only
// at the lifetime timer's next wake-up (one lifetime late) fails them.
const timerSlack = 150 * time.Millisecond

func TestProxyLifetimeAndMaxLifetime(t *testing.T) {
	up := startUpstream(t, nil)
	idleAddr, maxAddr, maxOnlyAddr := freePort(t), freePort(t), freePort(t)
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{
 "idle":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops","lifetime":"400ms"},%s]}]},
 "max":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops","lifetime":"400ms","max_lifetime":"1200ms"},%s]}]},
 "maxonly":{"listen":[%q],"routes":[{"handle":[{"handler":"tcpops","max_lifetime":"800ms"},%s]}]}}}}}`,
		idleAddr, proxyTo(up.addr()), maxAddr, proxyTo(up.addr()), maxOnlyAddr, proxyTo(up.addr())))
	base := layer4Accepting(t, 3)

	t.Run("busy connection outlives its lifetime", func(t *testing.T) {
		c := dial(t, idleAddr)
		start := time.Now()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for time.Since(start) < 1200*time.Millisecond { // three lifetimes of traffic
			<-tick.C
			roundTrip(t, c, "x")
		}
		// ...and once it falls silent it is closed one lifetime later.
		took := waitClosed(t, c, 3*time.Second)
		if took < 350*time.Millisecond || took > 1500*time.Millisecond {
			t.Fatalf("closed %v after the last traffic; want about 400ms", took)
		}
	})
	t.Run("idle connection closed on both sides", func(t *testing.T) {
		c := dial(t, idleAddr)
		roundTrip(t, c, "hi")
		// The echo answered, so the upstream has accepted this client's
		// session, after every earlier one: it is the last it accepted.
		up.mu.Lock()
		upConn := up.conns[len(up.conns)-1]
		up.mu.Unlock()
		took := waitClosed(t, c, 3*time.Second)
		if took > 400*time.Millisecond+timerSlack {
			t.Fatalf("client saw the close %v after its last byte came back; want the 400ms lifetime", took)
		}
		// Only this session's end counts: the previous subtest's may
		// come now too.
		deadline := time.After(3 * time.Second)
		for ended := false; !ended; {
			select {
			case ec := <-up.ended:
				ended = ec == upConn
			case <-deadline:
				t.Fatal("upstream connection still open after the client side was closed")
			}
		}
	})
	t.Run("max_lifetime closes a busy connection", func(t *testing.T) {
		// A 400ms lifetime wakes its timer all along: a max_lifetime left
		// out of the timer's arming would still be noticed, one lifetime
		// late at worst. The max_lifetime-only subtest below catches that.
		took, tc := closedWhileBusy(t, maxAddr, 1200*time.Millisecond)
		if took < 1200*time.Millisecond-20*time.Millisecond || took > 1200*time.Millisecond+timerSlack {
			t.Fatalf("closed %v after the dial; want the 1.2s max_lifetime", took)
		}
		assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
	})
	t.Run("max_lifetime alone closes a busy connection", func(t *testing.T) {
		// No lifetime: only max_lifetime arms the timer.
		took, tc := closedWhileBusy(t, maxOnlyAddr, 800*time.Millisecond)
		if took < 800*time.Millisecond-20*time.Millisecond || took > 800*time.Millisecond+timerSlack {
			t.Fatalf("closed %v after the dial; want the 800ms max_lifetime", took)
		}
		assertEnded(t, tc, ReasonTimeout, CauseMaxLifetime)
	})
	waitRegistryEmpty(t)
	goroutinesSettle(t, base)
}

// closedWhileBusy dials addr and echoes a byte through it until the
// connection is closed; it returns how long after the dial that was, and the
// tracked connection.
func closedWhileBusy(t *testing.T, addr string, maxLifetime time.Duration) (time.Duration, *Conn) {
	t.Helper()
	c := dial(t, addr)
	start := time.Now()
	roundTrip(t, c, "x")
	tc := waitTracked(t, c)
	b := make([]byte, 1)
	took := busyUntilClosed(t, c, start, maxLifetime, func() error {
		if _, err := c.Write(b); err != nil {
			return err
		}
		_, err := io.ReadFull(c, b)
		return err
	})
	return took, tc
}

// TestSecondTcpopsRaisesLifetime is Kamailio's use: a short lifetime for
// every connection, raised for one that sends a REGISTER, by a second tcpops
// in a later route that updates the first instead of stacking.
func TestSecondTcpopsRaisesLifetime(t *testing.T) {
	waitRegistryEmpty(t) // it counts the tracked connections
	up := startUpstream(t, nil)
	addr := freePort(t)
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"sip":{"listen":[%q],"routes":[
 {"handle":[{"handler":"tcpops","lifetime":"300ms","keepalive":{"idle":"60s","count":5,"interval":"5s"}}]},
 {"match":[{"regexp":{"pattern":"^REGISTER\\s","count":9}}],"handle":[{"handler":"tcpops","lifetime":"1h","keepalive":{"count":3}}]},
 {"handle":[%s]}]}}}}}`, addr, proxyTo(up.addr())))

	options := dial(t, addr)
	roundTrip(t, options, "OPTIONS sip:a SIP/2.0\r\n\r\n")
	register := dial(t, addr)
	roundTrip(t, register, "REGISTER sip:a SIP/2.0\r\n\r\n")

	reg := waitTracked(t, register)
	if got := readSockopts(t, reg.tcp); got.idle != 60 || got.count != 3 || got.interval != 5 {
		t.Fatalf("REGISTER connection's keepalive: %+v, want idle 60 (first tcpops), count 3 (second), interval 5", got)
	}
	if n := connections.len(); n != 2 {
		t.Fatalf("%d tracked connections, want 2: a second tcpops must not track again", n)
	}
	waitClosed(t, options, 3*time.Second)
	assertOpen(t, register, 600*time.Millisecond)
	if lt, _ := reg.timesLeft(); lt < 59*time.Minute {
		t.Fatalf("REGISTER connection's lifetime left: %v, want about 1h", lt)
	}
}

// TestBehindTLS checks that tcpops after caddy-l4's tls handler still
// reaches the TCP socket under the TLS connection.
func TestBehindTLS(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	certPEM, keyPEM := loopbackCertPEM(t)
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{
			"tls": map[string]any{"certificates": map[string]any{"load_pem": []any{
				map[string]any{"certificate": certPEM, "key": keyPEM},
			}}},
			"layer4": map[string]any{"servers": map[string]any{"tls": map[string]any{
				"listen": []string{addr},
				"routes": []any{map[string]any{"handle": []json.RawMessage{
					json.RawMessage(`{"handler":"tls"}`),
					json.RawMessage(`{"handler":"tcpops","keepalive":{"idle":"33s","count":4,"interval":"11s"},"user_timeout":"1500ms","lifetime":"1h"}`),
					json.RawMessage(proxyTo(up.addr())),
				}}},
			}}},
		},
	}
	loadCaddy(t, cfg)
	raw := dial(t, addr)
	c := tls.Client(raw, &tls.Config{ServerName: "localhost", InsecureSkipVerify: true})
	roundTrip(t, c, "over tls")
	tc := waitTracked(t, raw)
	if _, ok := tc.Conn.(*layer4.Connection); !ok {
		// after the tls handler, cx.Conn is a *tls.Conn; what tcpops wraps
		t.Logf("tcpops wrapped %T", tc.Conn)
	}
	if got := readSockopts(t, tc.tcp); got.idle != 33 || got.count != 4 || got.interval != 11 || got.userTimeout != 1500 {
		t.Fatalf("socket options behind tls: %+v", got)
	}
}

// TestUDPRouteUntouched checks that a UDP route with tcpops still serves
// datagrams: keepalive does not apply, and tcpops stays out of the way.
func TestUDPRouteUntouched(t *testing.T) {
	waitRegistryEmpty(t) // it counts the tracked connections
	echo, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := echo.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = echo.WriteTo(buf[:n], from)
		}
	}()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	_ = pc.Close()
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"udp":{"listen":["udp/%s"],"routes":[{"handle":[
 {"handler":"tcpops","keepalive":{"idle":"5s"},"lifetime":"1h"},
 {"handler":"proxy","upstreams":[{"dial":["udp/%s"]}]}]}]}}}}}`, addr, echo.LocalAddr()))
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	for i := range 3 {
		msg := fmt.Sprintf("datagram %d", i)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != msg {
			t.Fatalf("got %q, %v; want %q", buf[:n], err, msg)
		}
	}
	if n := connections.len(); n != 0 {
		t.Fatalf("%d UDP flows tracked; tcpops must leave UDP alone", n)
	}
}

// TestSilentUpstreamAfterLifetime pins what tcpops guarantees when its
// lifetime closes the client side of a proxied session whose upstream
// ignores EOF: the client sees the close on time, tcpops ends the tracked
// connection at once, the upstream is told (caddy-l4 v0.1.2 half-closes
// it), and the session ends at the latest when the upstream sends
// something. It does not require caddy-l4 to keep the session meanwhile
// (v0.1.2 does: README, "What happens to the upstream"), so that it stays
// true when caddy-l4 closes the upstream itself.
func TestSilentUpstreamAfterLifetime(t *testing.T) {
	const lifetime = 300 * time.Millisecond
	accepted := make(chan struct{})
	upEOF := make(chan time.Time, 1)
	speak := make(chan struct{})
	gone := make(chan error, 1)
	up := startUpstream(t, func(c net.Conn) {
		close(accepted)
		_, _ = io.Copy(io.Discard, c) // until the proxy's half-close (or close)
		upEOF <- time.Now()
		<-speak
		// A byte at a time until the proxy's socket is gone: data sent to
		// a closed socket is answered with a reset, which fails a write.
		for {
			if _, err := io.WriteString(c, "?"); err != nil {
				gone <- err
				return
			}
			time.Sleep(10 * time.Millisecond) // the pace of the writes
		}
	})
	var once sync.Once
	speakNow := func() { once.Do(func() { close(speak) }) }
	t.Cleanup(speakNow) // before the upstream's clean-up closes its connection and waits for this handler
	addr := freePort(t)
	loadCaddy(t, l4Config(addr, fmt.Sprintf(`{"handler":"tcpops","lifetime":%d}`, lifetime), proxyTo(up.addr())))
	baseline := baselineGoroutines()

	c := dial(t, addr)
	start := time.Now()
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy never dialed the upstream")
	}
	waitClosed(t, c, 3*time.Second)
	closedAt := time.Now()
	took := closedAt.Sub(start)
	if took < lifetime || took > lifetime+timerSlack {
		t.Fatalf("client saw the close %v after its last byte; want the %v lifetime", took, lifetime)
	}
	waitRegistryEmpty(t)

	select {
	case at := <-upEOF:
		if d := at.Sub(closedAt); d > timerSlack {
			t.Fatalf("the upstream was told (EOF) %v after the client's close", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the upstream never saw EOF after the client side was closed")
	}
	// caddy-l4 v0.1.2 keeps the session (its goroutines and the upstream
	// socket) while the upstream stays silent; the upstream's first bytes
	// end it, as the proxy fails to write them to the closed client.
	speakNow()
	select {
	case err := <-gone:
		t.Logf("the upstream's writes failed once the proxy had closed its side: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy's upstream socket still open 5s after the upstream started to write")
	}
	checkNoLeaks(t, baseline)
}

// loopbackCertPEM returns a certificate and key for localhost and
// 127.0.0.1 (testutil.NewPKI's server certificate; clients skip verifying
// it).
func loopbackCertPEM(t testing.TB) (certPEM, keyPEM string) {
	t.Helper()
	p := testutil.NewPKI(t, t.TempDir())
	cert, err := os.ReadFile(p.ServerCert)
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(p.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(cert), string(key)
}

// TestSockoptFailureServesConnection forces a setsockopt failure on a live,
// proxied connection (a value the load-time checks would refuse, applied
// past them) and checks it is logged with the conid, option, value and
// errno, and that the connection is still served.
func TestSockoptFailureServesConnection(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	loadCaddy(t, l4Config(addr, `{"handler":"tcpops","keepalive":{"idle":"20s"}}`, proxyTo(up.addr())))
	c := dial(t, addr)
	roundTrip(t, c, "before")
	tc := waitTracked(t, c)

	core, logs := zapobserver.New(zap.WarnLevel)
	tc.update(&Options{Keepalive: &Keepalive{Count: 200, Idle: Duration(40000 * time.Second)}}, zap.New(core))

	if got := logs.FilterMessage("tcpops: setting socket option failed; connection served without it").All(); len(got) != 2 {
		t.Fatalf("%d failure logs, want 2 (TCP_KEEPIDLE and TCP_KEEPCNT): %v", len(got), logs.All())
	}
	for _, e := range logs.All() {
		f := e.ContextMap()
		if f["conid"] != tc.id || f["option"] == "" || f["error"] == nil {
			t.Errorf("log fields %v: want conid %d, option, error", f, tc.id)
		}
		if f["option"] == "TCP_KEEPCNT" && (f["value"] != int64(200) || f["error"] != "invalid argument") {
			t.Errorf("TCP_KEEPCNT log: %v, want value 200 and EINVAL", f)
		}
	}
	if got := readSockopts(t, tc.tcp); got.idle != 20 || got.count != 9 {
		t.Errorf("socket after failed update: %+v, want idle 20 and count 9 untouched", got)
	}
	roundTrip(t, c, "after")
}

// TestBehindThrottleServedUntouched checks that a connection whose socket
// tcpops cannot reach (behind caddy-l4's throttle) is served, not tracked,
// and that the log says why.
func TestBehindThrottleServedUntouched(t *testing.T) {
	waitRegistryEmpty(t) // it counts the tracked connections
	up := startUpstream(t, nil)
	addr := freePort(t)
	logFile := t.TempDir() + "/caddy.log"
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},
"logging":{"logs":{"default":{"level":"DEBUG","writer":{"output":"file","filename":%q}}}},
"apps":{"layer4":{"servers":{"srv0":{"listen":[%q],"routes":[{"handle":[
 {"handler":"throttle","read_bytes_per_second":1000000},{"handler":"tcpops","lifetime":"50ms"},%s]}]}}}}}`,
		logFile, addr, proxyTo(up.addr())))
	for range 2 {
		c := dial(t, addr)
		roundTrip(t, c, "throttled")
		assertOpen(t, c, 150*time.Millisecond) // the 50ms lifetime does not apply
		if n := connections.len(); n != 0 {
			t.Fatalf("%d tracked; a connection behind throttle must be served untouched", n)
		}
	}
	var log []byte
	eventually(t, 5*time.Second, "the untracked warning in the log", func() bool {
		log, _ = os.ReadFile(logFile)
		return bytes.Contains(log, []byte("cannot reach the TCP socket under this connection's wrapper"))
	})
	if n := bytes.Count(log, []byte("under this connection's wrapper")); n != 1 {
		t.Errorf("%d warnings, want exactly one per configuration", n)
	}
	if !bytes.Contains(log, []byte("throttledConn")) {
		t.Errorf("the log does not name the wrapper:\n%s", log)
	}
}

func init() {
	caddy.RegisterModule(holdHandler{})
}

// holdHandler is a test-only caddy-l4 handler
// (layer4.handlers.tcpops_test_hold): placed first in a route, it keeps the
// connection from being closed by the server after the rest of the route is
// done, until the test releases it (see holdAfter). What a peer sees in the
// meantime is what the route's handlers did to the connection, not the
// server's Close.
type holdHandler struct {
	Name string `json:"name"`
}

// holds maps a hold's name in a test config to the channel that releases it.
var holds sync.Map // string -> chan struct{}

func (holdHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.tcpops_test_hold",
		New: func() caddy.Module { return new(holdHandler) },
	}
}

func (h *holdHandler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	err := next.Handle(cx)
	if v, ok := holds.Load(h.Name); ok {
		<-v.(chan struct{})
	}
	return err
}

// holdAfter makes the holds named name keep their connections until release
// is called, or the test ends.
func holdAfter(t testing.TB, name string) (release func()) {
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	holds.Store(name, ch)
	t.Cleanup(func() {
		release()
		holds.Delete(name)
	})
	return release
}

var _ layer4.NextHandler = (*holdHandler)(nil)
