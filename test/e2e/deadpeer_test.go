//go:build linux

package e2e

import (
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// A dead peer, for real: once a client's connection through Caddy is up,
// iptables drops every packet the client sends, so its kernel neither
// answers keepalive probes nor acknowledges data, as when a phone loses its
// network. Two Caddy servers side by side, one with tcpops and one without
// (or with less), get the same treatment at the same moment.

const (
	withAddr  = "127.0.0.1:9001"
	otherAddr = "127.0.0.1:9002"
	upAddr    = "127.0.0.1:9100"
)

// dropFrom makes the namespace drop every TCP packet sent from the local
// port of client c.
func dropFrom(t *testing.T, c net.Conn) {
	t.Helper()
	p := strconv.Itoa(port(c.LocalAddr()))
	if out, err := exec.Command("iptables", "-I", "INPUT", "-p", "tcp", "--sport", p, "-j", "DROP").CombinedOutput(); err != nil {
		t.Fatalf("iptables in the namespace: %v: %s", err, out)
	}
}

var ssTimer = regexp.MustCompile(`timer:\([^)]*\)`)

// caddyTimer returns the timer ss shows on Caddy's socket from listenPort
// to client c, e.g. "timer:(keepalive,1.2sec,0)".
func caddyTimer(t *testing.T, listenPort int, c net.Conn) string {
	t.Helper()
	out := ss(t, fmt.Sprintf("( sport = :%d and dport = :%d )", listenPort, port(c.LocalAddr())))
	if m := ssTimer.FindString(out); m != "" {
		return m
	}
	return "no timer"
}

// onlyUpstream returns the port Caddy dialed the upstream from, when the
// upstream has exactly one open connection.
func onlyUpstream(t *testing.T, u *echoServer) int {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.conns) != 1 {
		t.Fatalf("upstream has %d connections, want 1", len(u.conns))
	}
	for p := range u.conns {
		return p
	}
	return 0
}

// upstreamPairs dials a client to each of the two Caddy servers in turn,
// exchanges a message, and returns the clients, the ports Caddy dialed the
// upstream from for them, and when the first client's exchange ended.
func upstreamPairs(t *testing.T, u *echoServer) (with, other *net.TCPConn, withUp, otherUp int, withLast time.Time) {
	t.Helper()
	with = dial(t, withAddr)
	roundTrip(t, with, "hello")
	withLast = time.Now()
	withUp = onlyUpstream(t, u)
	other = dial(t, otherAddr)
	roundTrip(t, other, "hello")
	u.mu.Lock()
	for p := range u.conns {
		if p != withUp {
			otherUp = p
		}
	}
	u.mu.Unlock()
	if otherUp == 0 {
		t.Fatal("no upstream connection for the second client")
	}
	return with, other, withUp, otherUp, withLast
}

// awaitClose polls until Caddy's socket to client c has left ESTABLISHED and
// the upstream connection upPort has been closed by Caddy, or until bound
// after start has passed; it returns how long after start each happened (0:
// not within the bound).
func awaitClose(t *testing.T, u *echoServer, listenPort int, c net.Conn, upPort int, start time.Time, bound time.Duration) (sock, up time.Duration) {
	t.Helper()
	cport := port(c.LocalAddr())
	for time.Since(start) <= bound && (sock == 0 || up == 0) {
		if sock == 0 && socketState(t, listenPort, cport) != tcpEstablished {
			sock = time.Since(start)
		}
		u.mu.Lock()
		at, ok := u.eofAt[upPort]
		u.mu.Unlock()
		if up == 0 && ok {
			up = at.Sub(start)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return sock, up
}

// TestDeadPeerIdle: keepalive idle 2s, 2 probes 1s apart. Caddy's kernel
// gives up on the silent client after about 4s; tcpops sees the read fail
// with ETIMEDOUT, and caddy-l4's proxy closes the upstream. The same client
// behind a server without tcpops keeps Go's keepalive (15s idle, 9 probes
// 15s apart: 150s) and is still open at the bound.
func TestDeadPeerIdle(t *testing.T) {
	if !inNetns(t, "iptables") {
		return
	}
	const idle, count, interval = 2, 2, 1
	bound := time.Duration(idle+count*interval)*time.Second + 1500*time.Millisecond
	u := startUpstream(t, upAddr, nil)
	c := startCaddy(t, config(
		l4server{"tcpops", withAddr, []string{
			fmt.Sprintf(`{"handler":"tcpops","keepalive":{"idle":"%ds","count":%d,"interval":"%ds"}}`, idle, count, interval),
			proxyTo(upAddr)}},
		l4server{"plain", otherAddr, []string{proxyTo(upAddr)}},
	), withAddr, otherAddr)

	with, plain, withUp, plainUp, withLast := upstreamPairs(t, u)
	withTimer, plainTimer := caddyTimer(t, 9001, with), caddyTimer(t, 9002, plain)
	t.Logf("before the drop:\n%s", ss(t, "( sport = :9001 or sport = :9002 )"))

	dropFrom(t, with)
	dropFrom(t, plain)
	start := time.Now()
	sock, up := awaitClose(t, u, 9001, with, withUp, start, bound)
	if sock == 0 || up == 0 {
		t.Fatalf("with tcpops (keepalive %d/%d/%d): not closed within %v (client socket after %v, upstream after %v)\n%s",
			idle, count, interval, bound, sock, up, ss(t, "( sport = :9001 )"))
	}
	// Not before the probes can have run out, counted from the last byte
	// (the kernel counts idle from there; the drop comes a little later).
	if sinceLast, early := start.Add(sock).Sub(withLast), time.Duration(idle+count*interval)*time.Second-500*time.Millisecond; sinceLast < early {
		t.Errorf("closed %v after the last byte, before keepalive could have given up (%v)", sinceLast, early)
	}
	end := c.endOf(t, with.LocalAddr().String(), 5*time.Second)
	if end.Reason != "timeout" || end.Cause != "keepalive" {
		t.Errorf("tcpops logged %s/%s, want timeout/keepalive", end.Reason, end.Cause)
	}
	figure(t, "deadpeer-idle", "closed after %.2fs (bound %.2fs; keepalive idle %ds count %d interval %ds; client socket timed out at %.2fs, upstream closed at %.2fs; tcpops logged %s/%s; before the drop ss showed %s)",
		max(sock, up).Seconds(), bound.Seconds(), idle, count, interval, sock.Seconds(), up.Seconds(), end.Reason, end.Cause, withTimer)

	// The same dead client without tcpops: still there at the bound.
	if d := bound - time.Since(start); d > 0 {
		time.Sleep(d) // the figure is "still open at the bound": nothing to await
	}
	if st := socketState(t, 9002, port(plain.LocalAddr())); st != tcpEstablished {
		t.Fatalf("without tcpops: Caddy's socket to the dead client left ESTABLISHED (state %#x) within %v", st, bound)
	}
	u.mu.Lock()
	_, plainUpClosed := u.eofAt[plainUp]
	u.mu.Unlock()
	if plainUpClosed {
		t.Fatalf("without tcpops: the upstream was closed within %v", bound)
	}
	figure(t, "deadpeer-idle-default", "still open after %.2fs without tcpops (Go's keepalive: idle 15s, 9 probes 15s apart, gives up after about 150s; before the drop ss showed %s, now %s)",
		time.Since(start).Seconds(), plainTimer, caddyTimer(t, 9002, plain))
}

// sendAfter is an upstream that echoes the client's first 5 bytes and, once
// send is closed, sends without pause (for at most 30s) while it reads until
// Caddy closes its side.
func sendAfter(send <-chan struct{}) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
		<-send
		go func() {
			_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			chunk := make([]byte, 16<<10)
			for {
				if _, err := c.Write(chunk); err != nil {
					return // closed by Caddy, or by the handler's return
				}
			}
		}()
		_, _ = io.Copy(io.Discard, c)
	}
}

