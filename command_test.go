package tcpops

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/goleak"
)

// This file tests `caddy tcpops` (command.go): its formatting as pure
// functions, and the command itself against a real in-process Caddy with its
// admin endpoint on a loopback port and on a unix socket.

func TestCommandHumanDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{1, "1ns"},
		{999, "999ns"},
		{time.Microsecond, "1µs"},
		{4200 * time.Nanosecond, "4.2µs"},
		{25 * time.Microsecond, "25µs"},
		{999_600 * time.Nanosecond, "1ms"}, // rounds up into the next unit
		{time.Millisecond, "1ms"},
		{1500 * time.Microsecond, "1.5ms"},
		{350 * time.Millisecond, "350ms"},
		{999 * time.Millisecond, "999ms"},
		{999_600 * time.Microsecond, "1s"},
		{time.Second, "1s"},
		{4200 * time.Millisecond, "4.2s"},
		{4249 * time.Millisecond, "4.2s"},
		{9960 * time.Millisecond, "10s"},
		{42 * time.Second, "42s"},
		{59600 * time.Millisecond, "1m"},
		{time.Minute, "1m"},
		{62 * time.Second, "1m2s"},
		{62*time.Second + 400*time.Millisecond, "1m2s"},
		{59*time.Minute + 59*time.Second + 600*time.Millisecond, "1h"},
		{time.Hour + 2*time.Minute, "1h2m"},
		{time.Hour + 2*time.Minute + 29*time.Second, "1h2m"},
		{23*time.Hour + 59*time.Minute + 31*time.Second, "24h"},
		{24 * time.Hour, "24h"},
		{27 * time.Hour, "27h"},
		{400 * 24 * time.Hour, "9600h"},
		{-350 * time.Millisecond, "-350ms"},
		{math.MaxInt64, "2562047h47m"},
		{math.MinInt64, "-2562047h47m"},
	} {
		if got := humanDuration(tc.d); got != tc.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

// A time left is cut down, never rounded up (issue 22: 23h59m45s left
// showed as "1d").
func TestCommandLeftDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{999_600 * time.Nanosecond, "999µs"},
		{999 * time.Millisecond, "999ms"},
		{999_999 * time.Microsecond, "999ms"},
		{4299 * time.Millisecond, "4.2s"},
		{59_999 * time.Millisecond, "59s"},
		{time.Hour - time.Millisecond, "59m59s"},
		{23*time.Hour + 59*time.Minute + 45*time.Second, "23h59m"},
		{24 * time.Hour, "24h"},
		{-1500 * time.Millisecond, "-1.5s"},
		{math.MaxInt64, "2562047h47m"},
	} {
		if got := leftDuration(tc.d); got != tc.want {
			t.Errorf("leftDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestCommandHumanBytes(t *testing.T) {
	for _, tc := range []struct {
		n    uint64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{1536, "1.5 KiB"},
		{10188, "9.9 KiB"},
		{10189, "10 KiB"}, // 9.95 KiB rounds to 10
		{512 * 1024, "512 KiB"},
		{1024*1024 - 1, "1 MiB"},
		{3355443, "3.2 MiB"},
		{120 << 30, "120 GiB"},
		{math.MaxUint64, "16 EiB"},
	} {
		if got := humanBytes(tc.n); got != tc.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

// runCLI runs `caddy tcpops args...` with the command Caddy registered,
// built into a root command as Caddy builds its own (caddycmd's root is
// SilenceUsage too), and returns what it printed and the error that makes
// `caddy` exit 1.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	reg, ok := caddycmd.Commands()["tcpops"]
	if !ok {
		t.Fatal("no tcpops command registered with caddycmd")
	}
	sub := &cobra.Command{Use: reg.Name + " " + reg.Usage, Short: reg.Short, Long: reg.Long}
	reg.CobraFunc(sub)
	root := &cobra.Command{Use: "caddy", SilenceUsage: true}
	root.AddCommand(sub)
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(append([]string{"tcpops"}, args...))
	err = root.Execute()
	return out.String(), errOut.String(), err
}

// mustRunCLI runs the command and fails the test unless it succeeds with
// nothing on stderr.
func mustRunCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, err := runCLI(t, args...)
	if err != nil || errOut != "" {
		t.Fatalf("caddy tcpops %s: %v\nstderr: %s\nstdout: %s", strings.Join(args, " "), err, errOut, out)
	}
	return out
}

// cliStatus is the exit status Caddy's main ends with for err, the error
// of the command: the ExitCode of caddycmd's exit error, which only
// caddycmd.WrapCommandFuncForCobra makes (its type is unexported), else 1
// for an error and 0 for none.
func cliStatus(err error) int {
	if err == nil {
		return 0
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		v := reflect.ValueOf(e)
		if v.Kind() == reflect.Pointer && v.Elem().Kind() == reflect.Struct {
			if f := v.Elem().FieldByName("ExitCode"); f.IsValid() && f.Kind() == reflect.Int {
				return int(f.Int())
			}
		}
	}
	return 1
}

// failCLI runs the command, requires it to fail with exit status 1 (a bad
// flag, argument or value) and one line on stderr that contains want and
// nothing on stdout, and returns that line.
func failCLI(t *testing.T, want string, args ...string) string {
	t.Helper()
	return failCLIStatus(t, exitUsage, want, args...)
}

// failCLIStatus is failCLI for a failure with the exit status status.
func failCLIStatus(t *testing.T, status int, want string, args ...string) string {
	t.Helper()
	out, errOut, err := runCLI(t, args...)
	if got := cliStatus(err); got != status {
		t.Fatalf("caddy tcpops %s: exit status %d, want %d\nstderr %q", strings.Join(args, " "), got, status, errOut)
	}
	line, _ := strings.CutPrefix(errOut, "Error: ")
	if err == nil || out != "" || strings.Count(errOut, "\n") != 1 || !strings.HasSuffix(errOut, "\n") ||
		!strings.Contains(line, want) {
		t.Fatalf("caddy tcpops %s: err %v\nstdout %q\nstderr %q\nwant a failure, no stdout and one line on stderr containing %q",
			strings.Join(args, " "), err, out, errOut, want)
	}
	return strings.TrimSuffix(line, "\n")
}

// cliPeer is a client of the test server and the connection Caddy tracks
// for it.
type cliPeer struct {
	c  *net.TCPConn
	tc *Conn
}

func (p cliPeer) id() string { return fmt.Sprint(p.tc.ID()) }

// startCLIServer loads Caddy with its admin endpoint on adminAddr (host:port
// or unix//path), which the command then talks to, and a layer4 server
// whose route runs the tcpops handler (JSON) and proxies to an echo
// upstream. It connects n clients, one round trip each, and returns the
// server's address and the clients, in the order of their ids.
func startCLIServer(t *testing.T, adminAddr, tcpops string, n int) (listen string, peers []cliPeer) {
	t.Helper()
	up := startUpstream(t, nil)
	listen = freePort(t)
	loadCaddy(t, adminL4Config(adminAddr, listen, tcpops+","+proxyTo(up.addr())))
	// Caddy's Stop leaves the admin endpoint running.
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	for range n {
		c := dial(t, listen)
		roundTrip(t, c, "hello")
		peers = append(peers, cliPeer{c: c, tc: waitTracked(t, c)})
	}
	// Caddy may take up a later connection first.
	slices.SortFunc(peers, func(a, b cliPeer) int { return cmp.Compare(a.tc.ID(), b.tc.ID()) })
	return listen, peers
}

// tableRow returns the fields of the row of connection id in a table, and
// fails the test when there is none.
func tableRow(t *testing.T, table string, id uint64) []string {
	t.Helper()
	for line := range strings.Lines(table) {
		if f := strings.Fields(line); len(f) > 0 && f[0] == fmt.Sprint(id) {
			return f
		}
	}
	t.Fatalf("no row for connection %d in\n%s", id, table)
	return nil
}

// tableColumns are the columns of the table `list`, `set` print.
var tableColumns = strings.Fields("ID REMOTE LOCAL AGE IDLE LIFE_LEFT MAX_LEFT KEEPALIVE USER_TIMEOUT IN OUT STATE")

// checkTable checks that table is the header, rows rows and a last line,
// and that the rows are aligned: a value of each column checked starts
// where the column's heading does.
func checkTable(t *testing.T, table string, rows int) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(table, "\n"), "\n")
	if len(lines) != rows+2 || strings.Join(strings.Fields(lines[0]), " ") != strings.Join(tableColumns, " ") {
		t.Fatalf("want a header, %d rows and a last line:\n%s", rows, table)
	}
	for _, col := range []string{"REMOTE", "LOCAL", "KEEPALIVE", "IN", "STATE"} {
		at := strings.Index(lines[0], " "+col+" ") + 1
		if col == "STATE" {
			at = strings.LastIndex(lines[0], col)
		}
		for _, row := range lines[1 : rows+1] {
			if row[at-1] != ' ' || row[at] == ' ' {
				t.Fatalf("column %s not aligned at %d in row %q of\n%s", col, at, row, table)
			}
		}
	}
}

