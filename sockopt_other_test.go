//go:build !linux

package tcpops

import (
	"net"
	"testing"
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
