package tcpops

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// This file tests how `caddy tcpops` reaches the API (commandclient.go):
// tcpops_api handlers given by --url, several edges, TLS client
// certificates and basic auth, paging to the end, and what each failure of
// an endpoint prints and exits with. An edge is an httptest server that
// serves the admin API's own handler, as the tcpops_api handler does.

// edge is an httptest server serving the admin API's handler under a path
// prefix, as a tcpops_api handler mounted there would, and recording the
// query of every request.
type edge struct {
	srv    *httptest.Server
	prefix string

	mu      sync.Mutex
	queries []string
}

func (e *edge) url() string { return e.srv.URL + e.prefix }

// edgeOptions set up an edge: basic auth it requires, client certificates
// it requires (a pool of CAs), TLS.
type edgeOptions struct {
	user, password string
	clientCAs      *x509.CertPool
	tls            bool
}

// startEdge starts an edge serving the admin API's handler under /ops.
func startEdge(t *testing.T, o edgeOptions) *edge {
	t.Helper()
	e := &edge{prefix: "/ops"}
	a := &adminAPI{logger: zap.NewNop()}
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		e.queries = append(e.queries, r.Method+" "+r.URL.RawQuery)
		e.mu.Unlock()
		if o.user != "" {
			if u, p, ok := r.BasicAuth(); !ok || u != o.user || p != o.password {
				w.Header().Set("WWW-Authenticate", `Basic realm="restricted"`)
				http.Error(w, "", http.StatusUnauthorized)
				return
			}
		}
		if err := a.handleConnections(w, r); err != nil {
			// As Caddy's admin endpoint answers an APIError.
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) {
				apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
			}
			if apiErr.Message == "" {
				apiErr.Message = apiErr.Err.Error()
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(apiErr.HTTPStatus)
			_ = json.NewEncoder(w).Encode(apiErr)
		}
	})
	e.srv = httptest.NewUnstartedServer(http.StripPrefix(e.prefix, api))
	if o.tls {
		e.srv.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
		if o.clientCAs != nil {
			e.srv.TLS.ClientAuth = tls.RequireAndVerifyClientCert
			e.srv.TLS.ClientCAs = o.clientCAs
		}
		e.srv.StartTLS()
	} else {
		e.srv.Start()
	}
	t.Cleanup(e.srv.Close)
	return e
}

// checkQueries fails the test unless every request the edge got sent only
// the API's documented parameters for its method, each once: the admin API
// refuses anything else.
func (e *edge) checkQueries(t *testing.T) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, mq := range e.queries {
		method, raw, _ := strings.Cut(mq, " ")
		allowed := []string{"remote", "local"}
		if method == http.MethodGet {
			allowed = append(allowed, "limit", "after")
		}
		seen := map[string]bool{}
		for kv := range strings.SplitSeq(raw, "&") {
			if kv == "" {
				continue
			}
			k, _, _ := strings.Cut(kv, "=")
			if seen[k] || !slices.Contains(allowed, k) {
				t.Errorf("%s with query %q: parameter %q repeated or not one of %v", method, raw, k, allowed)
			}
			seen[k] = true
		}
	}
}