func TestCommandList(t *testing.T) {
	adminAddr := freePort(t)
	listen, peers := startCLIServer(t, adminAddr,
		`{"handler":"tcpops","keepalive":{"idle":"30s","count":3,"interval":"10s"},"lifetime":"1h","max_lifetime":"1d"}`, 2)
	roundTrip(t, peers[1].c, strings.Repeat("x", 1531)) // 1.5 KiB in all
	eventually(t, 2*time.Second, "bytes counted", func() bool {
		return peers[0].tc.bytesOut.Load() == 5 && peers[1].tc.bytesOut.Load() == 1536
	})
	first, second := peers[0].tc.ID(), peers[1].tc.ID()
	baseline := goleak.IgnoreCurrent()

	out := mustRunCLI(t, "list", "--address", adminAddr)
	checkTable(t, out, 2)
	for i, p := range peers {
		row := tableRow(t, out, p.tc.ID())
		bytes := [][]string{{"5", "B"}, {"1.5", "KiB"}}[i]
		// ID REMOTE LOCAL AGE IDLE LIFE_LEFT MAX_LEFT KEEPALIVE USER_TIMEOUT IN B OUT B STATE
		if len(row) != 14 || row[1] != p.c.LocalAddr().String() || row[2] != listen ||
			(row[5] != "1h" && !strings.HasPrefix(row[5], "59m")) || (row[6] != "1d" && !strings.HasPrefix(row[6], "23h")) ||
			row[7] != "30s/3/10s" || row[8] != "-" || row[9] != bytes[0] || row[10] != bytes[1] ||
			row[11] != bytes[0] || row[12] != bytes[1] || row[13] != "ESTAB" {
			t.Errorf("row of connection %d: %q", p.tc.ID(), row)
		}
	}
	if !strings.HasSuffix(out, "\n2 connections\n") {
		t.Errorf("last line: want 2 connections:\n%s", out)
	}

	// --json is the admin API's answer.
	var l connectionList
	if err := json.Unmarshal([]byte(mustRunCLI(t, "list", "--json", "--address", adminAddr)), &l); err != nil {
		t.Fatal(err)
	}
	if l.Total != 2 || fmt.Sprint(ids(l)) != fmt.Sprint([]uint64{first, second}) || l.Connections[0].BytesIn+l.Connections[1].BytesIn != 1541 {
		t.Fatalf("--json: %s", mustJSON(l))
	}

	// Filters.
	out = mustRunCLI(t, "list", "--address", adminAddr, "--remote", peers[1].c.LocalAddr().String())
	checkTable(t, out, 1)
	tableRow(t, out, second)
	if !strings.HasSuffix(out, "\n1 connection\n") {
		t.Errorf("filtered list:\n%s", out)
	}
	out = mustRunCLI(t, "list", "--address", adminAddr, "--local", listen, "--remote", "127.0.0.1")
	checkTable(t, out, 2)

	// A filter that matches nothing is an empty list, not an error (issue
	// 22: a script asking whether a phone is connected broke on it).
	out = mustRunCLI(t, "list", "--address", adminAddr, "--remote", "192.0.2.7")
	checkTable(t, out, 0)
	if !strings.HasSuffix(out, "\n0 connections\n") {
		t.Errorf("list that matches nothing:\n%s", out)
	}
	if out := mustRunCLI(t, "list", "--json", "--address", adminAddr, "--remote", "127.0.0.1", "--local", "127.0.0.1:1"); out != `{"total":0,"connections":[]}`+"\n" {
		t.Errorf("list --json that matches nothing: %q", out)
	}

	// Paging: the last line is the command for the next page.
	out = mustRunCLI(t, "list", "--address", adminAddr, "--limit", "1")
	checkTable(t, out, 1)
	tableRow(t, out, first)
	_, next, ok := strings.Cut(out, "1 of 2 connections; next page: caddy tcpops ")
	want := fmt.Sprintf("list --address %s --limit 1 --after %d\n", adminAddr, first)
	if !ok || next != want {
		t.Fatalf("last line of a cut list: want ...next page: caddy tcpops %s in\n%s", want, out)
	}
	out = mustRunCLI(t, strings.Fields(next)...)
	checkTable(t, out, 1)
	tableRow(t, out, second)
	if !strings.HasSuffix(out, fmt.Sprintf("\n1 of 2 connections after id %d\n", first)) {
		t.Fatalf("last page:\n%s", out)
	}

	// Each command closes its connection to the admin endpoint: neither
	// side keeps a goroutine for it.
	eventually(t, 3*time.Second, "no goroutine left by the commands", func() bool { return goleak.Find(baseline) == nil })
}

