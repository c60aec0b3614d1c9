//go:build linux

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The registrar recipe as docs/registrar.md writes it (issue 28), run by a
// user other than root, as a new user would: example/registrar.Caddyfile
// unchanged, the doc's shell commands that issue the registrar's client
// certificate from Caddy's local CA and try the door, and the doc's
// kamailio.cfg with only its placeholders filled (the certificate files
// and the edge's name). As root, Caddy's door site also listened on :80
// for its redirects; as anyone else that was "bind: permission denied".

// recipeUser is the user the recipe runs as: nobody, nogroup on Debian.
var recipeUser = &syscall.Credential{Uid: 65534, Gid: 65534}

// recipeHome makes a home directory for recipeUser, outside the test's
// temporary directories (which only root may enter), with the repository's
// example/registrar.Caddyfile and CADDY_BIN (whose directory may be
// root's alone too) in it, all owned by that user; it is removed when the
// test ends.
func recipeHome(t *testing.T) (home, caddy string) {
	t.Helper()
	home, err := os.MkdirTemp("", "tcpops-recipe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(home) })
	example, err := os.ReadFile("../../example/registrar.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(caddyBin(t))
	if err != nil {
		t.Fatal(err)
	}
	caddy = filepath.Join(home, "caddy")
	for _, f := range []struct {
		path string
		body []byte
		mode os.FileMode
	}{
		{filepath.Join(home, "example", "registrar.Caddyfile"), example, 0o644},
		{caddy, bin, 0o755},
	} {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.path, f.body, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	err = filepath.Walk(home, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Chown(p, int(recipeUser.Uid), int(recipeUser.Gid))
	})
	if err != nil {
		t.Fatal(err)
	}
	return home, caddy
}

// docSnippet returns the body of the fenced block of docs/registrar.md
// that opens with fence (as "```sh") and contains has.
func docSnippet(t *testing.T, fence, has string) string {
	t.Helper()
	b, err := os.ReadFile("../../docs/registrar.md")
	if err != nil {
		t.Fatal(err)
	}
	var body *strings.Builder
	for line := range strings.Lines(string(b)) {
		line = strings.TrimRight(line, "\n")
		switch {
		case body == nil && strings.HasPrefix(line, "```"):
			if line == fence {
				body = new(strings.Builder)
			} else {
				body = &strings.Builder{} // another block: read, not kept
				body.WriteString("\x00")
			}
		case body != nil && line == "```":
			if s := body.String(); !strings.HasPrefix(s, "\x00") && strings.Contains(s, has) {
				return s
			}
			body = nil
		case body != nil:
			body.WriteString(line + "\n")
		}
	}
	t.Fatalf("docs/registrar.md has no %s block with %q", fence, has)
	return ""
}

// shellCommands splits a shell snippet into its commands: a line, with
// the lines a trailing backslash continues.
func shellCommands(snippet string) []string {
	var cmds []string
	cur := ""
	for line := range strings.Lines(snippet) {
		line = strings.TrimRight(line, "\n")
		if c, ok := strings.CutSuffix(line, "\\"); ok {
			cur += c + " "
			continue
		}
		if cur += line; strings.TrimSpace(cur) != "" {
			cmds = append(cmds, cur)
		}
		cur = ""
	}
	return cmds
}

// listeningSockets returns the local address of every listening socket in
// the namespace, TCP and UDP (HTTP/3), IPv4 and IPv6, as /proc/net/*
// write them (hex address and port): TCP in LISTEN, UDP unconnected
// (state 07, TCP_CLOSE).
func listeningSockets(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, f := range []struct{ path, state string }{
		{"/proc/net/tcp", "0A"}, {"/proc/net/tcp6", "0A"}, {"/proc/net/udp", "07"}, {"/proc/net/udp6", "07"},
	} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			if fl := strings.Fields(line); len(fl) > 3 && fl[3] == f.state {
				out = append(out, fl[1])
			}
		}
	}
	return out
}