// writeFile writes content to a new file in dir and returns its path.
func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Issue 20: the CLI through a tcpops_api on an HTTPS site, behind basic
// auth and client certificates, credentials from the environment or a
// file and never from a flag.
func TestCommandURLWithTLSAndAuth(t *testing.T) {
	_, peers := startCLIServer(t, freePort(t), `{"handler":"tcpops","lifetime":"1h"}`, 1)
	c, tc := peers[0].c, peers[0].tc
	dir := t.TempDir()
	pki := testutil.NewPKI(t, dir)
	pool := x509.NewCertPool()
	if ca, err := os.ReadFile(pki.CA); err != nil || !pool.AppendCertsFromPEM(ca) {
		t.Fatalf("the test CA %s: %v", pki.CA, err)
	}
	certFile, keyFile := pki.ClientCert, pki.ClientKey
	otherCert, otherKey := pki.StrangerCert, pki.Stranger
	e := startEdge(t, edgeOptions{user: "registrar", password: "s3cr:et", clientCAs: pool, tls: true})
	caFile := writeFile(t, dir, "ca.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.srv.Certificate().Raw})))
	tlsArgs := []string{"--url", e.url(), "--ca-file", caFile, "--cert-file", certFile, "--key-file", keyFile}
	with := func(args ...string) []string { return append(args, tlsArgs...) }

	t.Setenv(authEnv, "registrar:s3cr:et") // a colon in the password is the password's
	out := mustRunCLI(t, with("list")...)
	checkTable(t, out, 1)
	if row := tableRow(t, out, tc.ID()); row[1] != c.LocalAddr().String() {
		t.Fatalf("list through %s: %q", e.url(), row)
	}
	out = mustRunCLI(t, with("set", "--remote", c.LocalAddr().String(), "--lifetime", "2m")...)
	if lt := optionsOf(tc).Lifetime.Duration(); lt != 2*time.Minute || !strings.HasSuffix(out, "\n1 connection changed\n") {
		t.Fatalf("set through %s: lifetime %v\n%s", e.url(), lt, out)
	}
	if got := detailLine(t, mustRunCLI(t, with("show", fmt.Sprint(tc.ID()))...), "remote"); got != c.LocalAddr().String() {
		t.Fatalf("show through %s: remote %q", e.url(), got)
	}

	// --auth-file wins over the environment.
	good := writeFile(t, dir, "auth", "registrar:s3cr:et\n")
	bad := writeFile(t, dir, "bad-auth", "registrar:guess\n")
	t.Setenv(authEnv, "registrar:guess")
	mustRunCLI(t, with("list", "--auth-file", good)...)
	for _, args := range [][]string{with("list"), with("list", "--auth-file", bad)} {
		// The answer's body is empty, as Caddy's basic_auth's: the line
		// still ends with why (issue 28: it ended with the colon).
		line := failCLIStatus(t, exitUnreachable, "answered HTTP 401 Unauthorized: it refused the credentials of $TCPOPS_AUTH or --auth-file", args...)
		if !strings.Contains(line, e.url()) || strings.Contains(line, "guess") {
			t.Errorf("%v: %q: want the address %s and no password", args, line, e.url())
		}
	}
	t.Setenv(authEnv, "")
	failCLIStatus(t, exitUnreachable, `answered HTTP 401 Unauthorized: it asks for credentials (WWW-Authenticate: Basic realm="restricted") and none were sent: put user:password in $TCPOPS_AUTH or --auth-file`, with("list")...)
	failCLIStatus(t, exitUsage, "tcpops: $TCPOPS_AUTH: want user:password", func() []string { t.Setenv(authEnv, "nopassword"); return with("list") }()...)
	failCLIStatus(t, exitUsage, "tcpops: --auth-file "+writeFile(t, dir, "empty", "")+" is empty", with("list", "--auth-file", filepath.Join(dir, "empty"))...)
	t.Setenv(authEnv, "registrar:s3cr:et")
	// A password over plain http leaves the machine only to a loopback
	// address.
	failCLIStatus(t, exitUsage, "--url http://192.0.2.1:8443: the credentials of $TCPOPS_AUTH or --auth-file would cross the network in clear text; use https",
		"list", "--url", "http://192.0.2.1:8443")
	failCLIStatus(t, exitUnreachable, "cannot reach http://127.0.0.1:1", "list", "--url", "http://127.0.0.1:1")

	// TLS: the edge's certificate must be trusted, and the client's accepted.
	failCLIStatus(t, exitUnreachable, "cannot reach "+e.url()+": tls: failed to verify certificate",
		"list", "--url", e.url(), "--cert-file", certFile, "--key-file", keyFile)
	failCLIStatus(t, exitUnreachable, "cannot reach "+e.url(), "list", "--url", e.url(), "--ca-file", caFile)
	failCLIStatus(t, exitUnreachable, "cannot reach "+e.url(),
		"list", "--url", e.url(), "--ca-file", caFile, "--cert-file", otherCert, "--key-file", otherKey)
	failCLIStatus(t, exitUsage, "--ca-file "+keyFile+": no PEM certificate", "list", "--url", e.url(), "--ca-file", keyFile)

	// Not the API: the URL one level too high.
	failCLIStatus(t, exitUnreachable, "answered HTTP 404 Not Found",
		"list", "--url", e.srv.URL, "--ca-file", caFile, "--cert-file", certFile, "--key-file", keyFile)
	e.checkQueries(t)
}

// Several --url: list labels each row with its edge; set and close by
// address act on every edge and say which matched; an edge that fails
// does not stop the others, and the exit status says it failed.
func TestCommandSeveralEdges(t *testing.T) {
	_, peers := startCLIServer(t, freePort(t), `{"handler":"tcpops","lifetime":"1h"}`, 1)
	c, tc := peers[0].c, peers[0].tc
	remote := c.LocalAddr().String()
	// Both edges serve this process's registry: the same connection is on
	// each, which is enough to tell edges apart in what is printed, and a
	// close on the first leaves the second nothing to match.
	a, b := startEdge(t, edgeOptions{}), startEdge(t, edgeOptions{})
	dead := "http://" + freePort(t)
	edges := []string{"--url", a.url(), "--url", b.url()}

	out := mustRunCLI(t, append([]string{"list"}, edges...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "EDGE ") ||
		!strings.HasPrefix(lines[1], a.url()+" ") || !strings.HasPrefix(lines[2], b.url()+" ") ||
		lines[3] != "2 connections on 2 edges" {
		t.Fatalf("list on two edges:\n%s", out)
	}
	var l struct {
		Total       int `json:"total"`
		Connections []struct {
			Edge string `json:"edge"`
			ID   uint64 `json:"id"`
		} `json:"connections"`
	}
	if err := json.Unmarshal([]byte(mustRunCLI(t, append([]string{"list", "--json"}, edges...)...)), &l); err != nil {
		t.Fatal(err)
	}
	if l.Total != 2 || len(l.Connections) != 2 || l.Connections[0].Edge != a.url() || l.Connections[1].Edge != b.url() ||
		l.Connections[0].ID != tc.ID() {
		t.Fatalf("list --json on two edges: %+v", l)
	}

	// One edge down: the others are listed, the failure is on stderr, the
	// exit status 3.
	stdout, stderr, err := runCLI(t, "list", "--url", a.url(), "--url", dead, "--url", b.url())
	if cliStatus(err) != exitUnreachable || !strings.Contains(stdout, "2 connections on 2 edges") ||
		!strings.Contains(stderr, "Error: tcpops: cannot reach "+dead) || !strings.Contains(stderr, "Error: tcpops: 1 of 3 edges could not be listed") {
		t.Fatalf("list with an edge down: status %d\nstdout:\n%s\nstderr:\n%s", cliStatus(err), stdout, stderr)
	}

	out = mustRunCLI(t, append([]string{"set", "--remote", remote, "--lifetime", "3m"}, edges...)...)
	if want := fmt.Sprintf("2 connections changed (remote=%s): 1 on %s, 1 on %s\n", remote, a.url(), b.url()); !strings.HasSuffix(out, want) {
		t.Fatalf("set on two edges: want last line %q:\n%s", want, out)
	}
	if lt := optionsOf(tc).Lifetime.Duration(); lt != 3*time.Minute {
		t.Fatalf("lifetime after set on two edges: %v", lt)
	}

	out = mustRunCLI(t, append([]string{"close", "--remote", remote}, edges...)...)
	want := fmt.Sprintf("closed connection %d on %s (reason closed, cause admin)\n1 connection closed (remote=%s): 1 on %s; none matched on %s\n",
		tc.ID(), a.url(), remote, a.url(), b.url())
	if out != want {
		t.Fatalf("close on two edges:\n%q\nwant\n%q", out, want)
	}
	waitClosed(t, c, 3*time.Second)
	failCLIStatus(t, exitNoMatch, fmt.Sprintf("tcpops: no connection matches remote=%s on any of the 2 edges", remote),
		append([]string{"close", "--remote", remote}, edges...)...)

	var answers struct {
		Edges []struct {
			Edge   string          `json:"edge"`
			Answer json.RawMessage `json:"answer"`
			Error  string          `json:"error"`
		} `json:"edges"`
	}
	stdout, _, err = runCLI(t, append([]string{"set", "--remote", remote, "--lifetime", "1m", "--json"}, edges...)...)
	if cliStatus(err) != exitNoMatch || json.Unmarshal([]byte(stdout), &answers) != nil || len(answers.Edges) != 2 ||
		!strings.Contains(answers.Edges[1].Error, "no connection matches") {
		t.Fatalf("set --json on two edges, no match: status %d, %s", cliStatus(err), stdout)
	}
	a.checkQueries(t)
	b.checkQueries(t)
}

// list follows the API's pages to the end (issue 22: with 10,052
// connections, list --json printed 1,000 and said nothing), --limit caps
// it, and the next-part command it prints gives the rest.
func TestCommandListFollowsPages(t *testing.T) {
	const n = 2345
	tr := simTracker()
	ids := make([]uint64, 0, n)
	for i := range n {
		c := &Conn{Conn: &simConn{remote: simAddr(i), local: simLocal}, start: time.Now(), tracker: tr}
		connections.add(c)
		c.update(tr.opts, tr.logger)
		ids = append(ids, c.id)
		t.Cleanup(func() { c.finish(ReasonClosed, CauseShutdown) })
	}
	e := startEdge(t, edgeOptions{})
	var l connectionList
	if err := json.Unmarshal([]byte(mustRunCLI(t, "list", "--json", "--url", e.url())), &l); err != nil {
		t.Fatal(err)
	}
	got := make([]uint64, 0, len(l.Connections))
	for _, ci := range l.Connections {
		got = append(got, ci.ID)
	}
	if l.Total != n || l.NextAfter != 0 || !slices.Equal(got, ids) {
		t.Fatalf("list --json: total %d, next_after %d, %d connections; want all %d in id order", l.Total, l.NextAfter, len(got), n)
	}
	if e.mu.Lock(); len(e.queries) != 3 {
		t.Errorf("pages asked for: %q, want 3", e.queries)
	}
	e.mu.Unlock()

	out := mustRunCLI(t, "list", "--url", e.url())
	if rows := strings.Count(out, "\n") - 2; rows != n || !strings.HasSuffix(out, fmt.Sprintf("\n%d connections\n", n)) {
		t.Fatalf("list: %d rows, last line %q", rows, out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:])
	}

	out = mustRunCLI(t, "list", "--url", e.url(), "--limit", "1500")
	last := out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:]
	want := fmt.Sprintf("1500 of %d connections; next page: caddy tcpops list --url %s --limit 1500 --after %d\n", n, e.url(), ids[1499])
	if strings.Count(out, "\n")-2 != 1500 || last != want {
		t.Fatalf("list --limit 1500: last line\n%q\nwant\n%q", last, want)
	}
	_, next, _ := strings.Cut(last, "caddy tcpops ")
	out = mustRunCLI(t, strings.Fields(next)...)
	if strings.Count(out, "\n")-2 != n-1500 || !strings.HasSuffix(out, fmt.Sprintf("\n%d of %d connections after id %d\n", n-1500, n, ids[1499])) {
		t.Fatalf("the next part: %d rows\n%s", strings.Count(out, "\n")-2, out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:])
	}
	if err := json.Unmarshal([]byte(mustRunCLI(t, "list", "--json", "--limit", "7", "--url", e.url())), &l); err != nil {
		t.Fatal(err)
	}
	if l.Total != n || len(l.Connections) != 7 || l.NextAfter != ids[6] {
		t.Fatalf("list --json --limit 7: total %d, %d connections, next_after %d", l.Total, len(l.Connections), l.NextAfter)
	}
	e.checkQueries(t)
}

