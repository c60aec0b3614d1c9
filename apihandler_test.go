package tcpops

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"golang.org/x/crypto/bcrypt"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// This file tests the tcpops_api HTTP handler (apihandler.go) in a real
// in-process Caddy loaded from a Caddyfile, as users write it: behind
// basic_auth and client certificates, read_only, with the admin endpoint
// off, its audit log, and its answers beside the admin endpoint's.

// doorSite is a Caddyfile with the admin endpoint as admin (a global
// option: "off", or an address), a log of the tcpops_api handler as JSON
// into logPath, a layer4 server on l4 whose connections tcpops tracks with
// a 1m lifetime on the way to upstream, and the site blocks.
func doorSite(admin, logPath, l4, upstream, sites string) string {
	return fmt.Sprintf(`{
	admin %s
	auto_https disable_redirects
	skip_install_trust
	log {
		level ERROR
	}
	log door {
		output file %s
		format json
		include http.handlers.tcpops_api
	}
	layer4 {
		%s {
			route {
				tcpops {
					lifetime 1m
				}
				proxy %s
			}
		}
	}
}
%s
`, admin, logPath, l4, upstream, sites)
}

// loadCaddyfile adapts the Caddyfile, requires that it adapts without
// warnings, and runs it in process until the test ends.
func loadCaddyfile(t *testing.T, body string) []byte {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(body), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapt: %v\n%s", err, body)
	}
	for _, w := range warnings {
		t.Errorf("adapt warning: %s", w)
	}
	loadCaddy(t, cfg)
	return cfg
}

// doorFixture is a door site running in process, with one connection
// tracked through its layer4 server.
type doorFixture struct {
	web, logPath string   // the site's address, the handler's log
	cfg          []byte   // the adapted config
	c            net.Conn // the client side of the tracked connection
	tc           *Conn
}

// startDoor runs a doorSite with the admin endpoint as admin and the site
// blocks sites(web), web being a free loopback address for the site, then
// opens and tracks one connection through the layer4 server.
func startDoor(t *testing.T, admin string, sites func(web string) string) doorFixture {
	t.Helper()
	up := startUpstream(t, nil)
	l4 := freePort(t)
	f := doorFixture{web: freePort(t), logPath: filepath.Join(t.TempDir(), "door.log")}
	f.cfg = loadCaddyfile(t, doorSite(admin, f.logPath, l4, up.addr(), sites(f.web)))
	f.c = dial(t, l4)
	roundTrip(t, f.c, "x")
	f.tc = waitTracked(t, f.c)
	return f
}

