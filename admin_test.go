package tcpops

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

// This file tests the conid and the admin API (admin.go) against a real
// in-process Caddy with its admin endpoint on a loopback port.

func init() {
	caddy.RegisterModule(&conidWriter{})
}

// conidWriter is a test-only layer4 handler that writes the placeholder
// {l4.tcpops.conid}, as a later handler sees it, to the client as
// "conid=<id>\n", then calls next.
type conidWriter struct{}

func (*conidWriter) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.tcpops_test_conid",
		New: func() caddy.Module { return new(conidWriter) },
	}
}

func (*conidWriter) Handle(cx *layer4.Connection, next layer4.Handler) error {
	line := cx.Replacer().ReplaceAll("conid={"+ConnIDReplKey+"}\n", "<unset>")
	if _, err := io.WriteString(cx, line); err != nil {
		return err
	}
	return next.Handle(cx)
}

// adminL4Config is l4Config with the admin endpoint on adminAddr, and each
// element of routes a route's handler list (JSON objects, comma separated).
func adminL4Config(adminAddr, listen string, routes ...string) string {
	rs := make([]string, len(routes))
	for i, r := range routes {
		rs[i] = `{"handle":[` + r + `]}`
	}
	return fmt.Sprintf(`{"admin":{"listen":%q,"config":{"persist":false}},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"srv0":{"listen":[%q],"routes":[%s]}}}}}`,
		adminAddr, listen, joinJSON(rs))
}

