// Package testutil holds the test helpers that the root package's tests and
// test/e2e share: loopback connections, a round trip through an echo, a
// condition to await instead of a sleep, and the re-run of a test in a
// private network namespace. Only tests import it.
package testutil

import (
	"io"
	"net"
	"testing"
	"time"
)

// Dial connects to addr over TCP, failing the test on error; the connection
// is closed when the test ends.
func Dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c.(*net.TCPConn)
}

// RoundTrip writes msg on c and reads back exactly len(msg) bytes, which
// must be msg (an echo), within 5s.
func RoundTrip(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = c.SetDeadline(time.Time{}) }()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("echo: got %q, want %q", buf, msg)
	}
}

// Eventually polls cond every 5ms until it holds, and fails the test if it
// does not within the given time; what says what was awaited.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