// bcryptHash is a basic_auth password hash at bcrypt's lowest cost: the
// default (14, caddy hash-password's) takes seconds per check under -race.
func bcryptHash(t *testing.T, password string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// door is a client of a tcpops_api site.
type door struct {
	t          *testing.T
	base       string
	http       *http.Client
	user, pass string // basic auth, when user is set
}

func newDoor(t *testing.T, base string, tlsConfig *tls.Config) *door {
	tr := &http.Transport{TLSClientConfig: tlsConfig}
	if tlsConfig != nil {
		// The site is https://localhost:port, bound to 127.0.0.1: the URL
		// keeps the name (SNI, Host), the dial goes to the loopback IPv4.
		tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, _ := net.SplitHostPort(addr)
			return (&net.Dialer{}).DialContext(ctx, network, "127.0.0.1:"+port)
		}
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &door{t: t, base: base, http: &http.Client{Transport: tr, Timeout: 60 * time.Second}}
}

// send sends a request (a non-empty body as JSON) and returns the answer,
// or the error of the exchange.
func (d *door) send(method, path, body string) (*http.Response, []byte, error) {
	d.t.Helper()
	req, err := http.NewRequest(method, d.base+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if d.user != "" {
		req.SetBasicAuth(d.user, d.pass)
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

// do is send that fails the test if the exchange fails.
func (d *door) do(method, path, body string) (int, []byte) {
	d.t.Helper()
	resp, b, err := d.send(method, path, body)
	if err != nil {
		d.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp.StatusCode, b
}

// apiErrorOf decodes an answer as Caddy's admin JSON error.
func apiErrorOf(t *testing.T, b []byte) string {
	t.Helper()
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(b, &e); err != nil || e.Error == "" {
		t.Fatalf("answer is not a JSON error: %q", b)
	}
	return e.Error
}

// auditLines returns the JSON lines the handler logged into path.
func auditLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

// awaitAudit waits for the audit line of method with the status and returns it.
func awaitAudit(t *testing.T, path, method string, status int) map[string]any {
	t.Helper()
	var found map[string]any
	eventually(t, 5*time.Second, fmt.Sprintf("audit line of a %s answered %d", method, status), func() bool {
		for _, l := range auditLines(t, path) {
			if l["msg"] == "tcpops_api: "+method+" request" && l["status"] == float64(status) {
				found = l
				return true
			}
		}
		return false
	})
	return found
}

// TestAPIHandlerBasicAuth: behind basic_auth, with the admin endpoint off,
// the door answers 401 without credentials or with wrong ones and serves
// the admin API's endpoints with them; a PATCH it accepts changes the
// connection, a DELETE closes it, and each is logged with the user and the
// remote address.
func TestAPIHandlerBasicAuth(t *testing.T) {
	hash := bcryptHash(t, "s3cret")
	f := startDoor(t, "off", func(web string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	basic_auth {
		registrar %s
	}
	tcpops_api
}`, web, hash)
	})
	cfg, web, logPath, c, tc := f.cfg, f.web, f.logPath, f.c, f.tc
	var adminCfg struct {
		Admin struct {
			Disabled bool `json:"disabled"`
		} `json:"admin"`
	}
	if err := json.Unmarshal(cfg, &adminCfg); err != nil || !adminCfg.Admin.Disabled {
		t.Fatalf("the config does not turn the admin endpoint off: %s", cfg)
	}
	one := fmt.Sprintf("/tcpops/connections/%d", tc.ID())
	d := newDoor(t, "http://"+web, nil)

	// No unknown user: Caddy checks one against its fake hash, of cost 14
	// (against timing attacks), which takes tens of seconds under -race on
	// a loaded machine; a wrong password takes the same path to the 401.
	for _, creds := range [][2]string{{"", ""}, {"registrar", "wrong"}} {
		d.user, d.pass = creds[0], creds[1]
		for _, method := range []string{"GET", "PATCH", "DELETE"} {
			if status, b := d.do(method, one, `{"lifetime":"1h"}`); status != http.StatusUnauthorized {
				t.Errorf("%s %s as %q/%q: %d %s, want 401", method, one, creds[0], creds[1], status, b)
			}
		}
	}
	if lt := lifetimeOf(tc); lt != time.Minute {
		t.Fatalf("lifetime %v after refused requests, want the 1m of the config", lt)
	}

	d.user, d.pass = "registrar", "s3cret"
	status, b := d.do("GET", "/tcpops/connections?remote="+c.LocalAddr().String(), "")
	var list connectionList
	if status != http.StatusOK || json.Unmarshal(b, &list) != nil || list.Total != 1 || list.Connections[0].ID != tc.ID() {
		t.Fatalf("GET by remote with credentials: %d %s; want connection %d", status, b, tc.ID())
	}
	status, b = d.do("PATCH", "/tcpops/connections?remote="+c.LocalAddr().String(), `{"lifetime":"1h"}`)
	if status != http.StatusOK {
		t.Fatalf("PATCH with credentials: %d %s", status, b)
	}
	if lt := lifetimeOf(tc); lt != time.Hour {
		t.Fatalf("lifetime %v after the PATCH, want 1h", lt)
	}
	line := awaitAudit(t, logPath, "PATCH", http.StatusOK)
	if line["user"] != "registrar" || line["remote_addr"] == "" || !strings.HasPrefix(line["remote_addr"].(string), "127.0.0.1:") {
		t.Errorf("PATCH audit line without the user or the remote address: %v", line)
	}
	if status, b = d.do("DELETE", one, ""); status != http.StatusOK {
		t.Fatalf("DELETE with credentials: %d %s", status, b)
	}
	waitClosed(t, c, 5*time.Second)
	line = awaitAudit(t, logPath, "DELETE", http.StatusOK)
	if line["user"] != "registrar" || line["uri"] != one {
		t.Errorf("DELETE audit line: %v", line)
	}
}

// TestAPIHandlerReadOnly: a read_only door answers GET, and 403 saying why
// to every PATCH and DELETE, by id or by address, which change nothing.
func TestAPIHandlerReadOnly(t *testing.T) {
	f := startDoor(t, "off", func(web string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	tcpops_api {
		read_only
	}
}`, web)
	})
	web, logPath, c, tc := f.web, f.logPath, f.c, f.tc
	before := readSockopts(t, tc.tcp)
	d := newDoor(t, "http://"+web, nil)
	one := fmt.Sprintf("/tcpops/connections/%d", tc.ID())
	byAddr := "/tcpops/connections?remote=" + c.LocalAddr().String()

	for _, req := range [][3]string{
		{"PATCH", one, `{"lifetime":"1ms"}`},
		{"PATCH", byAddr, `{"keepalive":{"off":true},"lifetime":"1h"}`},
		{"DELETE", one, ""},
		{"DELETE", byAddr, ""},
		{"PATCH", "/tcpops/connections/abc", `not json`}, // refused before anything is read
	} {
		status, b := d.do(req[0], req[1], req[2])
		if msg := apiErrorOf(t, b); status != http.StatusForbidden || !strings.Contains(msg, "read_only, so it serves GET only") {
			t.Errorf("%s %s on a read_only door: %d %q, want 403 saying it is read_only", req[0], req[1], status, msg)
		}
	}
	resp, b, err := d.send("PUT", one, `{}`)
	if err != nil || resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET" {
		t.Errorf("PUT on a read_only door: %v %v, Allow %q: %s; want 405 with Allow: GET", err, resp.Status, resp.Header.Get("Allow"), b)
	}
	awaitAudit(t, logPath, "DELETE", http.StatusForbidden)

	// Nothing changed: the same socket options, the same lifetime, and
	// the connection is served.
	if after := readSockopts(t, tc.tcp); after != before {
		t.Errorf("socket options changed through a read_only door: %+v, before %+v", after, before)
	}
	if lt := lifetimeOf(tc); lt != time.Minute {
		t.Errorf("lifetime %v after refused PATCHes, want 1m", lt)
	}
	roundTrip(t, c, "still served")
	status, b := d.do("GET", one, "")
	var ci connectionInfo
	if status != http.StatusOK || json.Unmarshal(b, &ci) != nil || ci.ID != tc.ID() {
		t.Fatalf("GET on a read_only door: %d %s", status, b)
	}
}

// TestAPIHandlerClientCertificate: on an HTTPS site that requires client
// certificates from its CA (tls { client_auth }), the registrar's
// certificate gets through, and the handshake fails with none or with one
// another CA issued; the audit line names the certificate's subject.
func TestAPIHandlerClientCertificate(t *testing.T) {
	pki := testutil.NewPKI(t, t.TempDir())
	var port string
	f := startDoor(t, "off", func(web string) string {
		_, port, _ = net.SplitHostPort(web)
		return fmt.Sprintf(`
https://localhost:%s {
	bind 127.0.0.1
	tls %s %s {
		client_auth {
			mode require_and_verify
			trust_pool file %s
		}
	}
	tcpops_api
}`, port, pki.ServerCert, pki.ServerKey, pki.CA)
	})
	logPath, c, tc := f.logPath, f.c, f.tc
	one := fmt.Sprintf("/tcpops/connections/%d", tc.ID())
	base := "https://localhost:" + port

	for name, cfg := range map[string]*tls.Config{
		"no certificate":              pki.ClientTLS(t, "", ""),
		"a certificate of another CA": pki.ClientTLS(t, pki.StrangerCert, pki.Stranger),
	} {
		d := newDoor(t, base, cfg)
		for _, method := range []string{"GET", "DELETE"} {
			if resp, b, err := d.send(method, one, ""); err == nil {
				t.Errorf("%s with %s: %s %s; want the TLS handshake refused", method, name, resp.Status, b)
			}
		}
	}
	roundTrip(t, c, "not closed by a refused DELETE")

	d := newDoor(t, base, pki.ClientTLS(t, pki.ClientCert, pki.ClientKey))
	status, b := d.do("PATCH", one, `{"lifetime":"2h"}`)
	if status != http.StatusOK {
		t.Fatalf("PATCH with the registrar's certificate: %d %s", status, b)
	}
	if lt := lifetimeOf(tc); lt != 2*time.Hour {
		t.Fatalf("lifetime %v after the PATCH, want 2h", lt)
	}
	line := awaitAudit(t, logPath, "PATCH", http.StatusOK)
	if line["tls_client_subject"] != "CN=registrar" || line["user"] != "" {
		t.Errorf("PATCH audit line: %v; want tls_client_subject CN=registrar and no user", line)
	}
}

// TestAPIHandlerSameAnswersAsAdmin sends the same requests, good and bad,
// to the admin endpoint and to the door: the status, the Content-Type, the
// Allow header and, for errors, the body are the same byte for byte.
func TestAPIHandlerSameAnswersAsAdmin(t *testing.T) {
	adminAddr := freePort(t)
	f := startDoor(t, adminAddr, func(web string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	tcpops_api
}`, web)
	})
	// Caddy's Stop leaves the admin endpoint running.
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	web, c, tc := f.web, f.c, f.tc
	one := fmt.Sprintf("/tcpops/connections/%d", tc.ID())
	unknown := fmt.Sprintf("/tcpops/connections/%d", tc.ID()+1000)
	byAddr := "/tcpops/connections?remote=" + c.LocalAddr().String()
	admin, d := newDoor(t, "http://"+adminAddr, nil), newDoor(t, "http://"+web, nil)

	for _, req := range []struct{ method, path, ctype, body string }{
		{"GET", "/tcpops/connections/abc", "", ""},
		{"GET", "/tcpops/connections/-1", "", ""},
		{"GET", "/tcpops/connections/99999999999999999999999", "", ""},
		{"GET", one + "/extra", "", ""},
		{"GET", unknown, "", ""},
		{"PATCH", unknown, "application/json", `{"lifetime":"1s"}`},
		{"DELETE", unknown, "", ""},
		{"PUT", one, "application/json", `{}`},
		{"POST", "/tcpops/connections", "application/json", `{}`},
		{"DELETE", "/tcpops/connections", "", ""},
		{"PATCH", "/tcpops/connections", "application/json", `{"lifetime":"1s"}`},
		{"PATCH", byAddr + "&limit=5", "application/json", `{"lifetime":"1s"}`},
		{"PATCH", "/tcpops/connections?remote=192.0.2.99", "application/json", `{"lifetime":"1s"}`},
		{"PATCH", byAddr, "text/plain", `{"lifetime":"1s"}`},
		{"PATCH", one, "application/json", `{"lifetime":`},
		{"PATCH", one, "application/json", `[]`},
		{"PATCH", one, "application/json", `{"lifetime":"1s"} {"lifetime":"2s"}`},
		{"PATCH", one, "application/json", `{"lifetime":"1s","bogus":1}`},
		{"PATCH", one, "application/json", `{"keepalive":{"count":500}}`},
		{"PATCH", one, "application/json", `{"lifetime":30}`},
		{"PATCH", one, "application/json", ``},
		{"PATCH", one, "", `{"lifetime":"1s"}`},
		{"PATCH", one, "application/json", `{"lifetime":"` + strings.Repeat("9", maxPatchBody) + `"}`},
		{"GET", "/tcpops/connections?limit=0", "", ""},
		{"GET", "/tcpops/connections?remote=nohost", "", ""},
		{"GET", "/tcpops/connections?sort=age", "", ""},
		// Good ones: the same status; their bodies differ by the clock.
		{"GET", one, "", ""},
		{"GET", byAddr, "", ""},
		{"PATCH", one, "application/json", `{"lifetime":"5m"}`},
		{"PATCH", byAddr, "application/json", `{"keepalive":{"idle":"30s"}}`},
	} {
		var answers [2]struct {
			status             int
			ctype, allow, body string
		}
		for i, cl := range []*door{admin, d} {
			hreq, err := http.NewRequest(req.method, cl.base+req.path, strings.NewReader(req.body))
			if err != nil {
				t.Fatal(err)
			}
			if req.ctype != "" {
				hreq.Header.Set("Content-Type", req.ctype)
			}
			resp, err := cl.http.Do(hreq)
			if err != nil {
				t.Fatalf("%s %s: %v", req.method, req.path, err)
			}
			b, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			a := &answers[i]
			a.status, a.ctype, a.allow, a.body = resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Allow"), string(b)
		}
		adm, dr := answers[0], answers[1]
		if adm.status == http.StatusOK && dr.status == http.StatusOK {
			continue
		}
		if adm != dr {
			t.Errorf("%s %s %.40s:\n admin: %d %q Allow %q %q\n door:  %d %q Allow %q %q",
				req.method, req.path, req.body, adm.status, adm.ctype, adm.allow, adm.body, dr.status, dr.ctype, dr.allow, dr.body)
		}
	}
	roundTrip(t, c, "still served")
}

// TestAPIHandlerPaths: behind handle_path, the door serves the path after
// the prefix; any other path is a 404 that says what the door serves.
func TestAPIHandlerPaths(t *testing.T) {
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
	tc := f.tc
	d := newDoor(t, "http://"+f.web, nil)
	for _, p := range []string{"/edge1/tcpops/connections/%d", "/tcpops/connections/%d"} {
		path := fmt.Sprintf(p, tc.ID())
		status, b := d.do("GET", path, "")
		var ci connectionInfo
		if status != http.StatusOK || json.Unmarshal(b, &ci) != nil || ci.ID != tc.ID() {
			t.Errorf("GET %s: %d %s", path, status, b)
		}
	}
	for _, path := range []string{"/", "/metrics", "/tcpops", "/tcpops/connectionsX", "/edge1/tcpops/conn", "/edge2/tcpops/connections"} {
		status, b := d.do("GET", path, "")
		if msg := apiErrorOf(t, b); status != http.StatusNotFound || !strings.Contains(msg, "tcpops_api serves /tcpops/connections and /tcpops/connections/{id}") {
			t.Errorf("GET %s: %d %q, want 404 saying what tcpops_api serves", path, status, msg)
		}
	}

	// The log line of a change names the door that made it, prefix
	// included (issue 28: it said "through the admin API").
	for _, ch := range []struct{ method, path, body, msg, door string }{
		{"PATCH", fmt.Sprintf("/edge1/tcpops/connections/%d", tc.ID()), `{"lifetime":"2m"}`, "tcpops: connection updated through tcpops_api", "http://" + f.web + "/edge1"},
		{"PATCH", "/tcpops/connections?remote=" + f.c.LocalAddr().String(), `{"lifetime":"3m"}`, "tcpops: connections updated through tcpops_api", "http://" + f.web},
	} {
		if status, b := d.do(ch.method, ch.path, ch.body); status != http.StatusOK {
			t.Fatalf("%s %s: %d %s", ch.method, ch.path, status, b)
		}
		var line map[string]any
		eventually(t, 5*time.Second, "the change's log line: "+ch.msg, func() bool {
			for _, l := range auditLines(t, f.logPath) {
				if l["msg"] == ch.msg && l["door"] == ch.door {
					line = l
					return true
				}
			}
			return false
		})
		if line["conids"] == nil && line["conid"] != float64(tc.ID()) {
			t.Errorf("%s %s: log line %v, want the connection's id", ch.method, ch.path, line)
		}
	}
	for _, l := range auditLines(t, f.logPath) {
		if strings.Contains(fmt.Sprint(l["msg"]), "admin API") {
			t.Errorf("a change through the door logged as the admin API's: %v", l)
		}
	}
}

// TestAPIHandlerRemoteIP: behind a remote_ip matcher, as docs/registrar.md
// shows it, the door serves the registrar's addresses and the site answers
// others with its own 403.
func TestAPIHandlerRemoteIP(t *testing.T) {
	other := freePort(t)
	site := func(web, ranges string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	@registrar remote_ip %s
	handle @registrar {
		tcpops_api
	}
	handle {
		respond "not the registrar" 403
	}
}`, web, ranges)
	}
	f := startDoor(t, "off", func(web string) string {
		return site(web, "127.0.0.1/32") + "\n" + site(other, "192.0.2.0/24")
	})
	one := fmt.Sprintf("/tcpops/connections/%d", f.tc.ID())
	status, b := newDoor(t, "http://"+f.web, nil).do("GET", one, "")
	var ci connectionInfo
	if status != http.StatusOK || json.Unmarshal(b, &ci) != nil || ci.ID != f.tc.ID() {
		t.Errorf("GET from 127.0.0.1 to the door for 127.0.0.1/32: %d %s", status, b)
	}
	for _, method := range []string{"GET", "DELETE"} {
		if status, b := newDoor(t, "http://"+other, nil).do(method, one, ""); status != http.StatusForbidden || string(b) != "not the registrar" {
			t.Errorf("%s from 127.0.0.1 to the door for 192.0.2.0/24: %d %q, want the site's 403", method, status, b)
		}
	}
	roundTrip(t, f.c, "not closed")
}

// TestAPIHandlerCaddyfileErrors: the directive's bad forms are errors that
// say what is wrong.
func TestAPIHandlerCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"tcpops_api read_only", `takes no arguments; got "read_only"`},
		{"tcpops_api {\n read_only\n read_only\n}", "read_only given twice"},
		{"tcpops_api {\n read_only yes\n}", `read_only takes no value; got "yes"`},
		{"tcpops_api {\n readonly\n}", `unknown subdirective "readonly"; allowed: read_only, user, origins`},
		{"tcpops_api {\n user\n}", "user needs a placeholder, such as {http.auth.user.id}"},
		{"tcpops_api {\n user alice\n}", `user "alice": want a placeholder such as {http.auth.user.id}`},
		{"tcpops_api {\n user {a} {b}\n}", `user takes one placeholder; got also "{b}"`},
		{"tcpops_api {\n user {a}\n user {b}\n}", "user given twice"},
		{"tcpops_api {\n origins\n}", "origins needs at least one origin"},
		{"tcpops_api {\n origins *\n}", `origins "*": want an origin as a browser writes it`},
		{"tcpops_api {\n origins null\n}", `origins "null": want an origin`},
		{"tcpops_api {\n origins http://ops.example/door\n}", `origins "http://ops.example/door": want an origin`},
		{"tcpops_api {\n origins ftp://ops.example\n}", `origins "ftp://ops.example"`},
		{"tcpops_api {\n origins https://u:p@ops.example\n}", "with no path, query or credentials"},
	} {
		var h APIHandler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error containing %q", tc.in, err, tc.want)
		}
	}
	var h APIHandler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops_api {\n read_only\n user {http.request.header.Remote-User}\n origins http://localhost:8080 https://ops.example\n}")); err != nil ||
		!h.ReadOnly || h.User != "{http.request.header.Remote-User}" || strings.Join(h.Origins, " ") != "http://localhost:8080 https://ops.example" {
		t.Fatalf("read_only, user, origins: %v, %+v", err, h)
	}
	// The JSON config is checked as the Caddyfile is.
	for _, tc := range []struct{ in, want string }{
		{`{"handler":"tcpops_api","origins":["http://ok.example","*"]}`, `tcpops_api: origins[1] "*": want an origin`},
		{`{"handler":"tcpops_api","user":"nobody"}`, `tcpops_api: user "nobody": want a placeholder`},
	} {
		cfg := fmt.Sprintf(`{"admin":{"disabled":true},"apps":{"http":{"servers":{"s":{"listen":[%q],"routes":[{"handle":[%s]}]}}}}}`, freePort(t), tc.in)
		if err := caddy.Load([]byte(cfg), true); err == nil || !strings.Contains(err.Error(), tc.want) {
			_ = caddy.Stop()
			t.Errorf("%s: %v, want an error containing %q", tc.in, err, tc.want)
		}
	}
}