// loopbackOnly reports whether a /proc/net/tcp{,6} local address is on a
// loopback address: 127.0.0.0/8 (little-endian hex, the low byte last) or
// ::1.
func loopbackOnly(hexAddr string) bool {
	ip, _, _ := strings.Cut(hexAddr, ":")
	switch len(ip) {
	case 8:
		return strings.HasSuffix(ip, "7F")
	case 32:
		return ip == "00000000000000000000000001000000"
	}
	return false
}

// TestRegistrarRecipeAsUser: docs/registrar.md's example and commands as
// written, run by nobody on loopback. Caddy starts with
// example/registrar.Caddyfile and listens on loopback only, on no port
// below 1024; the doc's openssl commands issue the registrar's certificate
// from Caddy's local CA, keeping the serial file out of Caddy's storage;
// the doc's curl with the certificate gets the door's list and the one
// without is refused at the handshake. Then the doc's kamailio.cfg, as
// the same user, raises a phone's lifetime through the door after its
// REGISTER, and logs its door: line at the doc's log level.
func TestRegistrarRecipeAsUser(t *testing.T) {
	if !inNetns(t, "kamailio", "curl", "openssl", "bash") {
		return
	}
	home, caddy := recipeHome(t)
	// As the doc runs it, `go run ./cmd/caddy` being the binary under test,
	// with the user's own environment: HOME, and no XDG_* that would move
	// Caddy's data directory from the doc's ~/.local/share/caddy.
	env := []string{"HOME=" + home, "PATH=" + os.Getenv("PATH")}
	cmd := exec.Command(caddy, "run", "--config", "example/registrar.Caddyfile")
	cmd.Dir, cmd.Env = home, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: recipeUser}
	c := runCaddy(t, t.TempDir(), cmd, "127.0.0.1:5060", "127.0.0.1:5061", "127.0.0.1:8443")

	// The setup is real: Caddy runs as nobody.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.pid()))
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)`).FindSubmatch(status); m == nil || string(m[1]) != strconv.Itoa(int(recipeUser.Uid)) {
		t.Fatalf("caddy runs as uid %s, want %d", m, recipeUser.Uid)
	}
	// Loopback only, nothing below 1024 (the door's redirects on :80).
	for _, a := range listeningSockets(t) {
		_, hexPort, _ := strings.Cut(a, ":")
		port, _ := strconv.ParseInt(hexPort, 16, 32)
		if !loopbackOnly(a) || port < 1024 {
			t.Errorf("something listens on %s (port %d): want loopback addresses and ports from 1024 only", a, port)
		}
	}
	c.logLine(t, `"certificate obtained successfully"`, `"identifier":"localhost"`)

	// The doc's commands, one at a time in one shell, each followed by its
	// exit status.
	var script strings.Builder
	cmds := shellCommands(docSnippet(t, "```sh", "openssl req"))
	for i, line := range cmds {
		fmt.Fprintf(&script, "%s\necho \"== %d $?\"\n", line, i)
	}
	sh := exec.Command("bash", "-c", script.String())
	sh.Dir, sh.Env = home, env
	sh.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: recipeUser}
	var stderr strings.Builder
	sh.Stderr = &stderr // openssl's notes, curl's progress and errors
	out, err := sh.Output()
	if err != nil {
		t.Fatalf("the doc's commands: %v\n%s\n%s", err, out, stderr.String())
	}
	outputs := map[int]string{}
	statuses := map[int]int{}
	var cur strings.Builder
	for _, line := range strings.SplitAfter(string(out), "\n") {
		var i, st int
		if n, _ := fmt.Sscanf(line, "== %d %d\n", &i, &st); n == 2 {
			outputs[i], statuses[i] = cur.String(), st
			cur.Reset()
			continue
		}
		cur.WriteString(line)
	}
	for i, line := range cmds {
		want0 := !strings.Contains(line, "# refused")
		if st, ok := statuses[i]; !ok || (st == 0) != want0 {
			t.Errorf("the doc's command %q: exit status %d (ran: %v), want success %v\n%s", line, st, ok, want0, outputs[i])
		}
		if strings.HasPrefix(line, "curl") && want0 {
			var list struct {
				Total       *int              `json:"total"`
				Connections []json.RawMessage `json:"connections"`
			}
			if err := json.Unmarshal([]byte(outputs[i]), &list); err != nil || list.Total == nil {
				t.Errorf("the doc's curl with the registrar's certificate: %q, want the door's list (%v)", outputs[i], err)
			}
		}
	}
	// The serial file is where the doc says, not in Caddy's storage.
	ca := filepath.Join(home, ".local/share/caddy/pki/authorities/local")
	if srl, _ := filepath.Glob(filepath.Join(ca, "*.srl")); len(srl) > 0 {
		t.Errorf("a serial file in Caddy's storage: %v", srl)
	}
	if _, err := os.Stat(filepath.Join(home, "registrar.srl")); err != nil {
		t.Errorf("the serial file beside the certificate: %v", err)
	}
	if t.Failed() {
		t.Fatalf("the doc's commands, as nobody:\n%s\nstderr:\n%s", out, stderr.String())
	}

	// The doc's kamailio.cfg, its placeholders filled: the files it names
	// under /etc/kamailio/door, and the edge's name.
	cfg := strings.NewReplacer(
		"/etc/kamailio/door/ca.pem", filepath.Join(ca, "root.crt"),
		"/etc/kamailio/door/registrar.crt", filepath.Join(home, "registrar.crt"),
		"/etc/kamailio/door/registrar.key", filepath.Join(home, "registrar.key"),
		"edge1.example.net", "localhost",
	).Replace(docSnippet(t, "```", "#!KAMAILIO"))
	if strings.Contains(cfg, "/etc/kamailio") || strings.Contains(cfg, "example.net") {
		t.Fatalf("a placeholder of the doc's kamailio.cfg is left:\n%s", cfg)
	}
	kamLog := startKamailio(t, home, cfg, recipeUser)

	alice := dialPhone(t)
	if st := alice.request("REGISTER", 600); st != "SIP/2.0 200 OK" {
		t.Fatalf("REGISTER: %q, want 200 OK", st)
	}
	registeredAt := time.Now()
	c.eventually(t, 10*time.Second, "the registered phone's lifetime raised to 1h through the door", func() bool {
		ci, ok := c.doorConns(t)[alice.addr()]
		return ok && time.Duration(ci.LifetimeMs)*time.Millisecond == time.Hour
	})
	raisedAfter := time.Since(registeredAt)
	doorLine := "door: " + alice.addr() + " registered: lifetime 1h: 200"
	eventually(t, 10*time.Second, "kamailio's log: "+doorLine, func() bool {
		b, _ := os.ReadFile(kamLog)
		return strings.Contains(string(b), doorLine)
	})
	// What the doc says of Kamailio's start: two harmless notes on tm,
	// and no error.
	b, _ := os.ReadFile(kamLog)
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	tm := 0
	for sc.Scan() {
		switch line := sc.Text(); {
		case strings.Contains(line, "load_tm_api(): Cannot import load_tm function from tm module"):
			tm++
		case strings.Contains(line, " ERROR: ") || strings.Contains(line, " CRITICAL: "):
			t.Errorf("kamailio logged an error the doc does not explain: %s", line)
		}
	}
	if tm != 2 {
		t.Errorf("kamailio logged the tm note %d times; docs/registrar.md says twice", tm)
	}
	figure(t, "registrar-recipe", "as uid %d on loopback only: the doc's commands issued the registrar's certificate and reached the door; the doc's kamailio.cfg raised the phone's lifetime to 1h %.0fms after its REGISTER and logged its door: line",
		recipeUser.Uid, raisedAfter.Seconds()*1000)
}