// detailLine returns the value of the line of `show` whose key is key.
func detailLine(t *testing.T, out, key string) string {
	t.Helper()
	for line := range strings.Lines(out) {
		if v, ok := strings.CutPrefix(line, key+"  "); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no line %q in\n%s", key, out)
	return ""
}

func TestCommandShow(t *testing.T) {
	adminAddr := freePort(t)
	listen, peers := startCLIServer(t, adminAddr,
		`{"handler":"tcpops","keepalive":{"idle":"7s","count":4,"interval":"3s"},"user_timeout":"5s","lifetime":"90s"}`, 1)
	c, tc := peers[0].c, peers[0].tc

	// Change the socket behind tcpops' back: show must print what the
	// kernel has, not what was asked for.
	setKeepalive(t, tc.tcp, 45, 6, 9)
	so := readSockopts(t, tc.tcp)
	out := mustRunCLI(t, "show", fmt.Sprint(tc.ID()), "--address", adminAddr)
	for key, want := range map[string]string{
		"id":                  fmt.Sprint(tc.ID()),
		"remote":              c.LocalAddr().String(),
		"local":               listen,
		"status":              "ok",
		"socket keepalive":    fmt.Sprintf("%ds/%d/%ds", so.idle, so.count, so.interval),
		"socket user_timeout": fmt.Sprintf("%ds", so.userTimeout/1000),
		"asked for":           "keepalive 7s/4/3s, user_timeout 5s, lifetime 1m30s, max_lifetime -, events -",
		"max_lifetime":        "-",
		"tcp state":           "ESTAB",
		"tcp retransmits":     "0 now, 0 in all",
	} {
		if got := detailLine(t, out, key); got != want {
			t.Errorf("show: %s is %q, want %q", key, got, want)
		}
	}
	if so.idle != 45 || so.count != 6 || so.interval != 9 || so.userTimeout != 5000 {
		t.Fatalf("getsockopt: %+v", so)
	}
	if got := detailLine(t, out, "lifetime"); !strings.HasPrefix(got, "1m30s, 1m") || !strings.HasSuffix(got, " left") {
		t.Errorf("show: lifetime is %q, want 1m30s, about 1m30s left", got)
	}
	for _, key := range []string{"started", "age", "idle", "bytes in", "bytes out", "tcp rtt", "tcp probes", "tcp unacked", "tcp last recv", "tcp last sent"} {
		detailLine(t, out, key)
	}
	if got := detailLine(t, out, "bytes in"); got != "5 B (5)" {
		t.Errorf("show: bytes in is %q", got)
	}

	var ci connectionInfo
	if err := json.Unmarshal([]byte(mustRunCLI(t, "show", "--json", fmt.Sprint(tc.ID()), "--address", adminAddr)), &ci); err != nil {
		t.Fatal(err)
	}
	if ci.ID != tc.ID() || *ci.Socket.KeepaliveIdle != 45 {
		t.Fatalf("show --json: %s", mustJSON(ci))
	}
}

// The admin endpoint on a unix socket, named by --address and found in a
// config file with --config (JSON, and a Caddyfile with --adapter).
func TestCommandUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	_, peers := startCLIServer(t, "unix/"+sock, `{"handler":"tcpops","lifetime":"1h"}`, 1)
	c, tc := peers[0].c, peers[0].tc

	jsonConfig := filepath.Join(dir, "caddy.json")
	caddyfile := filepath.Join(dir, "Caddyfile")
	for name, content := range map[string]string{
		jsonConfig: fmt.Sprintf(`{"admin":{"listen":%q}}`, "unix/"+sock),
		caddyfile:  "{\n\tadmin unix/" + sock + "\n}\n",
	} {
		if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, admin := range [][]string{
		{"--address", "unix/" + sock},
		{"--config", jsonConfig},
		{"--config", caddyfile, "--adapter", "caddyfile"},
	} {
		out := mustRunCLI(t, append([]string{"list"}, admin...)...)
		checkTable(t, out, 1)
		if row := tableRow(t, out, tc.ID()); row[1] != c.LocalAddr().String() {
			t.Fatalf("list %v: %q", admin, row)
		}
		out = mustRunCLI(t, append([]string{"show", fmt.Sprint(tc.ID())}, admin...)...)
		if got := detailLine(t, out, "remote"); got != c.LocalAddr().String() {
			t.Fatalf("show %v: remote %q", admin, got)
		}
	}
}

// Every error is one line on stderr and a failure with the exit status of
// its kind (caddy help tcpops): 1 a bad value, 2 nothing matched, 3 an
// endpoint unreachable or failing. A bad value is refused before any
// request is sent, which the cases show by naming an address nothing
// listens on.
func TestCommandErrors(t *testing.T) {
	adminAddr := freePort(t)
	_, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops","lifetime":"1h"}`, 1)
	id := peers[0].id()
	nobody := freePort(t) // nothing listens here
	noSock := "unix/" + filepath.Join(t.TempDir(), "nobody.sock")

	for _, tc := range []struct {
		status int
		want   string
		args   []string
	}{
		// The admin API's own messages, with the status and the endpoint.
		{exitNoMatch, "tcpops: connection 999999999 not found (HTTP 404 from " + adminAddr + ")", []string{"show", "999999999", "--address", adminAddr}},

		// Unreachable endpoints, named.
		{exitUnreachable, "tcpops: cannot reach Caddy's admin endpoint at " + nobody + ": dial tcp " + nobody + ": connect: connection refused",
			[]string{"list", "--address", nobody}},
		{exitUnreachable, "tcpops: cannot reach Caddy's admin endpoint at " + noSock + ": dial unix " + strings.TrimPrefix(noSock, "unix/") + ": connect: no such file or directory",
			[]string{"show", id, "--address", noSock}},
		{exitUsage, "tcpops: finding the admin endpoint: ", []string{"list", "--config", filepath.Join(t.TempDir(), "missing.json")}},

		// Bad values, refused before any request.
		{exitUsage, `tcpops: invalid connection id "abc": must be a decimal integer`, []string{"show", "abc", "--address", nobody}},
		{exitUsage, `tcpops: invalid connection id "-1": must be a decimal integer`, []string{"show", "--address", nobody, "--", "-1"}},
		{exitUsage, "tcpops: want one connection id; got 0 arguments", []string{"show", "--address", nobody}},
		{exitUsage, "tcpops: want one connection id; got 2 arguments", []string{"show", "1", "2", "--address", nobody}},
		{exitUsage, `--remote nohost: remote "nohost": want an IP address or IP:port (for IPv6: [addr]:port)`, []string{"list", "--remote", "nohost", "--address", nobody}},
		{exitUsage, `--local 1.2.3.4:99999: local "1.2.3.4:99999": want an IP address or IP:port`, []string{"list", "--local", "1.2.3.4:99999", "--address", nobody}},
		{exitUsage, "--limit 0: must be between 1 and 2147483647", []string{"list", "--limit", "0", "--address", nobody}},
		{exitUsage, "--limit -5: must be between 1 and 2147483647", []string{"list", "--limit", "-5", "--address", nobody}},
		{exitUsage, `invalid argument "x" for "--after" flag`, []string{"list", "--after", "x", "--address", nobody}},
		{exitUsage, `unknown flag: --bogus`, []string{"list", "--bogus", "--address", nobody}},
		{exitUsage, `tcpops: unknown subcommand "lst": want list, show, set or close`, []string{"lst", "--address", nobody}},
		{exitUsage, `--timeout soon: duration "soon": want a whole number of seconds`, []string{"list", "--timeout", "soon", "--address", nobody}},
		{exitUsage, `--timeout 0: must be more than 0`, []string{"list", "--timeout", "0", "--address", nobody}},
		{exitUsage, "tcpops: --auth-file is for --url; the admin endpoint takes no credentials", []string{"list", "--auth-file", "/nonexistent", "--address", nobody}},
		{exitUsage, "tcpops: give --url or the admin endpoint (--address, --config), not both", []string{"list", "--url", "http://" + nobody, "--address", nobody}},
		{exitUsage, "--url ftp://x: want an http:// or https:// URL", []string{"list", "--url", "ftp://x"}},
		{exitUsage, "--url https://: no host", []string{"list", "--url", "https://"}},
		{exitUsage, "--url https://u:xxxxx@edge: credentials in a URL are visible to every user (ps); put user:password in $TCPOPS_AUTH or --auth-file", []string{"list", "--url", "https://u:secret@edge"}},
		{exitUsage, "--url https://edge/?x=1: want a base URL, without a query or fragment", []string{"list", "--url", "https://edge/?x=1"}},
		{exitUsage, "--url http://" + nobody + "/: given twice", []string{"list", "--url", "http://" + nobody, "--url", "http://" + nobody + "/"}},
		{exitUsage, "tcpops: a connection id belongs to one edge: give one --url with it, or --remote/--local for every edge (2 --url given)",
			[]string{"show", "1", "--url", "http://" + nobody, "--url", "http://" + adminAddr}},
		{exitUsage, "tcpops: a connection id belongs to one edge", []string{"close", "1", "--url", "http://" + nobody, "--url", "http://" + adminAddr}},
		{exitUsage, "tcpops: --limit and --after page the list of one edge: give one --url with them",
			[]string{"list", "--limit", "5", "--url", "http://" + nobody, "--url", "http://" + adminAddr}},
		{exitUsage, "tcpops: give --cert-file and --key-file together", []string{"list", "--cert-file", "/x.pem", "--url", "https://" + nobody}},
		{exitUsage, "--ca-file /nonexistent/ca.pem: open /nonexistent/ca.pem: no such file or directory", []string{"list", "--ca-file", "/nonexistent/ca.pem", "--url", "https://" + nobody}},
	} {
		line := failCLIStatus(t, tc.status, tc.want, tc.args...)
		t.Logf("%s\n\t%s", strings.Join(tc.args, " "), line)
	}
}

// set checks its values with the Caddyfile's rules and says what is wrong
// in the Caddyfile's words: for each value the Caddyfile refuses, set
// refuses it too, before sending anything, with the Caddyfile's message
// after the flag and the value; a value the Caddyfile takes, set takes.
func TestCommandSetValuesAsCaddyfile(t *testing.T) {
	nobody := freePort(t) // a request would fail with "cannot reach"
	for _, tc := range []struct {
		flag, value, caddyfile string
		ok                     bool
	}{
		{"lifetime", "banana", "lifetime banana", false},
		{"lifetime", "0", "lifetime 0", false},
		{"lifetime", "-5s", "lifetime -5s", false},
		{"lifetime", "500us", "lifetime 500us", false}, // without the Caddyfile's hint for JSON
		{"lifetime", "90", "lifetime 90", true},
		{"lifetime", "1d", "lifetime 1d", true},
		{"lifetime", "off", "lifetime off", true},
		{"max-lifetime", "0s", "max_lifetime 0s", false},
		{"max-lifetime", "1h30m", "max_lifetime 1h30m", true},
		{"user-timeout", "1500us", "user_timeout 1500us", false},
		{"user-timeout", "700h", "user_timeout 700h", false},
		{"user-timeout", "0", "user_timeout 0", false},
		{"user-timeout", "40", "user_timeout 40", true},
		{"user-timeout", "off", "user_timeout off", true},
		{"keepalive", "0,4,6", "keepalive 0 4 6", false},
		{"keepalive", "45,0,6", "keepalive 45 0 6", false},
		{"keepalive", "45,128,6", "keepalive 45 128 6", false},
		{"keepalive", "45,x,6", "keepalive 45 x 6", false},
		{"keepalive", "45,4,1.5s", "keepalive 45 4 1.5s", false},
		{"keepalive", "40000,4,6", "keepalive 40000 4 6", false},
		{"keepalive", "soon,4,6", "keepalive soon 4 6", false},
		{"keepalive", "45,4,6", "keepalive 45 4 6", true},
		{"keepalive", "1m,4,6s", "keepalive 1m 4 6s", true},
		{"keepalive", "off", "keepalive off", true},
		{"keepalive", "on", "keepalive on", true},
		{"events", "maybe", "events maybe", false},
		{"events", "on", "events on", true},
		{"max-lifetime-jitter", "150%", "max_lifetime_jitter 150%", false},
		{"max-lifetime-jitter", "-1", "max_lifetime_jitter -1", false},
		{"max-lifetime-jitter", "lots", "max_lifetime_jitter lots", false},
		{"max-lifetime-jitter", "12.5%", "max_lifetime_jitter 12.5%", true},
		{"max-lifetime-jitter", "0", "max_lifetime_jitter 0", true},
		{"max-lifetime-grace", "0", "max_lifetime_grace 0", false},
		{"max-lifetime-grace", "soon", "max_lifetime_grace soon", false},
		{"max-lifetime-grace", "5s", "max_lifetime_grace 5s", true},
		{"max-lifetime-grace", "off", "max_lifetime_grace off", true},
		{"stats-period", "0", "stats_period 0", false},
		{"stats-period", "1500ms", "stats_period 1500ms", false},
		{"stats-period", "soon", "stats_period soon", false},
		{"stats-period", "10s", "stats_period 10s", true},
		{"stats-period", "off", "stats_period off", true},
	} {
		// The listener wrapper's Caddyfile, which takes every field a
		// PATCH does (a route refuses max_lifetime_grace).
		var lw ListenerWrapper
		cfErr := lw.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.caddyfile + "\n}"))
		if (cfErr == nil) != tc.ok {
			t.Fatalf("Caddyfile %q: %v; the case expects ok=%v", tc.caddyfile, cfErr, tc.ok)
		}
		args := []string{"set", "1", "--" + tc.flag, tc.value, "--address", nobody}
		if tc.ok {
			// Valid: the command goes on to send it, and finds nobody.
			failCLIStatus(t, exitUnreachable, "cannot reach Caddy's admin endpoint at "+nobody, args...)
			continue
		}
		prefix := "--" + tc.flag + " " + tc.value + ": "
		line := failCLI(t, prefix, args...)
		msg := strings.TrimPrefix(line, prefix)
		if !strings.HasPrefix(line, prefix) || msg == "" || !strings.Contains(cfErr.Error(), msg) {
			t.Errorf("set --%s %s: %q\n\twant %q and then the Caddyfile's message: %q", tc.flag, tc.value, line, prefix, cfErr)
		}
	}
	// The other refusals, also before any request.
	for _, tc := range []struct {
		want string
		args []string
	}{
		{"--keepalive 45,4: want <idle>,<count>,<interval> (as 30,3,10 or 30s,3,10s), on or off", []string{"set", "1", "--keepalive", "45,4"}},
		{"tcpops: nothing to set: give --keepalive, --user-timeout, --lifetime, --max-lifetime, --max-lifetime-jitter, --max-lifetime-grace, --stats-period or --events", []string{"set", "1"}},
		{"tcpops: give a connection id or --remote/--local, not both", []string{"set", "1", "--remote", "192.0.2.7", "--lifetime", "1s"}},
		{"tcpops: give a connection id, or --remote/--local for every connection that matches", []string{"set", "--lifetime", "1s"}},
		{`tcpops: invalid connection id "abc": must be a decimal integer`, []string{"set", "abc", "--lifetime", "1s"}},
		{"tcpops: want one connection id; got 2 arguments", []string{"set", "1", "2", "--lifetime", "1s"}},
		{`--remote 192.0.2.7:x: remote "192.0.2.7:x": want an IP address or IP:port`, []string{"set", "--remote", "192.0.2.7:x", "--lifetime", "1s"}},
		{"tcpops: give a connection id, or --remote/--local for every connection that matches", []string{"close"}},
		{"tcpops: give a connection id or --remote/--local, not both", []string{"close", "1", "--local", "127.0.0.1"}},
		{`tcpops: invalid connection id "x": must be a decimal integer`, []string{"close", "x"}},
	} {
		failCLI(t, tc.want, append(tc.args, "--address", nobody)...)
	}
}