// lifetimeOf returns the lifetime in force on c, as the admin API shows it.
func lifetimeOf(c *Conn) time.Duration {
	return connectionInfoOf(c).Options.Lifetime.Duration()
}

// TestAPIHandlerAuditNamesTheUser (issue 27): behind forward_auth, whose
// auth server names the user in Remote-User, the audit line names that
// user (tcpops_api's user placeholder; only basic_auth sets
// {http.auth.user.id}), and a Remote-User the client sends itself names
// nobody; under handle_path it logs the URI the client sent beside the
// one the handler saw; and a request the auth refuses (401), which never
// reaches the handler, is in the site's access log with its status, as
// docs/registrar.md says.
func TestAPIHandlerAuditNamesTheUser(t *testing.T) {
	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer alice-token" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Remote-User", "alice")
	}))
	t.Cleanup(auth.Close)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	f := startDoor(t, "off", func(web string) string {
		return fmt.Sprintf(`
http://%s {
	bind 127.0.0.1
	log {
		output file %s
		format json
	}
	handle_path /edge1/* {
		forward_auth %s {
			uri /auth
			copy_headers Remote-User
		}
		tcpops_api {
			user {http.request.header.Remote-User}
		}
	}
}`, web, accessLog, strings.TrimPrefix(auth.URL, "http://"))
	})
	one := fmt.Sprintf("/tcpops/connections/%d", f.tc.ID())
	send := func(method, path, token, remoteUser string) int {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+f.web+path, strings.NewReader(`{"lifetime":"2h"}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if remoteUser != "" {
			req.Header.Set("Remote-User", remoteUser)
		}
		d := newDoor(t, "", nil)
		resp, err := d.http.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}

	// Refused: no token, or a Remote-User of the client's own.
	if status := send("PATCH", "/edge1"+one, "", "mallory"); status != http.StatusUnauthorized {
		t.Fatalf("PATCH without a token: %d, want the auth server's 401", status)
	}
	if lt := lifetimeOf(f.tc); lt != time.Minute {
		t.Fatalf("lifetime %v after a refused PATCH, want the config's 1m", lt)
	}
	eventually(t, 5*time.Second, "the refused PATCH's 401 in the site's access log", func() bool {
		for _, l := range auditLines(t, accessLog) {
			if req, _ := l["request"].(map[string]any); req != nil && req["method"] == "PATCH" && l["status"] == float64(http.StatusUnauthorized) {
				return l["level"] == "info" && req["uri"] == "/edge1"+one
			}
		}
		return false
	})

	if status := send("PATCH", "/edge1"+one, "alice-token", "mallory"); status != http.StatusOK {
		t.Fatalf("PATCH with alice's token: %d", status)
	}
	if lt := lifetimeOf(f.tc); lt != 2*time.Hour {
		t.Fatalf("lifetime %v after alice's PATCH, want 2h", lt)
	}
	line := awaitAudit(t, f.logPath, "PATCH", http.StatusOK)
	if line["user"] != "alice" || line["uri"] != one || line["orig_uri"] != "/edge1"+one {
		t.Errorf("PATCH audit line: %v; want user alice (not the client's mallory), uri %s and orig_uri /edge1%s", line, one, one)
	}
}

// doorBrowserSite is a plain-HTTP site with a door for every Host, as in
// issue 27's report (":18086 { tcpops_api }", here bound to 127.0.0.1),
// and, on the same origin, /page from pageDir (rebindPage's) and /probe:
// what a page served from a name rebound to 127.0.0.1 reaches.
func doorBrowserSite(web, pageDir string) string {
	return fmt.Sprintf(`
http://:%s {
	bind 127.0.0.1
	handle /page {
		root * %s
		header Content-Type text/html
		file_server
	}
	handle /probe {
		respond "probe ok"
	}
	handle {
		tcpops_api
	}
}`, web[strings.LastIndex(web, ":")+1:], pageDir)
}

// rebindPage writes into a new directory the page a rebinding attacker
// serves: it fetches /probe, then the door with GET and with a PATCH of
// every connection from 127.0.0.1, without a Referer, and posts what it
// got (status and body of each, one line each) to report. It returns the
// directory.
func rebindPage(t *testing.T, report string) string {
	dir := t.TempDir()
	writeFile(t, dir, "page", `<!doctype html><html><body><script>
async function ask(method, path) {
	try {
		const init = {method: method, referrerPolicy: "no-referrer"};
		if (method === "PATCH") { init.headers = {"Content-Type": "application/json"}; init.body = '{"lifetime":"1ms"}'; }
		const r = await fetch(path, init);
		return method + " " + r.status + " " + (await r.text()).trim();
	} catch (e) { return method + " failed " + e; }
}
(async () => {
	const got = [await ask("GET", "/probe"), await ask("GET", "/tcpops/connections"), await ask("PATCH", "/tcpops/connections?remote=127.0.0.1")];
	navigator.sendBeacon("`+report+`", got.join("\n"));
})();
</script></body></html>
`)
	return dir
}

// TestAPIHandlerRefusesBrowser (issue 27): a request a browser sent (an
// Origin, Referer or Sec-Fetch-* header) is refused with 403 whatever its
// method, unless its origin is listed; over plain HTTP so is a Host that
// is a name no origin lists (DNS rebinding: a page's name pointed at
// 127.0.0.1, whose same-origin GET carries none of those headers,
// TestAPIHandlerRefusesChromium). The registrar's requests, with an IP
// address or localhost for Host, are served, and so are a listed origin's.
func TestAPIHandlerRefusesBrowser(t *testing.T) {
	var listed string
	f := startDoor(t, "off", func(web string) string {
		listed = freePort(t)
		_, port, _ := net.SplitHostPort(listed)
		return doorBrowserSite(web, t.TempDir()) + fmt.Sprintf(`
http://:%s {
	bind 127.0.0.1
	tcpops_api {
		origins http://ops.example:%s https://ops.example
	}
}`, port, port)
	})
	_, webPort, _ := net.SplitHostPort(f.web)
	_, listedPort, _ := net.SplitHostPort(listed)
	one := fmt.Sprintf("/tcpops/connections/%d", f.tc.ID())
	d := newDoor(t, "", nil)
	ask := func(addr, method, host string, hdr ...string) (int, string) {
		t.Helper()
		body := ""
		if method == "PATCH" {
			body = `{"lifetime":"1ms"}`
		}
		req, err := http.NewRequest(method, "http://"+addr+one, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		req.Header.Set("Content-Type", "application/json")
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := d.http.Do(req)
		if err != nil {
			t.Fatalf("%s %s Host %s: %v", method, one, host, err)
		}
		b, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return resp.StatusCode, apiErrorOf(t, b)
		}
		return resp.StatusCode, string(b)
	}
	evil := "evil.example:" + webPort
	for _, tc := range []struct {
		addr, method, host string
		hdr                []string
		status             int
		want               string
	}{
		// The registrar: no browser header, an IP address or localhost.
		{f.web, "GET", f.web, nil, 200, `"id":`},
		{f.web, "GET", "localhost:" + webPort, nil, 200, `"id":`},
		{f.web, "GET", "[::1]:" + webPort, nil, 200, `"id":`},
		// A rebound name, with no browser header at all (a same-origin
		// GET over http): only Host tells.
		{f.web, "GET", evil, nil, 403, `tcpops: Host "` + evil + `" refused: over plain HTTP`},
		{f.web, "DELETE", evil, nil, 403, "DNS rebinding"},
		// What browsers send.
		{f.web, "PATCH", evil, []string{"Origin", "http://" + evil}, 403, `tcpops: a request from a web browser (origin "http://` + evil + `") is refused`},
		{f.web, "DELETE", f.web, []string{"Origin", "http://" + evil}, 403, "a request from a web browser"},
		{f.web, "GET", f.web, []string{"Origin", "null"}, 403, `origin "null"`},
		{f.web, "GET", f.web, []string{"Sec-Fetch-Site", "same-origin", "Sec-Fetch-Mode", "cors"}, 403, `origin "http://` + f.web + `"`},
		{f.web, "GET", f.web, []string{"Referer", "http://" + evil + "/page"}, 403, `origin "http://` + evil + `"`},
		// A listed origin, and its host.
		{listed, "GET", "ops.example:" + listedPort, nil, 200, `"id":`},
		{listed, "GET", "OPS.example:" + listedPort, []string{"Origin", "http://ops.example:" + listedPort}, 200, `"id":`},
		{listed, "GET", "ops.example:" + listedPort, []string{"Origin", "https://ops.example:" + listedPort}, 403, "a request from a web browser"},
		{listed, "GET", "evil.example:" + listedPort, nil, 403, "DNS rebinding"},
		{listed, "PATCH", "ops.example:" + listedPort, []string{"Origin", "http://evil.example:" + listedPort}, 403, "a request from a web browser"},
	} {
		status, b := ask(tc.addr, tc.method, tc.host, tc.hdr...)
		if status != tc.status || !strings.Contains(b, tc.want) {
			t.Errorf("%s Host %s %q: %d %s; want %d and %q", tc.method, tc.host, tc.hdr, status, b, tc.status, tc.want)
		}
	}
	awaitAudit(t, f.logPath, "PATCH", http.StatusForbidden)
	if lt := lifetimeOf(f.tc); lt != time.Minute {
		t.Fatalf("lifetime %v after refused PATCHes, want the config's 1m", lt)
	}
	roundTrip(t, f.c, "not closed by a refused DELETE")
	// The listed origin's page may change it: the check lets it through.
	if status, b := ask(listed, "PATCH", "ops.example:"+listedPort, "Origin", "http://ops.example:"+listedPort, "Sec-Fetch-Site", "same-origin"); status != 200 || lifetimeOf(f.tc) != time.Millisecond {
		t.Fatalf("PATCH from the listed origin: %d %s, lifetime %v; want 200 and 1ms", status, b, lifetimeOf(f.tc))
	}
}

// TestAPIHandlerRefusesChromium (issue 27): a real browser, headless
// Chromium, loads a page from http://evil.example:<the door's port>/,
// that name resolving to 127.0.0.1 (DNS rebinding's end state), and its
// fetch() GET and PATCH to the door on the same origin are refused with
// 403, while a fetch of another path of the site is answered; the
// connection is neither changed nor closed. CI installs chromium
// (.ci/run), and fails on this test's skip.
func TestAPIHandlerRefusesChromium(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("needs chromium (apt-get install -y chromium): ", err)
	}
	reports := make(chan string, 1)
	report := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		select {
		case reports <- string(b):
		default:
		}
	}))
	t.Cleanup(report.Close)
	f := startDoor(t, "off", func(web string) string { return doorBrowserSite(web, rebindPage(t, report.URL+"/report")) })
	_, port, _ := net.SplitHostPort(f.web)

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
		"--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir="+t.TempDir(), "--host-resolver-rules=MAP evil.example 127.0.0.1",
		"http://evil.example:"+port+"/page")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })

	var got string
	select {
	case got = <-reports:
	case <-time.After(2 * time.Minute):
		t.Fatalf("no report from the page within 2m; chromium said:\n%s", out.String())
	}
	lines := strings.Split(got, "\n")
	if len(lines) != 3 || lines[0] != "GET 200 probe ok" {
		t.Fatalf("the page did not reach the site (setup): %q", got)
	}
	if !strings.HasPrefix(lines[1], "GET 403 ") || !strings.Contains(lines[1], `tcpops: Host \"evil.example:`+port+`\" refused`) {
		t.Errorf("the page's GET: %q; want the door's 403 for the rebound Host", lines[1])
	}
	if !strings.HasPrefix(lines[2], "PATCH 403 ") || !strings.Contains(lines[2], "tcpops: a request from a web browser") {
		t.Errorf("the page's PATCH: %q; want the door's 403 for a browser", lines[2])
	}
	if lt := lifetimeOf(f.tc); lt != time.Minute {
		t.Fatalf("lifetime %v after the page's PATCH, want the config's 1m", lt)
	}
	roundTrip(t, f.c, "not changed by the page")
}
