//go:build linux

package tcpops

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// readSockopts reads the options back with getsockopt.
func readSockopts(t testing.TB, c *net.TCPConn) sockopts {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var s sockopts
	var gerr error
	get := func(fd, level, opt int) int {
		v, err := unix.GetsockoptInt(fd, level, opt)
		if err != nil && gerr == nil {
			gerr = err
		}
		return v
	}
	if err := rc.Control(func(fd uintptr) {
		f := int(fd)
		s.keepalive = get(f, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		s.idle = get(f, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		s.count = get(f, unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
		s.interval = get(f, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		s.userTimeout = get(f, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return s
}

// setKeepalive sets keepalive options on a socket behind tcpops' back.
func setKeepalive(t *testing.T, c *net.TCPConn, idle, count, interval int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.TCP_KEEPIDLE, idle}, {unix.TCP_KEEPCNT, count}, {unix.TCP_KEEPINTVL, interval}} {
			if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, o[0], o[1]); err != nil && serr == nil {
				serr = err
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
}

// recvQueue returns how many bytes tc's receive queue holds unread
// (SIOCINQ); ok is false when it cannot be read.
func recvQueue(tc *net.TCPConn) (n int, ok bool) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, false
	}
	cerr := rc.Control(func(fd uintptr) {
		n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return n, cerr == nil && err == nil
}

// dialSmallWindow dials addr with a 4 KiB receive buffer, set before the
// handshake so that the window the client advertises stays small.
func dialSmallWindow(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); err != nil {
			return err
		}
		return serr
	}}
	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c.(*net.TCPConn)
}