// optionsOf returns the options in force on c.
func optionsOf(c *Conn) Options {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.opts
}

func TestCommandSetLifetime(t *testing.T) {
	adminAddr := freePort(t)
	_, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops","lifetime":"1h"}`, 2)
	c, tc, other, to := peers[0].c, peers[0].tc, peers[1].c, peers[1].tc

	// The lifetime runs from the change (Kamailio's timeout = now +
	// lifetime), so the connection closes a second after the command.
	start := time.Now()
	out := mustRunCLI(t, "set", fmt.Sprint(tc.ID()), "--lifetime", "1s", "--address", adminAddr)
	ran := time.Since(start)
	checkTable(t, out, 1)
	if row := tableRow(t, out, tc.ID()); row[5] != "1s" && !strings.HasSuffix(row[5], "ms") {
		t.Errorf("LIFE_LEFT after set --lifetime 1s: %q", row[5])
	}
	if !strings.HasSuffix(out, "\n1 connection changed\n") {
		t.Errorf("last line:\n%s", out)
	}
	waitClosed(t, c, 5*time.Second)
	took := time.Since(start)
	t.Logf("closed %v after the command started (it ran %v)", took, ran)
	if took < time.Second || took > ran+2*time.Second {
		t.Fatalf("closed %v after the command started (it ran %v), want 1s after it", took, ran)
	}
	if reason, cause := tc.endedWith(); reason != ReasonTimeout || cause != CauseLifetime {
		t.Fatalf("ended %s/%s, want timeout/lifetime", reason, cause)
	}
	assertOpen(t, other, 100*time.Millisecond)
	if lt := optionsOf(to).Lifetime.Duration(); lt != time.Hour {
		t.Fatalf("the other connection's lifetime changed to %v", lt)
	}
}

