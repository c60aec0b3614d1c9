package tcpops

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// This file holds the docs to the code (issue 22): every snippet of
// README.md and docs/*.md is adapted and validated, run where it can run
// here, and every build line has the forms that build.

// snippet is a fenced code block of a doc.
type snippet struct {
	file string
	line int
	lang string
	body string
}

func (s snippet) String() string { return fmt.Sprintf("%s:%d (%s)", s.file, s.line, s.lang) }

// docFiles are the docs whose snippets are checked.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil || len(files) == 0 {
		t.Fatalf("no docs: %v", err)
	}
	return append([]string{"README.md"}, files...)
}

// snippets returns the fenced code blocks of the docs.
func snippets(t *testing.T) []snippet {
	t.Helper()
	var all []snippet
	for _, f := range docFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var cur *snippet
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for n := 1; sc.Scan(); n++ {
			line := sc.Text()
			switch {
			case cur == nil && strings.HasPrefix(line, "```"):
				cur = &snippet{file: f, line: n, lang: strings.TrimPrefix(line, "```")}
			case cur != nil && line == "```":
				all = append(all, *cur)
				cur = nil
			case cur != nil:
				cur.body += line + "\n"
			}
		}
		if cur != nil {
			t.Fatalf("%s: unclosed code block", cur)
		}
	}
	return all
}

// isGrammar tells the README's syntax block of the directive (with
// <placeholders>) from a config.
func isGrammar(s snippet) bool {
	return strings.Contains(s.body, "<idle> <count> <interval>")
}

func init() {
	caddy.RegisterModule(execStandIn{})
}

// execStandIn stands in for events.handlers.exec (github.com/mholt/
// caddy-events-exec), which events.md builds in and this module does not
// import: it takes exec's Caddyfile form, "exec <command> [<args...>]", and
// its JSON fields, so that events.md's Caddyfile can be adapted and
// compared with its JSON.
type execStandIn struct {
	Command string   `json:"command,omitempty"`
	Args    []string `json:"args,omitempty"`
}

func (execStandIn) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "events.handlers.exec", New: func() caddy.Module { return new(execStandIn) }}
}

func (h *execStandIn) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.Command = d.Val()
	h.Args = d.RemainingArgs()
	return nil
}

func (execStandIn) Handle(context.Context, caddy.Event) error { return nil }

var _ caddyevents.Handler = execStandIn{}

// operatorCA is the registrar's CA certificate in docs/registrar.md's
// snippets: a file the operator makes.
const operatorCA = "/etc/caddy/registrar-ca.pem"

// adaptSnippet adapts a Caddyfile snippet, requires no warning and a
// config that is not empty, and validates it as `caddy validate` does.
func adaptSnippet(t *testing.T, s snippet) []byte {
	t.Helper()
	body := s.body
	if strings.Contains(body, operatorCA) {
		// A file the operator makes (docs/registrar.md): a real CA
		// certificate in its place, so that validating loads it.
		body = strings.ReplaceAll(body, operatorCA, testutil.NewPKI(t, t.TempDir()).CA)
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(body), map[string]any{"filename": s.file})
	if err != nil {
		t.Fatalf("%s: adapt: %v\n%s", s, err, s.body)
	}
	for _, w := range warnings {
		t.Errorf("%s: adapt warning: %s", s, w)
	}
	var c struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &c); err != nil || len(c.Apps) == 0 {
		t.Fatalf("%s adapts to a config without an app (%v): %s\n%s", s, err, cfg, s.body)
	}
	validateJSON(t, cfg)
	return cfg
}

// Every Caddyfile snippet is a whole config that adapts (with no warning)
// to one with an app, and validates; every JSON snippet is JSON, and a
// tcpops handler, a route or a config in it validates.
func TestDocSnippets(t *testing.T) {
	var caddyfiles, jsons, grammars int
	for _, s := range snippets(t) {
		switch s.lang {
		case "caddyfile":
			if isGrammar(s) {
				grammars++
				continue
			}
			caddyfiles++
			adaptSnippet(t, s)
		case "json":
			jsons++
			var v map[string]any
			if err := json.Unmarshal([]byte(s.body), &v); err != nil {
				t.Errorf("%s: not a JSON object: %v\n%s", s, err, s.body)
				continue
			}
			switch {
			case v["handler"] == "tcpops":
				// As Caddy loads a module: without its "handler" key.
				delete(v, "handler")
				raw, _ := json.Marshal(v)
				var h Handler
				if err := json.Unmarshal(raw, &h); err != nil {
					t.Errorf("%s: %v", s, err)
				} else if err := h.Validate(); err != nil {
					t.Errorf("%s: %v", s, err)
				}
			case v["handle"] != nil:
				validateJSON(t, []byte(fmt.Sprintf(`{"apps":{"layer4":{"servers":{"s":{"listen":["127.0.0.1:0"],"routes":[%s]}}}}}`, s.body)))
			case v["apps"] != nil:
				validateJSON(t, []byte(s.body))
			}
		}
	}
	// The README's syntax block is the only one that is not a config;
	// a config that looked like one would not be checked.
	if grammars != 1 || caddyfiles < 7 || jsons < 8 {
		t.Fatalf("found %d Caddyfile configs, %d syntax blocks and %d JSON snippets", caddyfiles, grammars, jsons)
	}
}