// loadCaddyAdmin loads an adminL4Config and returns a client for its admin
// endpoint. Caddy's Stop leaves the admin endpoint running, so after it
// the cleanup loads a config with admin disabled. Cleanups run last added
// first: this one is added before loadCaddy's Stop so that it runs after
// it (run first, the Load would be a reload of the test's config).
func loadCaddyAdmin(t *testing.T, listen string, routes ...string) *adminClient {
	t.Helper()
	adminAddr := freePort(t)
	t.Cleanup(func() { _ = caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	loadCaddy(t, adminL4Config(adminAddr, listen, routes...))
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &adminClient{t: t, base: "http://" + adminAddr, http: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

type adminClient struct {
	t    testing.TB
	base string
	http *http.Client
}

// do sends a request; a non-empty body is sent as JSON.
func (a *adminClient) do(method, path, body string) (int, []byte) {
	a.t.Helper()
	return a.doType(method, path, "application/json", body)
}

func (a *adminClient) doType(method, path, contentType, body string) (int, []byte) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.base+path, strings.NewReader(body))
	if err != nil {
		a.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := a.http.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp.StatusCode, b
}

// must sends a request, requires status 200 and decodes the answer into v.
func (a *adminClient) must(method, path, body string, v any) {
	a.t.Helper()
	status, b := a.do(method, path, body)
	if status != http.StatusOK {
		a.t.Fatalf("%s %s %s: status %d: %s", method, path, body, status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		a.t.Fatalf("%s %s: decoding %s: %v", method, path, b, err)
	}
}

func (a *adminClient) list(query string) connectionList {
	a.t.Helper()
	var l connectionList
	a.must(http.MethodGet, "/tcpops/connections"+query, "", &l)
	return l
}

func (a *adminClient) get(id uint64) connectionInfo {
	a.t.Helper()
	var ci connectionInfo
	a.must(http.MethodGet, fmt.Sprintf("/tcpops/connections/%d", id), "", &ci)
	return ci
}

func (a *adminClient) patch(id uint64, body string) connectionInfo {
	a.t.Helper()
	var ci connectionInfo
	a.must(http.MethodPatch, fmt.Sprintf("/tcpops/connections/%d", id), body, &ci)
	return ci
}

func ids(l connectionList) []uint64 {
	var out []uint64
	for _, c := range l.Connections {
		out = append(out, c.ID)
	}
	return out
}

// readConnID reads the "conid=N" line conidWriter sends from r, which reads
// c, within 5s: a handler that never sends it fails the test instead of
// hanging it.
func readConnID(t *testing.T, c net.Conn, r *bufio.Reader) uint64 {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading conid line: %v (got %q)", err, line)
	}
	s, ok := strings.CutPrefix(strings.TrimSpace(line), "conid=")
	id, err := strconv.ParseUint(s, 10, 64)
	if !ok || err != nil {
		t.Fatalf("conid line %q: want conid=<integer>", line)
	}
	return id
}

func TestConnIDPlaceholder(t *testing.T) {
	up := startUpstream(t, nil)
	for _, tc := range []struct {
		name   string
		routes []string
	}{
		// A later handler in the same route.
		{"same route", []string{`{"handler":"tcpops","lifetime":"1m"},{"handler":"tcpops_test_conid"},` + proxyTo(up.addr())}},
		// A later route: caddy-l4 runs the routes one after the other on
		// the same connection and replacer.
		{"later route", []string{`{"handler":"tcpops","lifetime":"1m"}`, `{"handler":"tcpops_test_conid"},` + proxyTo(up.addr())}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := freePort(t)
			admin := loadCaddyAdmin(t, addr, tc.routes...)

			var got []uint64
			for range 3 {
				c := dial(t, addr)
				id := readConnID(t, c, bufio.NewReader(c))
				tracked := waitTracked(t, c)
				if tracked.ID() != id {
					t.Fatalf("placeholder says conid %d, registry has %d", id, tracked.ID())
				}
				l := admin.list("?remote=" + c.LocalAddr().String())
				if l.Total != 1 || l.Connections[0].ID != id {
					t.Fatalf("admin list for %s: %+v, want conid %d", c.LocalAddr(), ids(l), id)
				}
				got = append(got, id)
			}
			for i := 1; i < len(got); i++ {
				if got[i] <= got[i-1] {
					t.Fatalf("conids not increasing: %v", got)
				}
			}
		})
	}
	waitRegistryEmpty(t)
}

// A connection leaves the registry the moment it ends, by every path.
func TestConnIDLeavesRegistry(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"200ms"},`+proxyTo(up.addr()))

	// Client closes.
	c := dial(t, addr)
	roundTrip(t, c, "x")
	id := waitTracked(t, c).ID()
	_ = c.Close()
	eventually(t, 3*time.Second, "closed connection gone", func() bool { return connections.get(id) == nil })
	if status, b := admin.do(http.MethodGet, fmt.Sprintf("/tcpops/connections/%d", id), ""); status != http.StatusNotFound {
		t.Fatalf("GET closed connection: %d %s", status, b)
	}

	// Lifetime expires: gone by the time the client sees the close.
	c = dial(t, addr)
	roundTrip(t, c, "x")
	id = waitTracked(t, c).ID()
	waitClosed(t, c, 3*time.Second)
	if connections.get(id) != nil {
		t.Fatal("connection closed by its lifetime still registered")
	}
	waitRegistryEmpty(t)
	if l := admin.list(""); l.Total != 0 || len(l.Connections) != 0 {
		t.Fatalf("list after all clients are gone: %+v", l)
	}
}

func TestAdminListMatchesSocket(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","keepalive":{"idle":"7s","count":4,"interval":"3s"},`+
		`"user_timeout":"5s","lifetime":"10s","max_lifetime":"1m"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	eventually(t, 2*time.Second, "bytes counted", func() bool { return tc.bytesOut.Load() == 5 })

	l := admin.list("")
	if l.Total != 1 || len(l.Connections) != 1 {
		t.Fatalf("list: %+v", l)
	}
	ci := l.Connections[0]
	so := readSockopts(t, tc.tcp)
	if ci.ID != tc.ID() || ci.Remote != c.LocalAddr().String() || ci.Local != addr {
		t.Fatalf("id/remote/local: %d %s %s, want %d %s %s", ci.ID, ci.Remote, ci.Local, tc.ID(), c.LocalAddr(), addr)
	}
	st := ci.Socket
	if st.Keepalive == nil || !*st.Keepalive || so.keepalive != 1 ||
		*st.KeepaliveIdle != so.idle || *st.KeepaliveCount != so.count || *st.KeepaliveInterval != so.interval ||
		*st.UserTimeoutMillis != so.userTimeout {
		t.Fatalf("socket in the list %s, getsockopt %+v", mustJSON(st), so)
	}
	if so.idle != 7 || so.count != 4 || so.interval != 3 || so.userTimeout != 5000 {
		t.Fatalf("getsockopt: %+v", so)
	}
	if st.TCPInfo == nil || st.TCPInfo.State != "ESTAB" {
		t.Fatalf("tcp_info: %s", mustJSON(st.TCPInfo))
	}
	if ci.Status != "ok" || ci.BytesIn != 5 || ci.BytesOut != 5 {
		t.Fatalf("status %q bytes in %d out %d, want ok 5 5", ci.Status, ci.BytesIn, ci.BytesOut)
	}
	if ci.LifetimeMs == nil || *ci.LifetimeMs != 10000 || *ci.LifetimeLeftMs <= 0 || *ci.LifetimeLeftMs > 10000 ||
		ci.MaxLifetimeMs == nil || *ci.MaxLifetimeMs != 60000 || *ci.MaxLifetimeLeftMs <= 0 || *ci.MaxLifetimeLeftMs > 60000 {
		t.Fatalf("lifetimes: %s", mustJSON(ci))
	}
	if ci.AgeMs < 0 || ci.IdleMs < 0 || ci.IdleMs > ci.AgeMs || ci.Started.IsZero() {
		t.Fatalf("age %d idle %d started %v", ci.AgeMs, ci.IdleMs, ci.Started)
	}

	// GET by id (tcp_conid_state) says the same.
	if one := admin.get(tc.ID()); one.ID != tc.ID() || one.Remote != ci.Remote || *one.Socket.KeepaliveIdle != 7 {
		t.Fatalf("GET by id: %s", mustJSON(one))
	}

	// Filters (tcp_get_conid, tcp_con_alive).
	host, port, _ := net.SplitHostPort(c.LocalAddr().String())
	for q, want := range map[string]int{
		"?remote=" + c.LocalAddr().String():     1,
		"?remote=" + host:                       1,
		"?remote=" + host + ":1":                0,
		"?remote=10.9.8.7":                      0,
		"?remote=[::ffff:" + host + "]:" + port: 1,
		"?local=" + addr:                        1,
		"?local=127.0.0.1:1":                    0,
		"?remote=" + host + "&local=" + addr:    1,
	} {
		l := admin.list(q)
		if l.Total != want || len(l.Connections) != want || (want == 1 && l.Connections[0].ID != tc.ID()) {
			t.Errorf("list%s: %v (total %d), want %d", q, ids(l), l.Total, want)
		}
	}
}

func TestAdminListLimit(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops"},`+proxyTo(up.addr()))

	var want []uint64
	for range 5 {
		c := dial(t, addr)
		roundTrip(t, c, "x")
		want = append(want, waitTracked(t, c).ID())
	}
	all := admin.list("")
	if fmt.Sprint(ids(all)) != fmt.Sprint(want) || all.NextAfter != 0 {
		t.Fatalf("list: %v next %d, want %v sorted by id", ids(all), all.NextAfter, want)
	}
	page := admin.list("?limit=2")
	if page.Total != 5 || fmt.Sprint(ids(page)) != fmt.Sprint(want[:2]) || page.NextAfter != want[1] {
		t.Fatalf("limit=2: %v total %d next %d", ids(page), page.Total, page.NextAfter)
	}
	page = admin.list(fmt.Sprintf("?limit=2&after=%d", page.NextAfter))
	if page.Total != 5 || fmt.Sprint(ids(page)) != fmt.Sprint(want[2:4]) || page.NextAfter != want[3] {
		t.Fatalf("second page: %v total %d next %d", ids(page), page.Total, page.NextAfter)
	}
	page = admin.list(fmt.Sprintf("?limit=2&after=%d", page.NextAfter))
	if fmt.Sprint(ids(page)) != fmt.Sprint(want[4:]) || page.NextAfter != 0 {
		t.Fatalf("last page: %v next %d", ids(page), page.NextAfter)
	}
}

// PATCH lifetime: Kamailio's tcp_set_connection_lifetime(conid, lifetime).
func TestAdminPatchLifetime(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"30s"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	other := dial(t, addr) // a second connection the PATCH must not touch
	roundTrip(t, other, "x")
	// Caddy's last write to c comes after this instant, so the patched
	// inactivity lifetime cannot expire less than 400ms after it.
	beforeIO := time.Now()
	roundTrip(t, c, "hello")
	id := waitTracked(t, c).ID()

	ci := admin.patch(id, `{"lifetime":"400ms"}`)
	if ci.LifetimeMs == nil || *ci.LifetimeMs != 400 || *ci.LifetimeLeftMs > 400 || ci.Options.Lifetime.Duration() != 400*time.Millisecond {
		t.Fatalf("PATCH answer: %s", mustJSON(ci))
	}
	waitClosed(t, c, 5*time.Second)
	took := time.Since(beforeIO)
	if took < 400*time.Millisecond || took > 2*time.Second {
		t.Fatalf("closed %v after the last traffic, want about 400ms", took)
	}
	select {
	case <-up.ended:
	case <-time.After(3 * time.Second):
		t.Fatal("upstream connection not closed")
	}
	if connections.get(id) != nil {
		t.Fatal("connection closed by the patched lifetime still registered")
	}
	// The other connection keeps its configured 30s.
	assertOpen(t, other, 200*time.Millisecond)
	oc := admin.get(waitTracked(t, other).ID())
	if *oc.LifetimeMs != 30000 {
		t.Fatalf("other connection's lifetime changed: %s", mustJSON(oc))
	}
}