// set reaches every field of the PATCH body (issue 28: it had no flag for
// max_lifetime_jitter or max_lifetime_grace): each field of optionsFields,
// the list the PATCH handler checks bodies against, has its flag, and the
// two late ones reach the connection.
func TestCommandSetEveryPatchField(t *testing.T) {
	set := setCommand(new(endpointFlags))
	for _, field := range optionsFields {
		if set.Flags().Lookup(strings.ReplaceAll(field, "_", "-")) == nil {
			t.Errorf("the PATCH field %s has no flag --%s in caddy tcpops set", field, strings.ReplaceAll(field, "_", "-"))
		}
	}

	// An HTTP connection of the listener wrapper: the only kind that
	// takes max_lifetime_grace (a layer4 connection answers 409).
	adminAddr, addr := freePort(t), freePort(t)
	cfg := httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"tcpops","max_lifetime":"1h"}`},
		handlers: []string{respond("ok")},
	}.config()
	loadCaddy(t, strings.Replace(cfg, `"admin":{"disabled":true}`, fmt.Sprintf(`"admin":{"listen":%q}`, adminAddr), 1))
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	c := dial(t, addr)
	br := bufio.NewReader(c)
	if resp, body := rawRequest(t, c, br, getKeepAlive); resp.StatusCode != http.StatusOK || body != "ok" {
		t.Fatalf("response: %d %q", resp.StatusCode, body)
	}
	tc := waitTracked(t, c)
	id := fmt.Sprint(tc.ID())
	if o := optionsOf(tc); o.MaxLifetime.Duration() != time.Hour || o.MaxLifetimeJitter != nil {
		t.Fatalf("before the set: %s", mustJSON(o))
	}
	mustRunCLI(t, "set", id, "--max-lifetime-jitter", "50%", "--max-lifetime-grace", "7s", "--address", adminAddr)
	o := optionsOf(tc)
	if o.MaxLifetimeJitter == nil || *o.MaxLifetimeJitter != 50 || o.MaxLifetimeGrace.Duration() != 7*time.Second {
		t.Fatalf("after set --max-lifetime-jitter 50%% --max-lifetime-grace 7s: %s", mustJSON(o))
	}
	// The jitter drew the connection's own max_lifetime again, within
	// [30m, 1h] (what the admin API shows as max_lifetime_ms).
	var ci struct {
		MaxLifetimeMs int64 `json:"max_lifetime_ms"`
	}
	if err := json.Unmarshal([]byte(mustRunCLI(t, "show", id, "--json", "--address", adminAddr)), &ci); err != nil {
		t.Fatal(err)
	}
	if d := time.Duration(ci.MaxLifetimeMs) * time.Millisecond; d < 30*time.Minute || d > time.Hour {
		t.Fatalf("max_lifetime_ms %d after a 50%% jitter on 1h: want between 30m and 1h", ci.MaxLifetimeMs)
	}
	mustRunCLI(t, "set", id, "--max-lifetime-grace", "off", "--address", adminAddr)
	if g := optionsOf(tc).MaxLifetimeGrace; !g.IsOff() {
		t.Fatalf("max_lifetime_grace after set --max-lifetime-grace off: %v", g)
	}
	if resp, body := rawRequest(t, c, br, getKeepAlive); resp.StatusCode != http.StatusOK || body != "ok" {
		t.Fatalf("response after the sets: %d %q", resp.StatusCode, body)
	}
}

func TestCommandSetKeepalive(t *testing.T) {
	adminAddr := freePort(t)
	_, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops","keepalive":{"idle":"7s","count":2,"interval":"3s"}}`, 1)
	c, tc, id := peers[0].c, peers[0].tc, peers[0].id()

	out := mustRunCLI(t, "set", id, "--keepalive", "45,4,6", "--user-timeout", "30", "--events", "on", "--address", adminAddr)
	so := readSockopts(t, tc.tcp)
	if so.keepalive != 1 || so.idle != 45 || so.count != 4 || so.interval != 6 || so.userTimeout != 30000 {
		t.Fatalf("getsockopt after set --keepalive 45,4,6 --user-timeout 30: %+v", so)
	}
	if row := tableRow(t, out, tc.ID()); row[7] != "45s/4/6s" || row[8] != "30s" {
		t.Fatalf("row after set: %q", row)
	}
	if ev := optionsOf(tc).Events; ev == nil || !*ev {
		t.Fatalf("events not switched on: %s", mustJSON(optionsOf(tc)))
	}

	out = mustRunCLI(t, "set", id, "--keepalive", "off", "--user-timeout", "off", "--address", adminAddr)
	if so := readSockopts(t, tc.tcp); so.keepalive != 0 || so.userTimeout != 0 {
		t.Fatalf("getsockopt after set --keepalive off --user-timeout off: %+v", so)
	}
	if row := tableRow(t, out, tc.ID()); row[7] != "off" || row[8] != "-" {
		t.Fatalf("row after set off: %q", row)
	}
	mustRunCLI(t, "set", id, "--keepalive", "on", "--address", adminAddr)
	if so := readSockopts(t, tc.tcp); so.keepalive != 1 || so.idle != 45 {
		t.Fatalf("getsockopt after set --keepalive on: %+v", so)
	}
	roundTrip(t, c, "still served")
}