// The next-part command is quoted for a shell: an IPv6 address in
// brackets is a glob (issue 22).
func TestCommandShellJoin(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"caddy", "tcpops", "list", "--remote", "[::1]", "--limit", "5"}, "caddy tcpops list --remote '[::1]' --limit 5"},
		{[]string{"list", "--remote", "[2001:db8::7]:5060"}, "list --remote '[2001:db8::7]:5060'"},
		{[]string{"--remote", "::1", "--url", "https://edge1.example:8443/ops"}, "--remote ::1 --url https://edge1.example:8443/ops"},
		{[]string{"--config", "/etc/my caddy/Caddyfile", "--x", "it's", "*", ""}, `--config '/etc/my caddy/Caddyfile' --x 'it'\''s' '*' ''`},
	} {
		if got := shellJoin(tc.args); got != tc.want {
			t.Errorf("shellJoin(%q) = %s, want %s", tc.args, got, tc.want)
		}
	}
}

// What each failure of an endpoint prints and exits with: one line that
// names the endpoint and, for an answer, its HTTP status (issue 22: a 500
// printed only the server's message, an HTML answer a JSON error without
// the address, and every failure exited 1).
func TestCommandEndpointFailures(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch strings.TrimPrefix(r.URL.Path, "/tcpops/connections") {
		case "/500":
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintln(w, `{"error":"tcpops: encoding response: boom"}`)
		case "/502":
			w.WriteHeader(http.StatusBadGateway)
			fmt.Fprintln(w, "<html>\n<body>Bad Gateway</body>\n</html>")
		case "/403":
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprintln(w, `{"error":"tcpops: read_only: PATCH is refused"}`)
		case "/401", "/4030", "/503":
			// No body, as Caddy's basic_auth answers.
			w.WriteHeader(map[string]int{"/401": 401, "/4030": 403, "/503": 503}[strings.TrimPrefix(r.URL.Path, "/tcpops/connections")])
		case "/400":
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprintln(w, `{"error":"tcpops: unknown query parameter \"x\""}`)
		case "/200":
			fmt.Fprintln(w, "<html>welcome</html>")
		case "/1": // hangs
			<-release
		case "/2": // half an answer
			w.Header().Set("Content-Length", "1000")
			fmt.Fprint(w, `{"id":1,`)
			w.(http.Flusher).Flush()
			<-release
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) }) // runs first: the handlers return
	base := srv.URL
	for _, tc := range []struct {
		status int
		want   string
		args   []string
	}{
		{exitUnreachable, "tcpops: " + base + " answered HTTP 500 Internal Server Error: tcpops: encoding response: boom", []string{"show", "500"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 502 Bad Gateway: <html> <body>Bad Gateway</body> </html>", []string{"show", "502"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 403 Forbidden: tcpops: read_only: PATCH is refused", []string{"close", "403"}},
		{exitUsage, `tcpops: unknown query parameter "x" (HTTP 400 from ` + base + ")", []string{"show", "400"}},
		// An answer without a body still ends with a reason (issue 28).
		{exitUnreachable, "tcpops: " + base + " answered HTTP 401 Unauthorized: it asks for credentials and none were sent: put user:password in $TCPOPS_AUTH or --auth-file", []string{"show", "401"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 403 Forbidden: it refused the request without saying why (a remote_ip matcher, or another rule of the site)", []string{"show", "4030"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 503 Service Unavailable: the answer has no body that says why", []string{"show", "503"}},
		{exitUnreachable, "tcpops: the answer of " + base + ` to GET /tcpops/connections/200 is not the tcpops API's (invalid character '<' looking for beginning of value): <html>welcome</html>`, []string{"show", "200"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 404 Not Found: 404 page not found (is it the base URL of a tcpops_api handler?)", []string{"show", "404"}},
		{exitUnreachable, "tcpops: " + base + " did not answer within 300ms (--timeout)", []string{"show", "1", "--timeout", "300ms"}},
		{exitUnreachable, "tcpops: " + base + " did not answer within 300ms (--timeout)", []string{"show", "2", "--timeout", "300ms"}},
	} {
		// The id is the case the server answers.
		failCLIStatus(t, tc.status, tc.want, append(tc.args, "--url", base)...)
	}
}

// TestCommandFollowsNoRedirect (issue 27, case 1): a --url that answers
// with a redirect is an error that names where it points, exit 3, and the
// request goes no further: not to the door it points at, which would
// close the connection, nor, as a 302 or 303 makes of a DELETE, as a GET
// whose list would read as "0 connections closed".
func TestCommandFollowsNoRedirect(t *testing.T) {
	_, peers := startCLIServer(t, freePort(t), `{"handler":"tcpops","lifetime":"1h"}`, 1)
	c, tc := peers[0].c, peers[0].tc
	remote := c.LocalAddr().String()
	target := startEdge(t, edgeOptions{user: "registrar", password: "s3cret"})
	var mu sync.Mutex
	var sent []string // Authorization headers the redirector got
	moved := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		sent = append(sent, r.Header.Get("Authorization"))
		mu.Unlock()
		code, _ := strconv.Atoi(strings.TrimPrefix(strings.Split(r.URL.Path, "/")[1], "r"))
		http.Redirect(w, r, target.url()+strings.TrimPrefix(r.URL.RequestURI(), "/r"+strconv.Itoa(code)), code)
	}))
	t.Cleanup(moved.Close)
	t.Setenv(authEnv, "registrar:s3cret")
	// The setup is real: the target closes the connection when asked
	// directly, with these credentials (below, once the redirects failed).
	for _, r := range []struct {
		code int
		args []string
	}{
		{307, []string{"close", "--remote", remote}},
		{302, []string{"close", "--remote", remote}},
		{303, []string{"close", fmt.Sprint(tc.ID())}},
		{308, []string{"set", "--remote", remote, "--lifetime", "1m"}},
		{302, []string{"set", fmt.Sprint(tc.ID()), "--lifetime", "1m"}},
		{301, []string{"list"}},
		{302, []string{"show", fmt.Sprint(tc.ID())}},
	} {
		base := moved.URL + "/r" + strconv.Itoa(r.code)
		line := failCLIStatus(t, exitUnreachable, fmt.Sprintf("tcpops: %s answered HTTP %d %s, a redirect to %s", base, r.code, http.StatusText(r.code), target.url()+"/tcpops/connections"),
			append(r.args, "--url", base)...)
		if !strings.Contains(line, "which is not followed") {
			t.Errorf("%v: %q", r.args, line)
		}
	}
	target.mu.Lock()
	followed := len(target.queries)
	target.mu.Unlock()
	if followed != 0 {
		t.Fatalf("the redirects were followed: the target got %d requests", followed)
	}
	if lt := optionsOf(tc).Lifetime.Duration(); lt != time.Hour {
		t.Fatalf("lifetime %v after redirected sets, want the config's 1h", lt)
	}
	roundTrip(t, c, "not closed through a redirect")
	mu.Lock()
	if len(sent) == 0 || sent[0] == "" {
		t.Errorf("the redirector got no Authorization header: the credentials were not sent (setup)")
	}
	mu.Unlock()
	mustRunCLI(t, "close", "--remote", remote, "--url", target.url())
	waitClosed(t, c, 5*time.Second)
}

