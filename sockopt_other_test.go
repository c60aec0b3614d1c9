//go:build !linux

package tcpops

import (
	"net"
	"testing"
	"time"
)

// The tests that read socket options back (or set them behind tcpops'
// back) name Linux's options: TCP_KEEPIDLE, TCP_KEEPCNT, TCP_KEEPINTVL and
// TCP_USER_TIMEOUT, which keepalive_linux.go sets. Elsewhere they compile
// and skip at the first read, saying why.

func readSockopts(t testing.TB, c *net.TCPConn) sockopts {
	t.Helper()
	t.Skip("reads TCP_KEEPIDLE, TCP_KEEPCNT, TCP_KEEPINTVL and TCP_USER_TIMEOUT back: Linux only (sockopt_linux_test.go)")
	return sockopts{}
}

func setKeepalive(t *testing.T, c *net.TCPConn, idle, count, interval int) {
	t.Helper()
	t.Skip("sets TCP_KEEPIDLE, TCP_KEEPCNT and TCP_KEEPINTVL: Linux only (sockopt_linux_test.go)")
}

// recvQueue cannot read the receive queue here.
func recvQueue(*net.TCPConn) (int, bool) { return 0, false }

// dialSmallWindow dials addr with a small receive buffer, set after the
// connect here (the Linux version sets SO_RCVBUF before it, so that the
// window it advertises stays small): the tests that use it run on Linux,
// and only type-check elsewhere.
func dialSmallWindow(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	tc := c.(*net.TCPConn)
	_ = tc.SetReadBuffer(4096)
	return tc
}