func TestCommandClose(t *testing.T) {
	adminAddr := freePort(t)
	_, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops"}`, 2)
	c, tc, other := peers[0].c, peers[0].tc, peers[1].c

	out := mustRunCLI(t, "close", fmt.Sprint(tc.ID()), "--address", adminAddr)
	if want := fmt.Sprintf("closed connection %d (reason closed, cause admin)\n", tc.ID()); out != want {
		t.Fatalf("close: %q, want %q", out, want)
	}
	waitClosed(t, c, 3*time.Second)
	if reason, cause := tc.endedWith(); reason != ReasonClosed || cause != CauseAdmin {
		t.Fatalf("ended %s/%s, want closed/admin", reason, cause)
	}
	roundTrip(t, other, "untouched")
	failCLIStatus(t, exitNoMatch, fmt.Sprintf("tcpops: connection %d not found (HTTP 404 from %s)", tc.ID(), adminAddr), "close", fmt.Sprint(tc.ID()), "--address", adminAddr)
	failCLIStatus(t, exitNoMatch, fmt.Sprintf("tcpops: connection %d not found", tc.ID()), "set", fmt.Sprint(tc.ID()), "--lifetime", "1s", "--address", adminAddr)
}

// set --remote/--local changes every connection that matches, through
// PATCH on the collection (PATCH and DELETE with filters come with main's
// admin change: before it, this and TestCommandCloseByRemote fail with the
// API's "method PATCH not allowed on /tcpops/connections").
func TestCommandSetByRemote(t *testing.T) {
	adminAddr := freePort(t)
	listen, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops","lifetime":"1h"}`, 2)
	c1, t1, t2 := peers[0].c, peers[0].tc, peers[1].tc

	out := mustRunCLI(t, "set", "--remote", c1.LocalAddr().String(), "--lifetime", "2m", "--address", adminAddr)
	checkTable(t, out, 1)
	tableRow(t, out, t1.ID())
	if !strings.HasSuffix(out, "\n1 connection changed\n") {
		t.Errorf("last line:\n%s", out)
	}
	if l1, l2 := optionsOf(t1).Lifetime.Duration(), optionsOf(t2).Lifetime.Duration(); l1 != 2*time.Minute || l2 != time.Hour {
		t.Fatalf("lifetimes after set --remote %s --lifetime 2m: %v and %v, want 2m and the other 1h", c1.LocalAddr(), l1, l2)
	}

	var a patchedAnswer
	if err := json.Unmarshal([]byte(mustRunCLI(t, "set", "--remote", "127.0.0.1", "--local", listen,
		"--keepalive", "45,4,6", "--json", "--address", adminAddr)), &a); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(a.IDs) != fmt.Sprint([]uint64{t1.ID(), t2.ID()}) || len(a.Connections) != 2 {
		t.Fatalf("set --json: %s", mustJSON(a))
	}
	for _, tc := range []*Conn{t1, t2} {
		if so := readSockopts(t, tc.tcp); so.idle != 45 || so.count != 4 || so.interval != 6 {
			t.Fatalf("getsockopt of connection %d: %+v", tc.ID(), so)
		}
	}
	failCLIStatus(t, exitNoMatch, "tcpops: no connection matches remote=192.0.2.7:5060",
		"set", "--remote", "192.0.2.7:5060", "--lifetime", "1s", "--address", adminAddr)
}