// Kamailio's tcp_set_connection_lifetime sets timeout = now + lifetime: a
// lifetime patched onto a connection that has been idle for longer than the
// new value still gets the whole of it from the PATCH, and the answer says
// so. Without that, the PATCH would answer 200 and the connection would
// close a millisecond later.
func TestAdminPatchLifetimeRunsFromNow(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"30s"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	// Let the connection be idle for longer than the lifetime to come.
	eventually(t, 5*time.Second, "connection idle for 700ms", func() bool {
		return admin.get(tc.ID()).IdleMs >= 700
	})
	patched := time.Now()
	ci := admin.patch(tc.ID(), `{"lifetime":"500ms"}`)
	if ci.Status != "ok" || ci.LifetimeLeftMs == nil || *ci.LifetimeLeftMs < 450 || *ci.LifetimeLeftMs > 500 {
		t.Fatalf("PATCH answer: want status ok and lifetime_left_ms about 500: %s", mustJSON(ci))
	}
	assertOpen(t, c, 400*time.Millisecond-time.Since(patched))
	waitClosed(t, c, 3*time.Second)
	if took := time.Since(patched); took < 500*time.Millisecond || took > 1500*time.Millisecond {
		t.Fatalf("closed %v after the PATCH, want about 500ms", took)
	}
	if reason, cause := tc.endedWith(); reason != ReasonTimeout || cause != CauseLifetime {
		t.Fatalf("ended %s/%s, want timeout/lifetime", reason, cause)
	}
}

// A string that is a bare integer is seconds in every duration field of the
// PATCH body, keepalive included, as in the Caddyfile.
func TestAdminPatchBareIntegerStringsAreSeconds(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops"},`+proxyTo(up.addr()))
	c := dial(t, addr)
	roundTrip(t, c, "x")
	tc := waitTracked(t, c)
	ci := admin.patch(tc.ID(), `{"keepalive":{"idle":"30","count":4,"interval":"7"},"user_timeout":"40","lifetime":"60","max_lifetime":"3600"}`)
	so := readSockopts(t, tc.tcp)
	if so.idle != 30 || so.interval != 7 || so.count != 4 || so.userTimeout != 40000 {
		t.Fatalf("getsockopt after PATCH: %+v", so)
	}
	if *ci.LifetimeMs != 60000 || *ci.MaxLifetimeMs != 3600000 {
		t.Fatalf("PATCH answer: %s", mustJSON(ci))
	}
}

// PATCH keepalive and user_timeout: tcp_keepalive_enable/disable(conid, ...).
func TestAdminPatchKeepalive(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","keepalive":{"idle":"7s","count":4,"interval":"3s"},"user_timeout":"5s"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	roundTrip(t, c, "x")
	tc := waitTracked(t, c)

	ci := admin.patch(tc.ID(), `{"keepalive":{"idle":"42s","count":5}}`)
	so := readSockopts(t, tc.tcp)
	if so.keepalive != 1 || so.idle != 42 || so.count != 5 || so.interval != 3 || so.userTimeout != 5000 {
		t.Fatalf("getsockopt after PATCH: %+v", so)
	}
	if *ci.Socket.KeepaliveIdle != 42 || *ci.Socket.KeepaliveCount != 5 || *ci.Socket.KeepaliveInterval != 3 {
		t.Fatalf("PATCH answer socket: %s", mustJSON(ci.Socket))
	}
	// Merged as a second tcpops would: interval kept from the config.
	if ka := ci.Options.Keepalive; ka == nil || time.Duration(ka.Idle) != 42*time.Second || ka.Count != 5 || time.Duration(ka.Interval) != 3*time.Second {
		t.Fatalf("PATCH answer options: %s", mustJSON(ci.Options))
	}

	ci = admin.patch(tc.ID(), `{"keepalive":{"off":true},"user_timeout":"off"}`)
	so = readSockopts(t, tc.tcp)
	if so.keepalive != 0 || so.userTimeout != 0 || *ci.Socket.Keepalive || *ci.Socket.UserTimeoutMillis != 0 {
		t.Fatalf("after keepalive off: getsockopt %+v, answer %s", so, mustJSON(ci.Socket))
	}
	ci = admin.patch(tc.ID(), `{"keepalive":{"interval":"9s"},"user_timeout":1500000000}`)
	so = readSockopts(t, tc.tcp)
	if so.keepalive != 1 || so.interval != 9 || so.userTimeout != 1500 {
		t.Fatalf("after keepalive on again: %+v", so)
	}
	roundTrip(t, c, "still served")
}

// DELETE: tcp_close_connection(conid); HAProxy's "shutdown session".
func TestAdminDelete(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	other := dial(t, addr)
	roundTrip(t, c, "x")
	roundTrip(t, other, "y")
	tc := waitTracked(t, c)

	var closed closedInfo
	admin.must(http.MethodDelete, fmt.Sprintf("/tcpops/connections/%d", tc.ID()), "", &closed)
	if closed.ID != tc.ID() || closed.Reason != ReasonClosed || closed.Cause != CauseAdmin {
		t.Fatalf("DELETE answer: %+v", closed)
	}
	if r, cause := tc.endedWith(); r != ReasonClosed || cause != CauseAdmin {
		t.Fatalf("end recorded as %s/%s, want closed/admin", r, cause)
	}
	// The client sees EOF (not a reset, not silence).
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read after DELETE: %d, %v; want EOF", n, err)
	}
	select {
	case <-up.ended:
	case <-time.After(3 * time.Second):
		t.Fatal("upstream connection not closed after DELETE")
	}
	if status, b := admin.do(http.MethodGet, fmt.Sprintf("/tcpops/connections/%d", tc.ID()), ""); status != http.StatusNotFound {
		t.Fatalf("GET after DELETE: %d %s", status, b)
	}
	if status, b := admin.do(http.MethodDelete, fmt.Sprintf("/tcpops/connections/%d", tc.ID()), ""); status != http.StatusNotFound {
		t.Fatalf("second DELETE: %d %s", status, b)
	}
	roundTrip(t, other, "other untouched")
	_ = other.Close()
	waitRegistryEmpty(t)
	if l := admin.list(""); l.Total != 0 {
		t.Fatalf("list after clients are gone: %v", ids(l))
	}
}

