package tcpops

import (
	"os/exec"
	"strings"
	"testing"
)

// The Prometheus rules of example/prometheus check, and pass their unit
// tests (rules_test.yml: input series and the values and alerts each rule
// must give). promtool is Debian's prometheus package, which CI installs;
// this test is what test/mutants.txt's rule mutations run.
func TestPrometheusRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skipf("needs promtool (apt-get install -y prometheus): %v", err)
	}
	for _, args := range [][]string{
		{"check", "rules", "example/prometheus/rules.yml"},
		{"test", "rules", "example/prometheus/rules_test.yml"},
	} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