// events.md's JSON is what its Caddyfile adapts to (issue 22: it was
// another subscription).
func TestDocEventsJSONIsItsCaddyfile(t *testing.T) {
	var cf, js *snippet
	for _, s := range snippets(t) {
		if s.file != "docs/events.md" || !strings.Contains(s.body, "unregister") {
			continue
		}
		switch s.lang {
		case "caddyfile":
			cf = &s
		case "json":
			js = &s
		}
	}
	if cf == nil || js == nil {
		t.Fatal("events.md: no subscription snippets")
	}
	var adapted, doc struct {
		Apps struct {
			Events json.RawMessage `json:"events"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(adaptSnippet(t, *cf), &adapted); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(js.body), &doc); err != nil {
		t.Fatal(err)
	}
	if !sameJSON(t, adapted.Apps.Events, doc.Apps.Events) {
		t.Fatalf("%s is not what %s adapts to:\n%s", js, cf, adapted.Apps.Events)
	}
}

// buildLine matches an xcaddy build command, continuation lines joined.
var buildLine = regexp.MustCompile(`xcaddy build +(?:v\d|--)[^\n` + "`" + `]*`)

// Every xcaddy build line in the docs builds: Caddy v2.11.9, the plugin by
// a version or from the checkout with the @v0.0.0 that keeps go get from
// looking it up, and caddy-l4 v0.1.2 (issue 22: events.md's line had none
// of them).
func TestDocBuildLines(t *testing.T) {
	n := 0
	for _, f := range docFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(b), "\\\n", " ")
		for _, line := range buildLine.FindAllString(text, -1) {
			n++
			fields := strings.Fields(line)
			withs := map[string]string{}
			for i, fl := range fields {
				if fl == "--with" && i+1 < len(fields) {
					mod, ver, _ := strings.Cut(fields[i+1], "@")
					withs[mod] = ver
				}
			}
			tcpops, l4 := withs["github.com/tcpops/caddy-tcpops"], withs["github.com/mholt/caddy-l4"]
			if len(fields) < 3 || fields[2] != "v2.11.9" ||
				(tcpops != "<version>" && tcpops != "v0.0.0=.") || l4 != "v0.1.2" {
				t.Errorf("%s: %q: want xcaddy build v2.11.9 --with github.com/tcpops/caddy-tcpops@<version> (or @v0.0.0=.) --with github.com/mholt/caddy-l4@v0.1.2", f, line)
			}
		}
		for _, m := range regexp.MustCompile(`xcaddy/cmd/xcaddy@\S+`).FindAllString(text, -1) {
			if m != "xcaddy/cmd/xcaddy@v0.4.5" {
				t.Errorf("%s: %s: want xcaddy v0.4.5", f, m)
			}
		}
	}
	if n < 4 {
		t.Fatalf("found %d xcaddy build lines", n)
	}
}

// Every `caddy tcpops` command in the docs takes its flags and values:
// run against an address where nothing listens, none is refused as usage
// (exit status 1); each gets as far as the request.
func TestDocCLICommands(t *testing.T) {
	nobody := freePort(t)
	n := 0
	for _, s := range snippets(t) {
		if s.lang != "sh" {
			continue
		}
		for line := range strings.Lines(s.body) {
			line, _, _ = strings.Cut(line, "#")
			fields := strings.Fields(line)
			if len(fields) < 2 || fields[0] != "caddy" || fields[1] != "tcpops" {
				continue
			}
			n++
			args := fields[2:]
			hasURL := false
			for i, a := range args {
				if a == "--url" {
					args[i+1] = "http://" + nobody
					hasURL = true
				}
			}
			if hasURL {
				// Several --url, all the same address now: keep one.
				args = dedupURL(args)
			} else {
				args = append(args, "--address", nobody)
			}
			args = append(args, "--timeout", "5s")
			_, errOut, err := runCLI(t, args...)
			if st := cliStatus(err); st != exitUnreachable {
				t.Errorf("%s: caddy tcpops %s: exit status %d, want %d (as far as the request)\n%s", s, strings.Join(fields[2:], " "), st, exitUnreachable, errOut)
			}
		}
	}
	if n < 7 {
		t.Fatalf("found %d caddy tcpops commands", n)
	}
}

// dedupURL keeps the first --url of args.
func dedupURL(args []string) []string {
	var out []string
	seen := false
	for i := 0; i < len(args); i++ {
		if args[i] == "--url" {
			if seen {
				i++
				continue
			}
			seen = true
		}
		out = append(out, args[i])
	}
	return out
}

// readmeExampleValue returns the value the README's Example section shows
// for a column of `caddy tcpops list`: the code span after its name.
func readmeExampleValue(t *testing.T, readme, column string) string {
	t.Helper()
	section, _, _ := strings.Cut(readme[strings.Index(readme, "\n## Example\n"):], "\n## The `tcpops` directive")
	m := regexp.MustCompile(column + "\\s+`([^`]+)`").FindStringSubmatch(section)
	if m == nil {
		t.Fatalf("README's Example says nothing of %s", column)
	}
	return m[1]
}

// The README's example runs as written (issue 28: a typed line was cut at
// 3s): its stand-in upstream echoes through the tcpops route a typed line
// (nc's "hello" and its newline), a SIP CRLF keepalive and a REGISTER, each
// on a connection of its own, and `caddy tcpops list` shows what the
// README says it shows, in the README's words: the keepalive, the user
// timeout and the 10s lifetime running down, and an hour and a day for the
// REGISTER. Its addresses are moved to free ports, since others may hold
// 5060, 5070 and 2019 here.
func TestDocExampleRuns(t *testing.T) {
	cfg, err := os.ReadFile("example/Caddyfile.json")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	admin, front, upstream := freePort(t), freePort(t), freePort(t)
	s := strings.NewReplacer(`"localhost:2019"`, fmt.Sprintf("%q", admin),
		"127.0.0.1:5060", front, "127.0.0.1:5070", upstream).Replace(string(cfg))
	if s == string(cfg) || strings.Contains(s, "5060") || strings.Contains(s, "5070") {
		t.Fatalf("the example's addresses moved? %s", s)
	}
	loadCaddy(t, s)
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })

	// Each first message comes back at once: RoundTrip's 5s is longer
	// than caddy-l4's 3s matching timeout, which closes a connection that
	// a matcher waits on.
	line, keepalive, register := dial(t, front), dial(t, front), dial(t, front)
	roundTrip(t, line, "hello\n")
	roundTrip(t, keepalive, "\r\n\r\n")
	roundTrip(t, register, "REGISTER sip:example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n")
	tcs := map[string]*Conn{"line": waitTracked(t, line), "keepalive": waitTracked(t, keepalive), "register": waitTracked(t, register)}

	out := mustRunCLI(t, "list", "--address", admin)
	wantKA, wantUT := readmeExampleValue(t, readme, "KEEPALIVE"), readmeExampleValue(t, readme, "USER_TIMEOUT")
	for name, tc := range tcs {
		row := tableRow(t, out, tc.ID())
		if row[7] != wantKA || row[8] != wantUT {
			t.Errorf("%s: KEEPALIVE %s, USER_TIMEOUT %s; README says %s and %s\n%s", name, row[7], row[8], wantKA, wantUT, out)
		}
		switch name {
		case "register":
			// Right after it: at most a few seconds less on a loaded machine.
			for _, col := range []struct {
				name string
				i    int
			}{{"LIFE_LEFT", 5}, {"MAX_LEFT", 6}} {
				want, err1 := time.ParseDuration(readmeExampleValue(t, readme, col.name))
				got, err2 := time.ParseDuration(row[col.i])
				if err1 != nil || err2 != nil || got > want || want-got > 5*time.Second {
					t.Errorf("REGISTER: %s %s, README says %s\n%s", col.name, row[col.i], readmeExampleValue(t, readme, col.name), out)
				}
			}
		default:
			// The 10s lifetime running down.
			if left, err := time.ParseDuration(row[5]); err != nil || left <= 0 || left > 10*time.Second {
				t.Errorf("%s: LIFE_LEFT %s, want the 10s lifetime running down\n%s", name, row[5], out)
			}
		}
	}
}