func TestAdminBadRequests(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","keepalive":{"idle":"7s","count":4,"interval":"3s"},"user_timeout":"5s","lifetime":"30s"},`+proxyTo(up.addr()))

	c := dial(t, addr)
	roundTrip(t, c, "x")
	tc := waitTracked(t, c)
	before := readSockopts(t, tc.tcp)
	one := fmt.Sprintf("/tcpops/connections/%d", tc.ID())
	unknown := fmt.Sprintf("/tcpops/connections/%d", tc.ID()+1000)

	for _, bad := range []struct {
		method, path, ctype, body string
		status                    int
		msg                       string
	}{
		{"GET", "/tcpops/connections/abc", "", "", 400, `invalid connection id "abc"`},
		{"GET", "/tcpops/connections/-1", "", "", 400, `invalid connection id "-1"`},
		{"GET", "/tcpops/connections/99999999999999999999999", "", "", 400, "invalid connection id"},
		{"GET", one + "/extra", "", "", 400, "invalid connection id"},
		{"GET", unknown, "", "", 404, "not found"},
		{"PATCH", unknown, "application/json", `{"lifetime":"1s"}`, 404, "not found"},
		{"DELETE", unknown, "", "", 404, "not found"},
		{"PUT", one, "application/json", `{}`, 405, "method PUT not allowed"},
		{"POST", "/tcpops/connections", "application/json", `{}`, 405, "method POST not allowed"},
		{"DELETE", "/tcpops/connections", "", "", 400, "tcpops: DELETE /tcpops/connections acts on every connection that matches remote= and/or local=, and neither is given; to act on one connection use /tcpops/connections/{id}"},
		{"PATCH", "/tcpops/connections", "application/json", `{"lifetime":"1s"}`, 400, "tcpops: PATCH /tcpops/connections acts on every connection that matches remote= and/or local=, and neither is given"},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1&limit=5", "application/json", `{"lifetime":"1s"}`, 400, `unknown query parameter "limit" for PATCH; allowed: remote, local`},
		{"DELETE", "/tcpops/connections?local=127.0.0.1&after=5", "", "", 400, `unknown query parameter "after" for DELETE; allowed: remote, local`},
		{"PATCH", "/tcpops/connections?remote=192.0.2.99", "application/json", `{"lifetime":"1s"}`, 404, "tcpops: no connection matches remote=192.0.2.99"},
		{"DELETE", "/tcpops/connections?remote=192.0.2.99:5060&local=127.0.0.1", "", "", 404, "tcpops: no connection matches remote=192.0.2.99:5060 local=127.0.0.1"},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1", "application/json", `{"lifetime":30}`, 400, "tcpops: lifetime 30: a JSON number is nanoseconds"},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1", "text/plain", `{"lifetime":"1s"}`, 415, "application/json"},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1", "application/json", `{"max_lifetime":"1ms"}`, 409, "old, so it would close at once; nothing was changed (to close it now, DELETE it); of the 1 connections that match remote=127.0.0.1, none was changed"},
		{"PATCH", one, "application/json", `{"lifetime":`, 400, "decoding request body"},
		{"PATCH", one, "application/json", `not json`, 400, "decoding request body"},
		{"PATCH", one, "application/json", `[]`, 400, "decoding request body"},
		{"PATCH", one, "application/json", `{"lifetime":"1s"} {"lifetime":"2s"}`, 400, "unexpected data after the JSON object"},
		{"PATCH", one, "application/json", `{"lifetime":"1s"}}`, 400, "unexpected data after the JSON object"},
		{"PATCH", one, "application/json", `{"lifetime":"1s"}]`, 400, "unexpected data after the JSON object"},
		{"PATCH", one, "application/json", `{"lifetime":"1s","bogus":1}`, 400, `unknown field "bogus"`},
		{"PATCH", one, "application/json", `{"keepalive":{"idle":"1s","speed":3}}`, 400, `unknown field "speed"`},
		{"PATCH", one, "application/json", `{"keepalive":{"count":500}}`, 400, "keepalive count 500: must be between 1 and 127"},
		{"PATCH", one, "application/json", `{"keepalive":{"idle":"40000s"}}`, 400, "keepalive idle 11h6m40s: must be between 1s and 32767s"},
		{"PATCH", one, "application/json", `{"keepalive":{"off":true,"count":3}}`, 400, "keepalive off cannot be combined"},
		{"PATCH", one, "application/json", `{"lifetime":"-5s"}`, 400, "lifetime -5s: must be between 1ms and 3650d (87600h), or off"},
		// JSON numbers are nanoseconds: a number of seconds without a unit
		// is refused with a hint instead of closing the connection at once.
		{"PATCH", one, "application/json", `{"lifetime":30}`, 400, `tcpops: lifetime 30: a JSON number is nanoseconds, so this is 30ns, below the 1ms minimum; for 30 seconds write "30s"`},
		{"PATCH", one, "application/json", `{"max_lifetime":600}`, 400, `tcpops: max_lifetime 600: a JSON number is nanoseconds, so this is 600ns, below the 1ms minimum; for 600 seconds write "600s"`},
		{"PATCH", one, "application/json", `{"user_timeout":40}`, 400, `tcpops: user_timeout 40: a JSON number is nanoseconds, so this is 40ns, below the 1ms minimum; for 40 seconds write "40s"`},
		{"PATCH", one, "application/json", `{"keepalive":{"idle":30}}`, 400, `keepalive idle 30: a JSON number is nanoseconds, so this is 30ns, below the 1ms minimum; for 30 seconds write "30s"`},
		// A max_lifetime the connection has outlived would close it within
		// this request: refused, nothing applied.
		{"PATCH", one, "application/json", `{"keepalive":{"idle":"9s"},"max_lifetime":"1ms"}`, 409, "max_lifetime 1ms: connection"},
		{"PATCH", one, "application/json", `{"lifetime":"banana"}`, 400, `duration "banana"`},
		{"PATCH", one, "application/json", `{"user_timeout":"1500us"}`, 400, "user_timeout"},
		// A valid change with an invalid one: nothing at all is applied.
		{"PATCH", one, "application/json", `{"keepalive":{"idle":"9s"},"max_lifetime":"-1s"}`, 400, "max_lifetime -1s"},
		{"PATCH", one, "application/json", ``, 400, "empty request body"},
		{"PATCH", one, "text/plain", `{"lifetime":"1s"}`, 415, "application/json"},
		{"PATCH", one, "application/json", `{"lifetime":"` + strings.Repeat("9", maxPatchBody) + `"}`, 413, "request body larger than 65536 bytes"},
		{"GET", "/tcpops/connections?limit=0", "", "", 400, "limit \"0\": must be an integer between 1 and 10000"},
		{"GET", "/tcpops/connections?limit=abc", "", "", 400, "limit \"abc\""},
		{"GET", "/tcpops/connections?limit=10001", "", "", 400, "between 1 and 10000"},
		{"GET", "/tcpops/connections?after=x", "", "", 400, "after \"x\""},
		{"GET", "/tcpops/connections?remote=nohost", "", "", 400, `remote "nohost": want an IP address or IP:port`},
		{"GET", "/tcpops/connections?local=1.2.3.4:99999", "", "", 400, `local "1.2.3.4:99999"`},
		{"GET", "/tcpops/connections?sort=age", "", "", 400, `unknown query parameter "sort"`},
		// Issue 27: a filter never widens. Port 0 would match every port of
		// the IP, this connection's among them; the unspecified address
		// reads as "any".
		{"DELETE", "/tcpops/connections?remote=127.0.0.1:0", "", "", 400, `remote "127.0.0.1:0": port 0 is no connection's port, and would match every port of 127.0.0.1`},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1:00000", "application/json", `{"lifetime":"1ms"}`, 400, `remote "127.0.0.1:00000": port 0`},
		{"DELETE", "/tcpops/connections?local=" + addr[:strings.LastIndex(addr, ":")] + ":0", "", "", 400, `local "127.0.0.1:0": port 0`},
		{"DELETE", "/tcpops/connections?remote=[::ffff:127.0.0.1]:0", "", "", 400, "port 0"},
		{"GET", "/tcpops/connections?remote=0.0.0.0", "", "", 400, `remote "0.0.0.0": the unspecified address 0.0.0.0`},
		{"DELETE", "/tcpops/connections?remote=[::]:5060", "", "", 400, "the unspecified address ::"},
		{"DELETE", "/tcpops/connections?remote=[127.0.0.1", "", "", 400, `remote "[127.0.0.1": want an IP address`},
		// Limits and strictness (docs/admin.md): a query that does not
		// parse, a repeated, empty or misspelled parameter would
		// otherwise leave the other filters to act on more than was named.
		{"DELETE", "/tcpops/connections?remote=127.0.0.1&local=127.0.0.2%zz", "", "", 400, `invalid URL escape "%zz"`},
		{"DELETE", "/tcpops/connections?remote=127.0.0.1;", "", "", 400, "invalid semicolon separator in query"},
		{"DELETE", "/tcpops/connections?remote=127.0.0.1&remote=127.0.0.2", "", "", 400, `query parameter "remote" is given 2 times`},
		{"DELETE", "/tcpops/connections?remote=127.0.0.1&loacl=127.0.0.2", "", "", 400, `unknown query parameter "loacl" for DELETE`},
		{"DELETE", "/tcpops/connections?remote=127.0.0.1&local=", "", "", 400, `query parameter "local" is empty`},
		{"PATCH", "/tcpops/connections?remote=127.0.0.1&Local=127.0.0.2", "application/json", `{"lifetime":"1s"}`, 400, `unknown query parameter "Local"`},
		{"GET", "/tcpops/connections?remote=127.0.0.1&limit=5&limit=6", "", "", 400, `query parameter "limit" is given 2 times`},
		{"GET", "/tcpops/connections?limit=%2B5", "", "", 400, `limit "+5"`},
		{"GET", "/tcpops/connections?after=18446744073709551616", "", "", 400, `after "18446744073709551616": must be a connection id`},
		{"PATCH", one, "application/json", `{}`, 400, "the body changes nothing"},
		{"PATCH", one, "application/json", `{"lifetime":"0s"}`, 400, `tcpops: lifetime "0s": zero is not a duration tcpops can enforce; to remove the lifetime write "off"`},
		{"PATCH", one, "application/json", `{"max_lifetime":0}`, 400, `max_lifetime 0: zero is not a duration`},
		{"PATCH", one, "application/json", `{"LIFETIME":"2h"}`, 400, `field "LIFETIME": field names are case-sensitive; write "lifetime"`},
		{"PATCH", one, "application/json", `{"keepalive":{"Count":3}}`, 400, `field "Count" in keepalive: field names are case-sensitive; write "count"`},
		{"PATCH", one, "application/json", `{"lifetime":"2h","lifetime":"3h"}`, 400, `field "lifetime" is given twice`},
		{"PATCH", one, "application/json", `{"lifetime":null}`, 400, "lifetime null: leave the field out"},
		{"PATCH", one, "application/json", `{"keepalive":{"count":3.0}}`, 400, "keepalive count 3.0: must be a whole number between 1 and 127"},
		{"PATCH", one, "application/json", `{"keepalive":{"count":0}}`, 400, "keepalive count 0: must be between 1 and 127"},
		{"PATCH", one, "application/json", `{"keepalive":{"count":-0}}`, 400, "keepalive count -0: must be between 1 and 127"},
		{"PATCH", one, "application/json", `{"lifetime":-0}`, 400, "lifetime -0: zero is not a duration"},
		{"PATCH", one, "application/json", `{"keepalive":{"idle":"0s"}}`, 400, `keepalive idle "0s": must be between 1s and 32767s`},
		{"PATCH", one, "application/json", `{"lifetime":1e9}`, 400, "lifetime 1e9: a JSON number is a whole number of nanoseconds"},
		{"PATCH", one, "application/json", `{"lifetime":9223372036854775807}`, 400, "lifetime 2562047h47m16.854775807s: must be between 1ms and 3650d (87600h), or off"},
		{"PATCH", one, "application/json", `{"lifetime":99999999999999999999}`, 400, "lifetime 99999999999999999999: out of range"},
		{"PATCH", one, "application/json", `{"lifetime":"106752d"}`, 400, `lifetime: duration "106752d": out of range`},
		{"PATCH", one, "application/json", `{"max_lifetime":"3651d"}`, 400, "max_lifetime 87624h0m0s: must be between 1ms and 3650d (87600h), or off"},
		{"PATCH", one, "application/json", `{"max_lifetime_grace":"9223372036"}`, 400, "max_lifetime_grace 2562047h47m16s: must be between 1ms and 3650d (87600h), or off"},
		{"PATCH", one, "application/json", `{"user_timeout":"2147484s"}`, 400, "user_timeout 596h31m24s: must be between 1ms and 596h31m23.647s"},
		{"PATCH", one, "application/json", `{"stats_period":"500ms"}`, 400, "stats_period 500ms: must be between 1s and 3650d (87600h), or off"},
		{"PATCH", one, "application/json", `{"stats_period":"2500ms"}`, 400, "stats_period 2.5s: must be whole seconds"},
		{"PATCH", one, "application/json", `{"stats_period":"0s"}`, 400, `stats_period "0s": zero is not a duration`},
		{"PATCH", one, "application/json", `{"stats_period":10}`, 400, `stats_period 10: a JSON number is nanoseconds`},
		{"PATCH", one, "text/json", `{"lifetime":"1s"}`, 415, `Content-Type "text/json": the body must be application/json`},
		{"PATCH", one, "application/jsonx", `{"lifetime":"1s"}`, 415, "the body must be application/json"},
		{"PATCH", one, "", `{"lifetime":"1s"}`, 415, "the body must be application/json"},
	} {
		status, body := admin.doType(bad.method, bad.path, bad.ctype, bad.body)
		var apiErr struct {
			Error string `json:"error"`
		}
		if err := json.Unmarshal(body, &apiErr); err != nil {
			t.Errorf("%s %s %.40s: answer is not a JSON error: %q", bad.method, bad.path, bad.body, body)
			continue
		}
		if status != bad.status || !strings.Contains(apiErr.Error, bad.msg) {
			t.Errorf("%s %s %.40s: %d %q, want %d and a message containing %q",
				bad.method, bad.path, bad.body, status, apiErr.Error, bad.status, bad.msg)
		}
	}

	// The connection is untouched: same socket options, same settings, and
	// it is still served.
	if after := readSockopts(t, tc.tcp); after != before {
		t.Fatalf("socket options changed by rejected requests: %+v, before %+v", after, before)
	}
	ci := admin.get(tc.ID())
	if ci.Options.Lifetime.Duration() != 30*time.Second || ci.Options.MaxLifetime.IsSet() ||
		time.Duration(ci.Options.Keepalive.Idle) != 7*time.Second {
		t.Fatalf("settings changed by rejected requests: %s", mustJSON(ci.Options))
	}
	roundTrip(t, c, "still served")
}

