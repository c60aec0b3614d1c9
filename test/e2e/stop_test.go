//go:build linux

// Linux only, as the rest of test/e2e: the harness runs tests in private
// network namespaces.

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// slowConfig is a config with one layer4 server, tcpops with events on in
// front of a proxy to upAddr, and every tcp_closed event handed to the slow
// subscriber of slowsub, which takes sleep per event and writes a line to
// file.
func slowConfig(file string, sleep time.Duration) string {
	cfg := config(l4server{"srv0", withAddr, []string{`{"handler":"tcpops","events":true}`, proxyTo(upAddr)}})
	return strings.Replace(cfg, `"apps":{`, fmt.Sprintf(`"apps":{"events":{"subscriptions":[{"events":["tcp_closed"],
	"handlers":[{"handler":"e2e_slow","file":%q,"sleep":%q}]}]},`, file, sleep.String()), 1)
}

// Issues 17 and 21: connections that outlived a reload are closed by
// `caddy stop`, and their end events, queued by the retired configuration,
// reach the stopping configuration's slow subscriber within Stop's 5s wait
// or are dropped and counted; the process then exits, so an event neither
// delivered nor counted by then is lost for good.
func TestReloadThenStopSlowSubscriber(t *testing.T) {
	if !inNetns(t) {
		return
	}
	// Standard Caddy has no events handler: slowsub is Caddy with one.
	bin := filepath.Join(t.TempDir(), "caddy")
	build := exec.Command("go", "build", "-o", bin, "github.com/tcpops/caddy-tcpops/test/e2e/slowsub")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building slowsub: %v\n%s", err, out)
	}
	t.Setenv("CADDY_BIN", bin)

	const n, sleep = 40, 250 * time.Millisecond // 10s of events, twice Stop's wait
	startUpstream(t, upAddr, nil)
	dir := t.TempDir()
	fileA, fileB := filepath.Join(dir, "a.events"), filepath.Join(dir, "b.events")
	c := startCaddy(t, slowConfig(fileA, sleep), withAddr)
	d := &net.Dialer{Timeout: 5 * time.Second}
	for range n {
		cl, err := dialPing(d, withAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cl.Close() })
	}
	if got := c.tracked(t); got != n {
		t.Fatalf("tcpops tracks %d connections, want %d", got, n)
	}
	c.reload(t, slowConfig(fileB, sleep))

	start := time.Now()
	c.stopped = true
	stop := exec.Command(bin, "stop", "--address", adminAddr)
	stop.Env = c.cmd.Env
	if out, err := stop.CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	select {
	case <-c.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("caddy still running 20s after caddy stop")
	}
	took := time.Since(start)

	lines := func(file string) int {
		b, _ := os.ReadFile(file)
		return bytes.Count(b, []byte("\n"))
	}
	delivered := lines(fileB)
	dropped := 0
	log, _ := os.ReadFile(c.logPath)
	for _, line := range bytes.Split(log, []byte("\n")) {
		if !bytes.Contains(line, []byte("the rest were dropped")) {
			continue
		}
		var m struct{ Dropped int }
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		dropped += m.Dropped
	}
	t.Logf("caddy exited %v after caddy stop: %d events delivered, %d dropped and counted", took, delivered, dropped)
	figure(t, "stop_slow_subscriber", "exit %.1fs after caddy stop, %d of %d end events delivered, %d dropped and counted",
		took.Seconds(), delivered, n, dropped)
	if a := lines(fileA); a != 0 {
		t.Errorf("the retired configuration's subscriber got %d events", a)
	}
	// One event may have been in the subscriber's hands when the process
	// exited: handed over, but neither written nor counted.
	if delivered+dropped < n-1 || delivered+dropped > n {
		t.Errorf("%d delivered + %d dropped, want %d (or one less)", delivered, dropped, n)
	}
	if took > 10*time.Second {
		t.Errorf("caddy exited %v after caddy stop, want about Stop's 5s wait", took)
	}
}