// TestCommandDoorNotFoundIsNotNoMatch (issue 27, case 2): the door's own
// 404 ("no such endpoint": a --url with the wrong prefix) is exit 3 with
// the hint, not the API's "nothing matched" (exit 2), alone and across
// edges, where the edge that answers it counts as failed; the API's own
// "not found" for an id is still exit 2.
func TestCommandDoorNotFoundIsNotNoMatch(t *testing.T) {
	f := startDoor(t, "off", func(web string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	handle_path /edge1/* {
		tcpops_api
	}
	handle {
		tcpops_api
	}
}`, web)
	})
	good, wrong := "http://"+f.web+"/edge1", "http://"+f.web+"/edge2"
	remote := f.c.LocalAddr().String()
	failCLIStatus(t, exitNoMatch, fmt.Sprintf("tcpops: connection %d not found (HTTP 404 from %s)", f.tc.ID()+1000, good),
		"show", fmt.Sprint(f.tc.ID()+1000), "--url", good)
	for _, args := range [][]string{
		{"close", "--remote", remote},
		{"close", fmt.Sprint(f.tc.ID())},
		{"set", "--remote", remote, "--lifetime", "2m"},
		{"show", fmt.Sprint(f.tc.ID())},
	} {
		failCLIStatus(t, exitUnreachable, "tcpops: "+wrong+" answered HTTP 404 Not Found: tcpops: no such endpoint /edge2/tcpops/connections",
			append(args, "--url", wrong)...)
	}
	roundTrip(t, f.c, "still served")
	stdout, stderr, err := runCLI(t, "close", "--remote", remote, "--url", good, "--url", wrong)
	if cliStatus(err) != exitUnreachable || !strings.Contains(stdout, fmt.Sprintf("1 connection closed (remote=%s): 1 on %s\n", remote, good)) ||
		!strings.Contains(stderr, "Error: tcpops: "+wrong+" answered HTTP 404 Not Found: tcpops: no such endpoint") ||
		!strings.Contains(stderr, "Error: tcpops: 1 of 2 edges failed") {
		t.Fatalf("close on a good and a wrong --url: status %d\nstdout:\n%s\nstderr:\n%s", cliStatus(err), stdout, stderr)
	}
	waitClosed(t, f.c, 5*time.Second)
}

// answerServer is an httptest server that answers every request with what
// answer returns for it, and counts the requests.
func answerServer(t *testing.T, answer func(r *http.Request) (status int, body string)) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		status, body := answer(r)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

// TestCommandChecksAnswerShapes (issue 27, case 1): a 2xx answer that is
// not what the API answers to the request sent (the list answer a DELETE
// turned GET would get, another connection's, another filter's, an empty
// object) is exit 3, never a success.
func TestCommandChecksAnswerShapes(t *testing.T) {
	conn := func(id int) string {
		return fmt.Sprintf(`{"id":%d,"remote":"192.0.2.7:5060","local":"127.0.0.1:5060","status":"ok","started":"2026-01-01T00:00:00Z","options":{},"socket":{}}`, id)
	}
	list := `{"total":0,"connections":[]}`
	for _, tc := range []struct {
		name, body string
		args       []string
		want       string
	}{
		{"a list for a DELETE by address", list, []string{"close", "--remote", "192.0.2.7"}, `no "filter"`},
		{"a list for a DELETE by id", list, []string{"close", "7"}, `no "id"`},
		{"a list for a PATCH by address", list, []string{"set", "--remote", "192.0.2.7", "--lifetime", "1m"}, `no "filter"`},
		{"another connection", conn(8), []string{"show", "7"}, "connection 8, not 7"},
		{"another connection, set", conn(8), []string{"set", "7", "--lifetime", "1m"}, "connection 8, not 7"},
		{"another close", `{"id":8,"reason":"closed","cause":"admin"}`, []string{"close", "7"}, "connection 8 closed"},
		{"no reason", `{"id":7,"reason":"","cause":""}`, []string{"close", "7"}, `reason ""`},
		{"a wider filter", `{"filter":{"remote":"192.0.2.7"},"ids":[7],"closed":[{"id":7,"reason":"closed","cause":"admin"}]}`,
			[]string{"close", "--remote", "192.0.2.7:5060"}, "filter {Remote:192.0.2.7 Local:}, not the {Remote:192.0.2.7:5060 Local:} sent"},
		{"nothing closed", `{"filter":{"remote":"192.0.2.7"},"ids":[],"closed":[]}`, []string{"close", "--remote", "192.0.2.7"}, "ids [] and entries for []"},
		{"ids and entries differ", `{"filter":{"remote":"192.0.2.7"},"ids":[7,8],"connections":[` + conn(7) + `]}`,
			[]string{"set", "--remote", "192.0.2.7", "--lifetime", "1m"}, "ids [7 8] and entries for [7]"},
		{"an empty object", `{}`, []string{"show", "7"}, `no "id"`},
		{"null", `null`, []string{"list"}, `no "total"`},
		{"a page out of order", `{"total":2,"connections":[` + conn(9) + "," + conn(8) + `]}`, []string{"list"}, "connection 8 after 9: not in id order"},
		{"next_after not the last", `{"total":2,"next_after":99,"connections":[` + conn(9) + `]}`, []string{"list"}, "next_after 99 is not the page's last id"},
		{"a 204", ``, []string{"close", "7"}, "unexpected end of JSON input"},
	} {
		srv, _ := answerServer(t, func(*http.Request) (int, string) {
			if tc.body == "" {
				return http.StatusNoContent, ""
			}
			return http.StatusOK, tc.body
		})
		line := failCLIStatus(t, exitUnreachable, "is not the tcpops API's", append(tc.args, "--url", srv.URL)...)
		if !strings.Contains(line, tc.want) {
			t.Errorf("%s: %q, want it to say %q", tc.name, line, tc.want)
		}
	}
}

// TestCommandPrintsServerTextSafely (issue 27, case 7): what a server
// sends reaches the terminal escaped, in errors and in tables, and --json
// stays valid JSON with nothing in it that acts on a terminal.
func TestCommandPrintsServerTextSafely(t *testing.T) {
	const evil = `\u001b]0;PWNED\u0007\u001b[2J\u009b31m\u202e\t`
	// What JSON may carry raw in a string: DEL, a C1 control, a
	// bidirectional override, bytes that are not UTF-8.
	const raw = "\x7f\u009b2J\u202e\xff"
	conn := `{"id":7,"remote":"` + evil + `","local":"127.0.0.1:5060` + raw + `","listen":"` + evil + `","status":"` + evil + `","started":"2026-01-01T00:00:00Z","options":{},"socket":{"tcp_info":{"state":"` + evil + `"}},"socket_error":"` + evil + `"}`
	srv, _ := answerServer(t, func(r *http.Request) (int, string) {
		switch {
		case r.Method == http.MethodDelete:
			return http.StatusInternalServerError, `{"error":"` + evil + `"}`
		case strings.HasSuffix(r.URL.Path, "/7"):
			return http.StatusOK, conn
		}
		return http.StatusOK, `{"total":1,"connections":[` + conn + `]}`
	})
	clean := func(what, s string) {
		t.Helper()
		for _, r := range s {
			if (r < 0x20 && r != '\n') || (r >= 0x7f && r <= 0x9f) || r == 0x202e {
				t.Fatalf("%s: %U reached the terminal:\n%q", what, r, s)
			}
		}
	}
	for _, args := range [][]string{{"list"}, {"show", "7"}} {
		out := mustRunCLI(t, append(args, "--url", srv.URL)...)
		clean(strings.Join(args, " "), out)
		if !strings.Contains(out, `\x1b]0;PWNED\x07\x1b[2J\u009b31m\u202e\t`) {
			t.Errorf("%v: the server's text is not shown escaped:\n%s", args, out)
		}
		out = mustRunCLI(t, append(args, "--json", "--url", srv.URL)...)
		clean(strings.Join(args, " ")+" --json", out)
		var v map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("%v --json: not JSON: %v\n%s", args, err, out)
		}
	}
	_, stderr, err := runCLI(t, "close", "7", "--url", srv.URL)
	clean("close's error", stderr)
	if cliStatus(err) != exitUnreachable || !strings.Contains(stderr, `answered HTTP 500 Internal Server Error: \x1b]0;PWNED\x07`) {
		t.Fatalf("close: status %d, stderr %q", cliStatus(err), stderr)
	}
}

// TestCommandListIsBounded (issue 27, case 8): an edge that always answers
// a full page and a new next_after, announcing a total of 1, is asked
// twice, not forever; a page that does not move on stops at once.
func TestCommandListIsBounded(t *testing.T) {
	page := func(from int) string {
		var b strings.Builder
		fmt.Fprintf(&b, `{"total":1,"next_after":%d,"connections":[`, from+listPage-1)
		for i := range listPage {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, `{"id":%d,"remote":"192.0.2.7:5060","local":"127.0.0.1:5060","status":"ok","started":"2026-01-01T00:00:00Z","options":{},"socket":{}}`, from+i)
		}
		b.WriteString("]}")
		return b.String()
	}
	srv, asked := answerServer(t, func(r *http.Request) (int, string) {
		after, _ := strconv.Atoi(r.URL.Query().Get("after"))
		return http.StatusOK, page(after + 1)
	})
	failCLIStatus(t, exitUnreachable, fmt.Sprintf("tcpops: %s has sent %d connections, far more than the 1 it announced", srv.URL, 2*listPage), "list", "--url", srv.URL)
	if n := asked.Load(); n != 2 {
		t.Errorf("the edge was asked %d times, want 2", n)
	}
	stuck, _ := answerServer(t, func(*http.Request) (int, string) { return http.StatusOK, page(1) })
	failCLIStatus(t, exitUnreachable, "connection 1 on the page after id 1000", "list", "--url", stuck.URL)
}

// TestCommandNeverEchoesCredentials (issue 27, case 9): a password in a
// --url is never printed, whatever else is wrong with the URL, nor one in
// a redirect's Location; and a filter that would widen is refused before
// anything is sent.
func TestCommandNeverEchoesCredentials(t *testing.T) {
	for _, tc := range []struct{ url, shown string }{
		{"https://ops:s3cret@host/%zz", "https://ops:xxxxx@host/%zz"},
		{"ftp://ops:s3cret@host", "ftp://ops:xxxxx@host"},
		{"https://ops:s3cret@host", "https://ops:xxxxx@host"},
		{"https://s3cret@host:8443/ops", "https://xxxxx@host:8443/ops"},
		{"ops:s3cret@host", "ops:xxxxx@host"},
		{"https://ops:s3cr@t@[::1", "https://ops:xxxxx@[::1"},
	} {
		line := failCLI(t, "--url "+tc.shown+": credentials in a URL are visible to every user (ps)", "list", "--url", tc.url)
		if strings.Contains(line, "s3cr") {
			t.Errorf("--url %s: %q shows the password", tc.url, line)
		}
	}
	moved := httptest.NewServer(http.RedirectHandler("https://ops:s3cret@elsewhere.example/", http.StatusFound))
	t.Cleanup(moved.Close)
	line := failCLIStatus(t, exitUnreachable, "a redirect to https://ops:xxxxx@elsewhere.example/", "list", "--url", moved.URL)
	if strings.Contains(line, "s3cret") {
		t.Errorf("the redirect's Location: %q shows the password", line)
	}
	failCLI(t, `--remote 192.0.2.7:0: remote "192.0.2.7:0": port 0 is no connection's port`, "close", "--remote", "192.0.2.7:0", "--url", moved.URL)
	failCLI(t, `--local 0.0.0.0: local "0.0.0.0": the unspecified address`, "set", "--local", "0.0.0.0", "--lifetime", "1m", "--url", moved.URL)
}

// FuzzCommandAnswer (issue 27): whatever a server answers (a status, a
// header, a body), every command ends without a panic, prints nothing that
// acts on a terminal, keeps --json valid JSON, exits 2 only on a 404, and
// succeeds only when the answer states the success: a 2xx whose body is
// the API's answer about what was asked (the id, the filter sent).
func FuzzCommandAnswer(f *testing.F) {
	conn7 := `{"id":7,"remote":"192.0.2.7:5060","local":"127.0.0.1:5060","status":"ok","started":"2026-01-01T00:00:00Z","options":{},"socket":{}}`
	for _, seed := range []struct {
		status int
		hk, hv string
		body   string
	}{
		{200, "", "", conn7},
		{200, "", "", `{"id":7,"reason":"closed","cause":"admin"}`},
		{200, "", "", `{"filter":{"remote":"192.0.2.7:5060"},"ids":[7],"closed":[{"id":7,"reason":"closed","cause":"admin"}]}`},
		{200, "", "", `{"filter":{"remote":"192.0.2.7"},"ids":[7],"connections":[` + conn7 + `]}`},
		{200, "", "", `{"total":1,"connections":[` + conn7 + `]}`},
		{200, "", "", `{"total":1,"next_after":7,"connections":[` + conn7 + `]}`},
		{302, "Location", "http://ops:s3cret@elsewhere/", ""},
		{404, "", "", `{"error":"tcpops: connection 7 not found"}`},
		{404, "", "", `{"error":"tcpops: no such endpoint /x"}`},
		{500, "", "", `{"error":"\u001b]0;PWNED\u0007"}`},
		{200, "", "", `{"total":1,"connections":[{"id":7,"remote":"\u009b2J\u202e","local":"","status":"","started":"2026-01-01T00:00:00Z","options":{},"socket":{}}]}`},
	} {
		f.Add(seed.status, seed.hk, seed.hv, []byte(seed.body))
	}
	var mu sync.Mutex
	var answer struct {
		status int
		hk, hv string
		body   []byte
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		a := answer
		mu.Unlock()
		if a.hk != "" {
			w.Header()[a.hk] = []string{a.hv}
		}
		w.WriteHeader(a.status)
		_, _ = w.Write(a.body)
	}))
	f.Cleanup(srv.Close)
	f.Fuzz(func(t *testing.T, status int, hk, hv string, body []byte) {
		status = 200 + int(uint(status)%400) // what WriteHeader sends as it is
		if !headerToken(hk) || strings.ContainsAny(hv, "\r\n\x00") {
			hk, hv = "", ""
		}
		mu.Lock()
		answer.status, answer.hk, answer.hv, answer.body = status, http.CanonicalHeaderKey(hk), hv, body
		mu.Unlock()
		// stated reports whether body states the success of the command:
		// the fields each answer has, about what was asked.
		stated := func(args []string) bool {
			var a struct {
				ID          *uint64         `json:"id"`
				Reason      string          `json:"reason"`
				Filter      *queryFilter    `json:"filter"`
				IDs         []uint64        `json:"ids"`
				Total       *int            `json:"total"`
				Connections json.RawMessage `json:"connections"`
			}
			if status/100 != 2 || json.Unmarshal(body, &a) != nil {
				return false
			}
			switch {
			case args[0] == "list":
				return a.Total != nil && len(a.Connections) > 0 && string(a.Connections) != "null"
			case len(args) > 1 && args[1] == "7":
				return a.ID != nil && *a.ID == 7 && (args[0] != "close" || a.Reason != "")
			case args[1] == "--remote":
				return a.Filter != nil && a.Filter.Remote == args[2] && len(a.IDs) > 0
			}
			return false
		}
		for _, args := range [][]string{
			{"show", "7"}, {"show", "7", "--json"}, {"close", "7"}, {"set", "7", "--lifetime", "1m"},
			{"close", "--remote", "192.0.2.7:5060"}, {"set", "--remote", "192.0.2.7", "--lifetime", "1m", "--json"},
			{"list"}, {"list", "--json"},
		} {
			stdout, stderr, err := runCLI(t, append(args, "--url", srv.URL, "--timeout", "10s")...)
			for _, out := range []string{stdout, stderr} {
				for _, r := range out {
					if (r < 0x20 && r != '\n') || (r >= 0x7f && r <= 0x9f) || (r >= 0x202a && r <= 0x202e) {
						t.Fatalf("%v on HTTP %d %q: %U reached the terminal: %q", args, status, body, r, out)
					}
				}
			}
			code := cliStatus(err)
			switch {
			case err == nil && !stated(args):
				t.Fatalf("%v on HTTP %d %q: success, which the answer does not state\n%s", args, status, body, stdout)
			case err == nil && slices.Contains(args, "--json") && !json.Valid([]byte(stdout)):
				t.Fatalf("%v on HTTP %d %q: --json printed what is not JSON: %q", args, status, body, stdout)
			case code == exitNoMatch && status != http.StatusNotFound:
				t.Fatalf("%v on HTTP %d %q: exit 2 (nothing matched) without a 404", args, status, body)
			}
		}
	})
}

// headerToken reports whether s is a header field name Go's server writes
// as it is, and not one that frames the answer (which would only make the
// client wait for its --timeout).
func headerToken(s string) bool {
	switch http.CanonicalHeaderKey(s) {
	case "", "Content-Length", "Transfer-Encoding", "Connection", "Trailer":
		return false
	}
	for _, r := range s {
		if r > 0x7e || r <= ' ' || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, r) {
			return false
		}
	}
	return true
}