// Connections opening and closing while the admin API lists, reads,
// patches and closes them: no race, no 5xx, and the registry drains.
func TestAdminConcurrentListing(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"5s"},`+proxyTo(up.addr()))

	const workers, perWorker = 6, 40
	deadline := time.Now().Add(30 * time.Second)
	var clientsDone atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, workers+1)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWorker {
				if time.Now().After(deadline) {
					errs <- fmt.Errorf("worker %d: out of time", w)
					return
				}
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					errs <- err
					return
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				// A few round trips keep the connection listed for a while;
				// one may fail: the lister deletes some connections.
				for j := range 3 {
					msg := fmt.Sprintf("w%d-%d-%d", w, i, j)
					if _, err := io.WriteString(c, msg); err != nil {
						break
					}
					if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
						break
					}
				}
				_ = c.Close()
			}
		}()
	}

	var lists, nonEmpty, deletes, patches atomic.Int64
	listerDone := make(chan struct{})
	go func() {
		defer close(listerDone)
		check := func(method, path, body string) (int, []byte, bool) {
			req, _ := http.NewRequest(method, admin.base+path, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			resp, err := admin.http.Do(req)
			if err != nil {
				errs <- fmt.Errorf("%s %s: %v", method, path, err)
				return 0, nil, false
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNotFound {
				errs <- fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
				return 0, nil, false
			}
			return resp.StatusCode, b, true
		}
		for n := 0; !clientsDone.Load() && time.Now().Before(deadline); n++ {
			status, b, ok := check("GET", "/tcpops/connections", "")
			if !ok {
				return
			}
			lists.Add(1)
			var l connectionList
			if status != http.StatusOK || json.Unmarshal(b, &l) != nil {
				errs <- fmt.Errorf("list: %d %s", status, b)
				return
			}
			if len(l.Connections) > 0 {
				nonEmpty.Add(1)
			}
			for i, ci := range l.Connections {
				path := fmt.Sprintf("/tcpops/connections/%d", ci.ID)
				var ok bool
				switch (n + i) % 7 {
				case 0:
					_, _, ok = check("DELETE", path, "")
					deletes.Add(1)
				case 1:
					_, _, ok = check("PATCH", path, `{"lifetime":"4s","keepalive":{"idle":"11s"}}`)
					patches.Add(1)
				default:
					_, _, ok = check("GET", path, "")
				}
				if !ok {
					return
				}
			}
		}
	}()

	wg.Wait()
	clientsDone.Store(true)
	<-listerDone
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	t.Logf("%d lists (%d non-empty), %d deletes, %d patches while %d connections came and went",
		lists.Load(), nonEmpty.Load(), deletes.Load(), patches.Load(), workers*perWorker)
	if nonEmpty.Load() == 0 {
		t.Fatal("the list never showed a connection while clients were connected")
	}
	waitRegistryEmpty(t)
	if l := admin.list(""); l.Total != 0 {
		t.Fatalf("list after clients are gone: %v", ids(l))
	}
}

// dialFrom connects to addr from the loopback address ip (any 127.0.0.0/8
// address is local on Linux), so that tests have peers that differ by IP.
func dialFrom(t testing.TB, ip, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c.(*net.TCPConn)
}

// A registrar knows a phone by its address, not by a conid: PATCH and
// DELETE on the collection act on every connection that matches remote=
// (and local=) in one request, and answer with the ids they acted on.
func TestAdminActByAddress(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"1m","keepalive":{"idle":"30s"}},`+proxyTo(up.addr()))

	a1, a2, b := dialFrom(t, "127.0.0.2", addr), dialFrom(t, "127.0.0.2", addr), dialFrom(t, "127.0.0.3", addr)
	var tcs []*Conn
	for _, c := range []net.Conn{a1, a2, b} {
		roundTrip(t, c, "x")
		tcs = append(tcs, waitTracked(t, c))
	}
	ta1, ta2, tb := tcs[0], tcs[1], tcs[2]
	pair := []uint64{ta1.ID(), ta2.ID()} // in id order: Caddy may accept a2 first
	slices.Sort(pair)

	var patched patchedList
	admin.must(http.MethodPatch, "/tcpops/connections?remote=127.0.0.2", `{"keepalive":{"idle":"41s"},"lifetime":"2m"}`, &patched)
	if fmt.Sprint(patched.IDs) != fmt.Sprint(pair) || len(patched.Connections) != 2 || patched.Filter != (queryFilter{Remote: "127.0.0.2"}) {
		t.Fatalf("PATCH remote=127.0.0.2: %s, want ids %v and the filter", mustJSON(patched), pair)
	}
	for i, ci := range patched.Connections {
		if ci.ID != pair[i] || *ci.LifetimeMs != 120000 || *ci.Socket.KeepaliveIdle != 41 {
			t.Fatalf("PATCH answer %d: %s", i, mustJSON(ci))
		}
	}
	for _, tc := range []*Conn{ta1, ta2} {
		if so := readSockopts(t, tc.tcp); so.idle != 41 {
			t.Fatalf("connection %d: keepalive idle %d after PATCH, want 41", tc.ID(), so.idle)
		}
	}
	if so := readSockopts(t, tb.tcp); so.idle != 30 {
		t.Fatalf("the other peer's keepalive idle changed to %d", so.idle)
	}

	admin.must(http.MethodPatch, "/tcpops/connections?remote="+a1.LocalAddr().String(), `{"lifetime":"3m"}`, &patched)
	if fmt.Sprint(patched.IDs) != fmt.Sprint([]uint64{ta1.ID()}) {
		t.Fatalf("PATCH remote=%s: ids %v, want [%d]", a1.LocalAddr(), patched.IDs, ta1.ID())
	}
	admin.must(http.MethodPatch, "/tcpops/connections?remote=127.0.0.3&local="+addr, `{"events":true}`, &patched)
	if fmt.Sprint(patched.IDs) != fmt.Sprint([]uint64{tb.ID()}) || patched.Filter != (queryFilter{Remote: "127.0.0.3", Local: addr}) {
		t.Fatalf("PATCH remote=127.0.0.3&local=%s: %s, want ids [%d] and the filter", addr, mustJSON(patched), tb.ID())
	}
	if l := admin.list("?remote=127.0.0.2"); l.Total != 2 || fmt.Sprint(ids(l)) != fmt.Sprint(pair) {
		t.Fatalf("GET remote=127.0.0.2: %v total %d", ids(l), l.Total)
	}

	var closed closedList
	admin.must(http.MethodDelete, "/tcpops/connections?remote=127.0.0.2", "", &closed)
	if fmt.Sprint(closed.IDs) != fmt.Sprint(pair) || len(closed.Closed) != 2 || closed.Filter != (queryFilter{Remote: "127.0.0.2"}) ||
		closed.Closed[0].Cause != CauseAdmin || closed.Closed[1].Reason != ReasonClosed {
		t.Fatalf("DELETE remote=127.0.0.2: %s", mustJSON(closed))
	}
	waitClosed(t, a1, 3*time.Second)
	waitClosed(t, a2, 3*time.Second)
	for _, tc := range []*Conn{ta1, ta2} {
		if reason, cause := tc.endedWith(); reason != ReasonClosed || cause != CauseAdmin {
			t.Fatalf("connection %d ended %s/%s, want closed/admin", tc.ID(), reason, cause)
		}
	}
	roundTrip(t, b, "still served")
	status, body := admin.do(http.MethodDelete, "/tcpops/connections?remote=127.0.0.2", "")
	if status != http.StatusNotFound || !strings.Contains(string(body), "no connection matches remote=127.0.0.2") {
		t.Fatalf("DELETE of what is gone: %d %s", status, body)
	}
}