// close --remote/--local closes every connection that matches, through
// DELETE on the collection.
func TestCommandCloseByRemote(t *testing.T) {
	adminAddr := freePort(t)
	listen, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops"}`, 2)
	c1, t1, c2, t2 := peers[0].c, peers[0].tc, peers[1].c, peers[1].tc

	out := mustRunCLI(t, "close", "--remote", c1.LocalAddr().String(), "--address", adminAddr)
	want := fmt.Sprintf("closed connection %d (reason closed, cause admin)\n1 connection closed (remote=%s)\n", t1.ID(), c1.LocalAddr())
	if out != want {
		t.Fatalf("close --remote: %q, want %q", out, want)
	}
	waitClosed(t, c1, 3*time.Second)
	if reason, cause := t1.endedWith(); reason != ReasonClosed || cause != CauseAdmin {
		t.Fatalf("ended %s/%s, want closed/admin", reason, cause)
	}
	roundTrip(t, c2, "untouched")

	failCLIStatus(t, exitNoMatch, "tcpops: no connection matches remote=192.0.2.7:5060", "close", "--remote", "192.0.2.7:5060", "--address", adminAddr)

	var a closedAnswer
	if err := json.Unmarshal([]byte(mustRunCLI(t, "close", "--local", listen, "--json", "--address", adminAddr)), &a); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(a.IDs) != fmt.Sprint([]uint64{t2.ID()}) || len(a.Closed) != 1 || a.Closed[0].Cause != CauseAdmin {
		t.Fatalf("close --json: %s", mustJSON(a))
	}
	waitClosed(t, c2, 3*time.Second)
}

