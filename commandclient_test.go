package tcpops

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
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
		{exitUnreachable, "tcpops: the answer of " + base + ` is not the tcpops API's JSON (invalid character '<' looking for beginning of value): "<html>welcome</html>"`, []string{"show", "200"}},
		{exitUnreachable, "tcpops: " + base + " answered HTTP 404 Not Found: 404 page not found (is it the base URL of a tcpops_api handler?)", []string{"show", "404"}},
		{exitUnreachable, "tcpops: " + base + " did not answer within 300ms (--timeout)", []string{"show", "1", "--timeout", "300ms"}},
		{exitUnreachable, "tcpops: " + base + " did not answer within 300ms (--timeout)", []string{"show", "2", "--timeout", "300ms"}},
	} {
		// The id is the case the server answers.
		failCLIStatus(t, tc.status, tc.want, append(tc.args, "--url", base)...)
	}
}
