package testutil

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Netns runs a test again, alone, in a private network namespace of its
// own (unshare -n, loopback up): fixed ports, iptables rules that vanish
// with it, no traffic of other tests.
type Netns struct {
	// Env is the environment variable that tells the re-run test binary
	// which test it runs inside the namespace.
	Env string
	// Tools are the commands the test needs besides unshare and ip.
	Tools []string
	// Timeout is the child's -test.timeout; the child is also stopped
	// 5s before the parent's own deadline, and killed if the parent dies,
	// so that a hung child reports instead of outliving the run.
	Timeout time.Duration
	// Line, if set, sees each line of the child's output, in the parent.
	Line func(string)
}

// Run returns true in the re-run child, where the test body runs, and false
// in the parent, which has nothing more to do: there it runs the child and
// makes its outcome the test's. A test that cannot run here (not root, a
// tool missing, no namespaces) skips and says why, as does one whose child
// skipped.
func (n Netns) Run(t *testing.T) bool {
	t.Helper()
	if os.Getenv(n.Env) == t.Name() {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			t.Fatalf("ip link set lo up in the namespace: %v: %s", err, out)
		}
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: a private network namespace (and iptables rules in it)")
	}
	for _, tool := range append([]string{"unshare", "ip"}, n.Tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (apt-get install -y iproute2 iptables sip-tester): %v", tool, err)
		}
	}
	ctx := t.Context()
	if dl, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-5*time.Second))
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, "unshare", "-n", "--", os.Args[0],
		"-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1", "-test.timeout="+n.Timeout.String())
	cmd.Env = append(os.Environ(), n.Env+"="+t.Name())
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if n.Line != nil {
		for _, line := range strings.Split(string(out), "\n") {
			n.Line(line)
		}
	}
	switch {
	case bytes.Contains(out, []byte("unshare failed")):
		t.Skipf("cannot create a network namespace here: %s", out)
	case err != nil:
		t.Fatalf("in a private network namespace: %v\n%s", err, out)
	case bytes.Contains(out, []byte("--- SKIP")):
		t.Skipf("skipped inside the namespace:\n%s", out)
	case !bytes.Contains(out, []byte("--- PASS: "+t.Name()+" ")):
		// A child that ran nothing (its -test.run matched no test, or
		// it exited before the test ended) exits 0 too.
		t.Fatalf("in a private network namespace: %s did not run and pass:\n%s", t.Name(), out)
	}
	t.Logf("in a private network namespace:\n%s", out)
	return false
}
