package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func findings(t *testing.T, script string) []Finding {
	t.Helper()
	fs, err := Check(strings.NewReader(script))
	if err != nil {
		t.Fatal(err)
	}
	return fs
}

// TestCheck: each line's expected verdict. The first two are the lines of
// .ci/run and test/e2e/run.sh that failed CI with exit 141 (issue 30).
func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		script string
		want   int // findings
	}{
		{`"$work/caddy" list-modules | grep -qx 'layer4.handlers.tcpops'`, 1},
		{"\t\"$CADDY_BIN\" list-modules | grep -qx 'layer4.handlers.tcpops' ||\n\t\t{ echo \"no\" >&2; exit 1; }", 1},
		{`modules=$("$work/caddy" list-modules)`, 0},
		{`grep -qx 'layer4.handlers.tcpops' <<<"$modules"`, 0},
		{`caddy list-modules | grep -E 'tcpops'`, 0},
		{`x | grep --quiet y`, 1},
		{`x | grep --silent y`, 1},
		{`x | grep -Eq y`, 1},
		{`x | grep -m1 y`, 1},
		{`x | grep -m 1 y`, 1},
		{`x | grep --max-count=1 y`, 1},
		{`x | grep -l y`, 1},
		{`x | /usr/bin/grep -q y`, 1},
		{`x | egrep -q y`, 1},
		{`x | head -1`, 1},
		{`x | head -n 5 | sort`, 1},
		{`v=$(x | head -c 10)`, 1},
		{`if x | grep -q y; then :; fi`, 1},
		{`x |& grep -q y`, 1},
		{`x | LC_ALL=C grep -q y`, 1},
		{`x | command grep -q y`, 1},
		{`x | nice -n 19 head`, 1},
		{`x | sed -n '1p;q'`, 1},
		{`x | sed 3q`, 1},
		{`x | sed 's/q/x/'`, 0},
		{`x | awk '{ print; exit }'`, 1},
		{`x | awk '{ print $1 }'`, 0},
		{"x |\n\thead -1", 1},
		{"x \\\n  | grep -q y", 1},
		// Not pipes, or a reader that reads everything.
		{`a || grep -q y file`, 0},
		{`grep -q y file | wc -l`, 0},
		{`grep -m1 'model name' /proc/cpuinfo | cut -d: -f2`, 0},
		{`x | grep -e -q y`, 0},
		{`x | grep -A 2 -q y`, 1},
		{`x | grep -c y`, 0},
		{`echo 'a | grep -q b'`, 0},
		{`echo "a | head"`, 0},
		{`echo a >| f`, 0},
		{`x # | grep -q y`, 0},
		{`echo ${#a} | cat`, 0},
		{`x | grep -q y  # pipelint: ok (the writer is printf, whose output fits the pipe)`, 0},
		{"cat <<EOF\nx | grep -q y\nEOF\necho done", 0},
		{"cat <<-'EOF'\n\tx | head\n\tEOF\nx | head", 1},
		{`grep -qx a <<<"$(x | tr a b)"`, 0},
		{"a=\"$(x\n| head -1)\"", 1},
	} {
		got := findings(t, tc.script)
		if len(got) != tc.want {
			t.Errorf("%q: %d findings %v, want %d", tc.script, len(got), got, tc.want)
		}
	}
}

// TestCheckLine: a finding names the line where its command starts and
// the reader as written.
func TestCheckLine(t *testing.T) {
	got := findings(t, "set -euo pipefail\n# a | head\necho ok\nfoo \\\n  --bar | grep -qx 'a b'\n")
	if len(got) != 1 || got[0].Line != 4 || got[0].Reader != "grep -qx a b" {
		t.Fatalf("got %+v, want one finding at line 4 with reader `grep -qx a b`", got)
	}
	if s := got[0].String(); !strings.Contains(s, "141") || !strings.Contains(s, "line 4") {
		t.Errorf("message %q names neither the status nor the line", s)
	}
}

// TestRepoScripts is the lint of CI and the test scripts (.ci/run runs the
// command too, before the long steps): none of them may hold such a
// pipeline. It first proves that it reads the scripts it names.
func TestRepoScripts(t *testing.T) {
	root := filepath.Join("..", "..")
	var files []string
	for _, dir := range []string{".ci", "test", "bench"} {
		fs, err := scripts(filepath.Join(root, dir))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, fs...)
	}
	for _, must := range []string{".ci/run", "test/e2e/run.sh", "test/mutants.sh", "bench/run.sh"} {
		found := false
		for _, f := range files {
			found = found || filepath.ToSlash(f) == filepath.ToSlash(filepath.Join(root, must))
		}
		if !found {
			t.Errorf("%s is not among the scripts checked: %v", must, files)
		}
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range findings(t, string(b)) {
			t.Errorf("%s:%s", name, strings.TrimPrefix(f.String(), "line "))
		}
	}
}

// TestCommand runs the command as .ci/run does: exit 1 and the file:line
// on a finding, 0 on a clean script.
func TestCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad")
	good := filepath.Join(dir, "good.sh")
	os.WriteFile(bad, []byte("#!/usr/bin/env bash\nset -o pipefail\ncaddy list-modules | grep -qx x\n"), 0o644)
	os.WriteFile(good, []byte("m=$(caddy list-modules)\ngrep -qx x <<<\"$m\"\n"), 0o644)
	out, err := exec.Command("go", "run", ".", dir).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("go run . %s: %v, want exit status 1\n%s", dir, err, out)
	}
	if !strings.Contains(string(out), bad+":3:") || strings.Contains(string(out), good) {
		t.Errorf("output names the wrong files or lines:\n%s", out)
	}
	if out, err := exec.Command("go", "run", ".", good).CombinedOutput(); err != nil {
		t.Errorf("go run . %s: %v\n%s", good, err, out)
	}
}

// FuzzCheck: any text is checked without a panic, and a finding's line is
// one of the text's lines.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{"x | grep -q y", "a=\"$(x\n| head", "cat <<EOF\n", "'", "x |", "grep -e", "\\"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		fs, err := Check(strings.NewReader(s))
		if err != nil {
			return
		}
		lines := strings.Count(s, "\n") + 1
		for _, fd := range fs {
			if fd.Line < 1 || fd.Line > lines {
				t.Fatalf("finding at line %d of %d", fd.Line, lines)
			}
		}
	})
}