// PATCH and DELETE by address while the connections they match come and
// go: every answer is 200 or 404, a 200 lists only connections it really
// acted on, and the registry and its index drain.
func TestAdminActByAddressRacesClose(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"1m"},`+proxyTo(up.addr()))

	const workers, perWorker = 4, 50
	var wg sync.WaitGroup
	errs := make(chan error, workers+2)
	var clientsDone atomic.Bool
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.4")}}
			for i := range perWorker {
				c, err := d.Dial("tcp", addr)
				if err != nil {
					errs <- err
					return
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				msg := fmt.Sprintf("w%d-%d", w, i)
				if _, err := io.WriteString(c, msg); err == nil {
					_, _ = io.ReadFull(c, make([]byte, len(msg))) // may fail: the DELETEs close some
				}
				_ = c.Close()
			}
		}()
	}
	// One connection from the address stays until a DELETE takes it, so
	// that matching by address has something to act on whatever the
	// timing: a test where every answer is a 404 proves nothing.
	anchor := dialFrom(t, "127.0.0.4", addr)
	roundTrip(t, anchor, "anchor")
	waitTracked(t, anchor)
	var acted, answers atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 0; !clientsDone.Load(); n++ {
			method, body := http.MethodPatch, `{"lifetime":"50s","keepalive":{"idle":"12s"}}`
			if n%3 == 0 {
				method, body = http.MethodDelete, ""
			}
			status, b := admin.do(method, "/tcpops/connections?remote=127.0.0.4", body)
			answers.Add(1)
			switch status {
			case http.StatusNotFound:
				continue
			case http.StatusOK:
			default:
				errs <- fmt.Errorf("%s: %d %s", method, status, b)
				return
			}
			var got struct {
				IDs         []uint64         `json:"ids"`
				Connections []connectionInfo `json:"connections"`
				Closed      []closedInfo     `json:"closed"`
			}
			if err := json.Unmarshal(b, &got); err != nil || len(got.IDs) == 0 {
				errs <- fmt.Errorf("%s: 200 with %s", method, b)
				return
			}
			acted.Add(int64(len(got.IDs)))
			for i, id := range got.IDs {
				if method == http.MethodPatch && (got.Connections[i].ID != id || *got.Connections[i].LifetimeMs != 50000) {
					errs <- fmt.Errorf("PATCH answer %d: %s", id, mustJSON(got.Connections[i]))
					return
				}
				// closed/eof when the client's FIN came first (events.md, Precedence).
				if method == http.MethodDelete && (got.Closed[i].ID != id || got.Closed[i].Cause != CauseAdmin && got.Closed[i].Cause != CauseEOF) {
					errs <- fmt.Errorf("DELETE answer %d: %s", id, mustJSON(got.Closed[i]))
					return
				}
			}
		}
	}()
	wg.Wait()
	clientsDone.Store(true)
	<-done
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d answers acted on %d connections while %d came and went", answers.Load(), acted.Load(), workers*perWorker)
	if acted.Load() == 0 {
		t.Fatalf("none of %d requests by address acted on a connection", answers.Load())
	}
	waitClosed(t, anchor, 3*time.Second)
	waitRegistryEmpty(t)
	if n := len(connections.byRemoteAddr(netip.MustParseAddr("127.0.0.4"), 0)); n != 0 {
		t.Fatalf("%d connections left in the address index", n)
	}
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	return string(bytes.TrimSpace(b))
}

// Behind caddy-l4's layer4 listener wrapper the handler learns which
// listener accepted the connection, and the admin API shows it.
func TestAdminListenAddrBehindLayer4ListenerWrapper(t *testing.T) {
	skipLayer4ListenerUnderRace(t)
	addr := freePort(t)
	loadCaddy(t, httpServer{
		listen:   addr,
		wrappers: []string{`{"wrapper":"layer4","routes":[{"handle":[{"handler":"tcpops","lifetime":"1m"}]}]}`},
		handlers: []string{respond("ok")},
	}.config())

	c := dial(t, addr)
	rawRequest(t, c, bufio.NewReader(c), getKeepAlive)
	ci := connectionInfoOf(waitTracked(t, c))
	if ci.Listen != addr || ci.Local != addr {
		t.Fatalf("listen %q local %q, want both %q", ci.Listen, ci.Local, addr)
	}
}

// A PATCH by address is all or nothing: of three connections that match,
// one has outlived the max_lifetime the PATCH sets, so the PATCH is refused
// whole (409) and the other two are not changed either.
func TestAdminActByAddressAllOrNothing(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"1m","keepalive":{"idle":"30s"}},`+proxyTo(up.addr()))

	old := dialFrom(t, "127.0.0.5", addr)
	roundTrip(t, old, "x")
	tOld := waitTracked(t, old)
	for tOld.since() < 600*time.Millisecond {
		time.Sleep(10 * time.Millisecond) // the age is what is tested
	}
	var young []*Conn
	for range 2 {
		c := dialFrom(t, "127.0.0.5", addr)
		roundTrip(t, c, "x")
		young = append(young, waitTracked(t, c))
	}
	if l := admin.list("?remote=127.0.0.5"); l.Total != 3 {
		t.Fatalf("%d connections from 127.0.0.5, want 3", l.Total)
	}
	status, body := admin.do(http.MethodPatch, "/tcpops/connections?remote=127.0.0.5", `{"keepalive":{"idle":"13s"},"max_lifetime":"400ms"}`)
	if status != http.StatusConflict || !strings.Contains(string(body), "of the 3 connections that match remote=127.0.0.5, none was changed") {
		t.Fatalf("PATCH with a max_lifetime one of three has outlived: %d %s", status, body)
	}
	for _, tc := range append([]*Conn{tOld}, young...) {
		if so := readSockopts(t, tc.tcp); so.idle != 30 {
			t.Fatalf("connection %d: keepalive idle %d after a refused PATCH, want 30", tc.ID(), so.idle)
		}
		if ci := admin.get(tc.ID()); ci.Options.MaxLifetime.IsSet() || time.Duration(ci.Options.Keepalive.Idle) != 30*time.Second {
			t.Fatalf("connection %d changed by a refused PATCH: %s", tc.ID(), mustJSON(ci.Options))
		}
	}
	roundTrip(t, old, "still served")
}