// TestDeadPeerDataInFlight: the client dies while the upstream is sending
// to it, so Caddy's send queue to the client is never empty and keepalive
// probes never start. With user_timeout 3s the kernel gives up 3s after the
// first unacknowledged data; with the same keepalive but no user_timeout,
// the connection is still there at the bound (the kernel's retransmissions
// would go on for about 15 minutes, tcp_retries2).
func TestDeadPeerDataInFlight(t *testing.T) {
	if !inNetns(t, "iptables") {
		return
	}
	const userTimeout = 3 * time.Second
	bound := userTimeout + 1500*time.Millisecond
	send := make(chan struct{})
	u := startUpstream(t, upAddr, sendAfter(send))
	keepalive := `"keepalive":{"idle":"1s","count":2,"interval":"1s"}`
	c := startCaddy(t, config(
		l4server{"user_timeout", withAddr, []string{
			fmt.Sprintf(`{"handler":"tcpops",%s,"user_timeout":"%dms"}`, keepalive, userTimeout.Milliseconds()),
			proxyTo(upAddr)}},
		l4server{"keepalive_only", otherAddr, []string{
			fmt.Sprintf(`{"handler":"tcpops",%s}`, keepalive),
			proxyTo(upAddr)}},
	), withAddr, otherAddr)

	with, kaOnly, withUp, kaUp, _ := upstreamPairs(t, u)
	dropFrom(t, with)
	dropFrom(t, kaOnly)
	start := time.Now()
	close(send)

	sock, up := awaitClose(t, u, 9001, with, withUp, start, bound)
	if sock == 0 || up == 0 {
		t.Fatalf("with user_timeout %v: not closed within %v (client socket after %v, upstream after %v)\n%s",
			userTimeout, bound, sock, up, ss(t, "( sport = :9001 )"))
	}
	if sock < userTimeout-500*time.Millisecond {
		t.Errorf("closed after %v, before the user timeout %v", sock, userTimeout)
	}
	end := c.endOf(t, with.LocalAddr().String(), 5*time.Second)
	if end.Reason != "timeout" || end.Cause != "user_timeout" {
		t.Errorf("tcpops logged %s/%s, want timeout/user_timeout", end.Reason, end.Cause)
	}
	figure(t, "deadpeer-inflight", "closed after %.2fs (bound %.2fs; user_timeout %v with keepalive 1/2/1; client socket timed out at %.2fs, upstream closed at %.2fs; tcpops logged %s/%s)",
		max(sock, up).Seconds(), bound.Seconds(), userTimeout, sock.Seconds(), up.Seconds(), end.Reason, end.Cause)

	if d := bound - time.Since(start); d > 0 {
		time.Sleep(d) // the figure is "still open at the bound": nothing to await
	}
	timer := caddyTimer(t, 9002, kaOnly)
	if st := socketState(t, 9002, port(kaOnly.LocalAddr())); st != tcpEstablished {
		t.Fatalf("keepalive only: Caddy's socket to the dead client left ESTABLISHED (state %#x) within %v", st, bound)
	}
	u.mu.Lock()
	_, kaUpClosed := u.eofAt[kaUp]
	u.mu.Unlock()
	if kaUpClosed {
		t.Fatalf("keepalive only: the upstream was closed within %v", bound)
	}
	figure(t, "deadpeer-inflight-keepalive-only", "still open after %.2fs with keepalive 1/2/1 and no user_timeout (it would have fired after 3s on an idle connection; ss shows %s: retransmitting, not probing)",
		time.Since(start).Seconds(), timer)
}