// caddyMainChild is the `caddy` that runCaddyMain runs: caddycmd.Main in a
// child process of the test binary, with its arguments in
// TCPOPS_TEST_CADDY_ARGS. TestMain (harness_test.go) calls it before any
// test when that variable is set, after every module has registered.
func caddyMainChild(raw string) {
	var args []string
	if err := json.Unmarshal([]byte(raw), &args); err != nil {
		fmt.Fprintln(os.Stderr, "TCPOPS_TEST_CADDY_ARGS:", err)
		os.Exit(2)
	}
	os.Args = append([]string{"caddy"}, args...)
	caddycmd.Main() // exits with the command's status on failure
	os.Exit(0)
}

// runCaddyMain runs `caddy args...` as a process, Caddy's own main and
// command tree, and returns what it printed and its exit status.
func runCaddyMain(t *testing.T, args ...string) (stdout, stderr string, status int) {
	t.Helper()
	raw, err := json.Marshal(args)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0])
	cmd.Env = append(os.Environ(), "TCPOPS_TEST_CADDY_ARGS="+string(raw))
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		status = exit.ExitCode()
	case err != nil:
		t.Fatalf("caddy %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errOut.String(), status
}

// The command as an operator runs it: Caddy's main, its command tree
// (where the plugin's init registered tcpops), its exit status and its
// help.
func TestCommandThroughCaddyMain(t *testing.T) {
	adminAddr := freePort(t)
	_, peers := startCLIServer(t, adminAddr, `{"handler":"tcpops","keepalive":{"idle":"30s","count":3,"interval":"10s"}}`, 1)

	out, errOut, status := runCaddyMain(t, "tcpops", "list", "--address", adminAddr)
	if status != 0 || errOut != "" {
		t.Fatalf("caddy tcpops list: status %d, stderr %q", status, errOut)
	}
	checkTable(t, out, 1)
	if row := tableRow(t, out, peers[0].tc.ID()); row[7] != "30s/3/10s" {
		t.Fatalf("caddy tcpops list: %q", row)
	}

	// --config finds the admin endpoint in a Caddyfile, and stderr stays
	// empty: Caddy's LoadConfig would log "using config from file" and
	// "adapted config to JSON" there (issue 28).
	cf := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(cf, []byte("{\n\tadmin "+adminAddr+"\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, status = runCaddyMain(t, "tcpops", "list", "--config", cf)
	if status != 0 || errOut != "" {
		t.Fatalf("caddy tcpops list --config %s: status %d, stderr %q; want 0 and nothing", cf, status, errOut)
	}
	checkTable(t, out, 1)

	// Each exit status of caddy help tcpops, from Caddy's own main.
	nobody := freePort(t)
	for _, tc := range []struct {
		args   []string
		status int
		want   string
	}{
		{[]string{"tcpops", "set", peers[0].id(), "--lifetime", "banana", "--address", adminAddr}, exitUsage,
			`Error: --lifetime banana: duration "banana": want a whole number of seconds or a duration such as 90s, 1m30s or 1d` + "\n"},
		{[]string{"tcpops", "list", "--bogus", "--address", adminAddr}, exitUsage, "Error: unknown flag: --bogus\n"},
		{[]string{"tcpops", "show", "999999999", "--address", adminAddr}, exitNoMatch,
			"Error: tcpops: connection 999999999 not found (HTTP 404 from " + adminAddr + ")\n"},
		{[]string{"tcpops", "list", "--address", nobody}, exitUnreachable,
			"Error: tcpops: cannot reach Caddy's admin endpoint at " + nobody + ": dial tcp " + nobody + ": connect: connection refused\n"},
	} {
		out, errOut, status := runCaddyMain(t, tc.args...)
		if status != tc.status || out != "" || errOut != tc.want {
			t.Errorf("caddy %s: status %d, stdout %q, stderr %q; want status %d, nothing on stdout and %q on stderr",
				strings.Join(tc.args, " "), status, out, errOut, tc.status, tc.want)
		}
	}
	// A list that matches nothing is an answer, not a failure.
	if out, errOut, status := runCaddyMain(t, "tcpops", "list", "--json", "--remote", "192.0.2.7", "--address", adminAddr); status != 0 || errOut != "" ||
		out != `{"total":0,"connections":[]}`+"\n" {
		t.Errorf("caddy tcpops list --json --remote 192.0.2.7: status %d, stdout %q, stderr %q", status, out, errOut)
	}

	help, _, status := runCaddyMain(t, "help", "tcpops")
	for _, want := range []string{
		"caddy tcpops list --remote 192.0.2.7",
		"caddy tcpops show 4711",
		"caddy tcpops set 4711 --lifetime 10m",
		"caddy tcpops close 4711",
		"--address", "--config", "--adapter", "--url", "--auth-file", "--timeout", "TCPOPS_AUTH",
		"Exit status:\n  0  done; also a list that matches nothing",
		"\n  1  usage", "\n  2  nothing matched", "\n  3  an endpoint could not be reached",
		"Available Commands:",
		// The footer points to tcpops' docs, not Caddy's (issue 28).
		"\n" + commandDocsFooter + "\n",
	} {
		if status != 0 || !strings.Contains(help, want) {
			t.Fatalf("caddy help tcpops (status %d) does not say %q:\n%s", status, want, help)
		}
	}
	if strings.Contains(help, "caddyserver.com/docs/command-line") {
		t.Fatalf("caddy help tcpops points to Caddy's command-line docs, which say nothing of tcpops:\n%s", help)
	}
	// Each subcommand's help, in process: a child costs a second under -race.
	for _, sub := range []string{"list", "show", "set", "close"} {
		if help := mustRunCLI(t, sub, "--help"); !strings.Contains(help, "Examples:\n  caddy tcpops "+sub) || !strings.HasSuffix(help, commandDocsFooter+"\n") {
			t.Fatalf("caddy tcpops %s --help has no example, or does not end with the tcpops docs footer:\n%s", sub, help)
		}
	}
}