// The README's first command says how long its first run takes, silent,
// and what makes the next ones fast (issue 28: 7 to 10 silent minutes,
// and a user who did not know whether it hung).
func TestDocFirstCommandSaysBuildTime(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := snippets(t)[0]
	if s.file != "README.md" || !strings.HasPrefix(s.body, "go run ./cmd/caddy run") {
		t.Fatalf("the README's first snippet is not its first command: %s\n%s", s, s.body)
	}
	// The paragraph right after it.
	_, rest, _ := strings.Cut(string(b), "```\n\n")
	para, _, _ := strings.Cut(rest, "\n\n")
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`first .*go run`),
		regexp.MustCompile(`prints\s+nothing`),
		regexp.MustCompile(`\d+ to \d+ minutes`),
		regexp.MustCompile(`build\s+cache`),
		regexp.MustCompile("`go env GOCACHE`"),
	} {
		if !want.MatchString(para) {
			t.Errorf("the paragraph after README's first command does not say %s:\n%s", want, para)
		}
	}
}

// The README's directive syntax and its table name every option the
// Caddyfile takes (issue 28: events on|off was only in events.md): the
// Caddyfile's options are the JSON fields of Options, optionsFields.
func TestDocDirectiveSyntaxHasEveryOption(t *testing.T) {
	var grammar string
	for _, s := range snippets(t) {
		if s.file == "README.md" && isGrammar(s) {
			grammar = s.body
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, opt := range optionsFields {
		if !regexp.MustCompile(`(?m)^\t` + opt + ` `).MatchString(grammar) {
			t.Errorf("README's tcpops syntax has no %s line:\n%s", opt, grammar)
		}
		if !regexp.MustCompile("(?m)^\\| `" + opt + "[ `]").Match(readme) {
			t.Errorf("README's table of subdirectives has no row for %s", opt)
		}
	}
}

// events.md's way to watch events with this build alone runs as written
// (issue 28): its config, on a free port with a short lifetime and its log
// in a file, logs the end and its event as the two lines the doc shows.
func TestDocEventsWatch(t *testing.T) {
	var cf, out *snippet
	for _, s := range snippets(t) {
		if s.file != "docs/events.md" {
			continue
		}
		switch {
		case s.lang == "caddyfile" && strings.Contains(s.body, "\tdebug\n") && strings.Contains(s.body, "events on"):
			cf = &s
		case s.lang == "" && strings.Contains(s.body, `"msg":"event"`):
			out = &s
		}
	}
	if cf == nil || out == nil {
		t.Fatal("events.md: no config with debug and events on, or no output")
	}
	var want []map[string]any
	for line := range strings.Lines(out.body) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("%s: %q: %v", out, line, err)
		}
		want = append(want, m)
	}

	addr := freePort(t)
	body := strings.NewReplacer("127.0.0.1:5060", addr, "lifetime 10s", "lifetime 300ms").Replace(cf.body)
	if body == cf.body || strings.Count(body, addr) != 1 || !strings.Contains(body, "lifetime 300ms") {
		t.Fatalf("%s: the address or the lifetime moved:\n%s", cf, cf.body)
	}
	raw := adaptSnippet(t, snippet{file: cf.file, line: cf.line, lang: cf.lang, body: body})
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	// As the doc runs it, but its log in a file and no admin endpoint
	// (others may hold 2019 here).
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	def := cfg["logging"].(map[string]any)["logs"].(map[string]any)["default"].(map[string]any)
	if def["level"] != "DEBUG" {
		t.Fatalf("%s: debug does not set the default log's level: %v", cf, def)
	}
	def["writer"] = map[string]any{"output": "file", "filename": logFile}
	cfg["admin"] = map[string]any{"disabled": true}
	loadCaddy(t, cfg)

	c := dial(t, addr)
	roundTrip(t, c, "hello\n")
	tc := waitTracked(t, c)
	waitClosed(t, c, 5*time.Second)
	var got []map[string]any
	eventually(t, 5*time.Second, "the end's log line and its event", func() bool {
		b, _ := os.ReadFile(logFile)
		got = got[:0]
		for line := range strings.Lines(string(b)) {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) != nil {
				continue
			}
			d, _ := m["data"].(map[string]any)
			if (m["msg"] == "tcpops: connection ended" && m["conid"] == float64(tc.ID())) ||
				(m["msg"] == "event" && d != nil && d["conid"] == float64(tc.ID())) {
				got = append(got, m)
			}
		}
		return len(got) == 2
	})
	// The doc's lines, field for field, but for what differs from run to
	// run: times, ids, addresses.
	for i, w := range want {
		g := got[i]
		for _, k := range []string{"level", "logger", "msg", "name", "origin", "reason", "cause", "bytes_in", "bytes_out", "server"} {
			if fmt.Sprint(g[k]) != fmt.Sprint(w[k]) {
				t.Errorf("line %d: %s %v, the doc shows %v\n%v", i+1, k, g[k], w[k], g)
			}
		}
		if gd, wd := g["data"], w["data"]; (gd == nil) != (wd == nil) {
			t.Errorf("line %d: data %v, the doc shows %v", i+1, gd, wd)
		} else if gd != nil {
			gm, wm := gd.(map[string]any), wd.(map[string]any)
			if len(gm) != len(wm) {
				t.Errorf("line %d: data has %d fields, the doc shows %d: %v", i+1, len(gm), len(wm), gm)
			}
			for _, k := range []string{"reason", "cause", "bytes_in", "bytes_out", "server"} {
				if fmt.Sprint(gm[k]) != fmt.Sprint(wm[k]) {
					t.Errorf("line %d: data.%s %v, the doc shows %v", i+1, k, gm[k], wm[k])
				}
			}
		}
	}
}