// The status the admin API shows: "ok" while the peer sends, and "eof"
// once it has finished sending (a half-close) while the session goes on;
// the upstream keeps its side open after the proxy's half-close, so the
// session goes on and can be looked at. A reset ends the connection at once
// (issue 21's precedence), so it is not listed with "error" but gone.
func TestAdminStatus(t *testing.T) {
	stop := make(chan struct{})
	up := startUpstream(t, func(c net.Conn) {
		_, _ = io.Copy(io.Discard, c)
		<-stop
	})
	t.Cleanup(func() { close(stop) })
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"1m"},`+proxyTo(up.addr()))

	awaitStatus := func(tc *Conn, want string) {
		t.Helper()
		var got string
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if got = admin.get(tc.ID()).Status; got == want {
				return
			}
		}
		t.Fatalf("connection %d: status %q, want %q", tc.ID(), got, want)
	}
	halfClosed := dial(t, addr)
	reset := dial(t, addr)
	var tracked []*Conn
	for _, c := range []*net.TCPConn{halfClosed, reset} {
		if _, err := io.WriteString(c, "hello"); err != nil {
			t.Fatal(err)
		}
		tc := waitTracked(t, c)
		awaitBytesIn(t, tc, 5)
		if st := admin.get(tc.ID()).Status; st != "ok" {
			t.Fatalf("connection %d: status %q while the peer sends, want ok", tc.ID(), st)
		}
		tracked = append(tracked, tc)
	}
	if err := halfClosed.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	awaitStatus(tracked[0], "eof")
	_ = reset.SetLinger(0)
	_ = reset.Close() // a reset: it ends the connection at once (docs/events.md)
	eventually(t, 5*time.Second, "the reset connection ended", tracked[1].isEnded)
	if reason, cause := tracked[1].endedWith(); reason != ReasonReset || cause != CauseReset {
		t.Fatalf("the reset connection ended %s/%s, want reset/reset", reason, cause)
	}
	if st := admin.get(tracked[0].ID()).Status; st != "eof" {
		t.Fatalf("the half-closed connection's status became %q", st)
	}
}

// awaitBytesIn waits until tc has read at least n bytes.
func awaitBytesIn(t *testing.T, tc *Conn, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); tc.bytesIn.Load() < n; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("connection %d read %d bytes, want %d", tc.ID(), tc.bytesIn.Load(), n)
		}
	}
}

// Paging through the connections of one IP: every page after the last
// one's id, a page after the last id there is, and an after that would
// wrap.
func TestAdminPageByRemoteIP(t *testing.T) {
	up := startUpstream(t, nil)
	addr := freePort(t)
	admin := loadCaddyAdmin(t, addr, `{"handler":"tcpops","lifetime":"1m"},`+proxyTo(up.addr()))
	var want []uint64
	for range 7 {
		c := dialFrom(t, "127.0.0.6", addr)
		roundTrip(t, c, "x")
		want = append(want, waitTracked(t, c).ID())
	}
	other := dialFrom(t, "127.0.0.7", addr)
	roundTrip(t, other, "x")
	waitTracked(t, other)
	slices.Sort(want)
	var got []uint64
	for after := ""; ; {
		l := admin.list("?remote=127.0.0.6&limit=3" + after)
		if l.Total != 7 {
			t.Fatalf("total %d, want 7", l.Total)
		}
		got = append(got, ids(l)...)
		if l.NextAfter == 0 {
			break
		}
		after = fmt.Sprintf("&after=%d", l.NextAfter)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("pages: %v, want %v", got, want)
	}
	for _, after := range []string{fmt.Sprint(want[6]), "18446744073709551615"} {
		if l := admin.list("?remote=127.0.0.6&after=" + after); len(l.Connections) != 0 || l.Total != 7 {
			t.Fatalf("after=%s: %v, total %d; want none of 7", after, ids(l), l.Total)
		}
		if l := admin.list("?remote=127.0.0.6:" + strings.Split(admin.get(want[0]).Remote, ":")[1] + "&after=" + after); len(l.Connections) != 0 {
			t.Fatalf("by IP:port after=%s: %v", after, ids(l))
		}
	}
	var patched patchedList
	status, body := admin.doType(http.MethodPatch, "/tcpops/connections?remote=127.0.0.7", "application/json; charset=utf-8", `{"lifetime":"2m"}`)
	if status != http.StatusOK || json.Unmarshal(body, &patched) != nil || len(patched.IDs) != 1 {
		t.Fatalf("PATCH with a charset parameter: %d %s", status, body)
	}
}
