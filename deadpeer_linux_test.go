//go:build linux

package tcpops

import (
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// These tests kill a peer for real: in a private network namespace the
// client's packets are dropped by iptables once the connection is up, so
// the client's kernel neither answers keepalive probes nor acknowledges
// data, and Caddy's kernel gives up with ETIMEDOUT, as with a phone that
// lost its network.

// deadPeerNetns runs each of these tests alone in a private network
// namespace of its own: the iptables rule and the lowered tcp_retries2 go
// with it.
var deadPeerNetns = testutil.Netns{
	Env:     "TCPOPS_NETNS_CHILD",
	Tools:   []string{"iptables"},
	Timeout: 2 * time.Minute,
}

// dropFrom makes the namespace drop every TCP packet sent from the local
// port of client c: its ACKs and probe answers never reach Caddy.
func dropFrom(t *testing.T, c net.Conn) {
	t.Helper()
	port := strconv.Itoa(c.LocalAddr().(*net.TCPAddr).Port)
	if out, err := exec.Command("iptables", "-I", "INPUT", "-p", "tcp", "--sport", port, "-j", "DROP").CombinedOutput(); err != nil {
		t.Skipf("iptables in the namespace: %v: %s", err, out)
	}
}

// floodAfter is an upstream that echoes the client's first 5 bytes, then,
// once send is closed, sends until the connection fails: with the client
// dead, Caddy's kernel retransmits that data until it gives up.
func floodAfter(send <-chan struct{}) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		_, _ = c.Write(buf)
		<-send
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}
}

func TestDeadPeerKeepaliveTimeout(t *testing.T) {
	if !deadPeerNetns.Run(t) {
		return
	}
	up := startUpstream(t, nil)
	et := startEventsTest(t, `{"handler":"tcpops","keepalive":{"idle":"1s","count":3,"interval":"1s"},"events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	dropFrom(t, c)
	start := time.Now()
	// idle 1s, then 3 probes 1s apart go unanswered: about 4s.
	et.checkEnd(t, c, tc, ReasonTimeout, CauseKeepalive, 15*time.Second)
	took := time.Since(start)
	t.Logf("keepalive gave up %v after the peer died", took)
	if took < 3*time.Second || took > 8*time.Second {
		t.Errorf("timeout/keepalive after %v, want about 4s (idle 1s + 3 probes 1s apart)", took)
	}
}

func TestDeadPeerUserTimeout(t *testing.T) {
	if !deadPeerNetns.Run(t) {
		return
	}
	send := make(chan struct{})
	up := startUpstream(t, floodAfter(send))
	// Keepalive stays at Go's 15s idle: only the user timeout can act.
	et := startEventsTest(t, `{"handler":"tcpops","user_timeout":"2s","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	dropFrom(t, c)
	start := time.Now()
	close(send)
	et.checkEnd(t, c, tc, ReasonTimeout, CauseUserTimeout, 15*time.Second)
	took := time.Since(start)
	t.Logf("TCP_USER_TIMEOUT gave up %v after data was sent to the dead peer", took)
	if took < 1500*time.Millisecond || took > 8*time.Second {
		t.Errorf("timeout/user_timeout after %v, want about the 2s user timeout", took)
	}
}

// Without a user timeout, unacknowledged data is bounded by the kernel's
// tcp_retries2 (about 15 minutes by default; per namespace, so lowered to 3
// here): the kernel's own timeout. With 3, the kernel gives up once
// (2^(3+1)-1) x 200ms = 3s of backoff have passed, which it checks when a
// retransmission timer fires: at 0.2, 0.6, 1.4, 3.0, 6.2 and then 12.6s
// after the first send with loopback's 200ms minimum RTO. So the end comes
// after 3s at the earliest, and before the timer at 12.6s.
func TestDeadPeerKernelTimeout(t *testing.T) {
	if !deadPeerNetns.Run(t) {
		return
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_retries2", []byte("3"), 0o644); err != nil {
		t.Skipf("lowering tcp_retries2 in the namespace: %v", err)
	}
	send := make(chan struct{})
	up := startUpstream(t, floodAfter(send))
	et := startEventsTest(t, `{"handler":"tcpops","events":true}`, up)

	c := dial(t, et.addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	dropFrom(t, c)
	start := time.Now()
	close(send)
	et.checkEnd(t, c, tc, ReasonTimeout, CauseKernel, 15*time.Second)
	took := time.Since(start)
	t.Logf("the kernel gave up %v after data was sent to the dead peer", took)
	if took < 3*time.Second || took > 10*time.Second {
		t.Errorf("timeout/kernel after %v, want between the 3s of backoff tcp_retries2 3 allows and 10s", took)
	}
}
