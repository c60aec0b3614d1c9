package tcpops

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
)

// The three ways options enter tcpops from outside, fuzzed: a Caddyfile
// block, the handler's JSON config, and the admin API's PATCH body. Each
// target checks the same contract: no input panics; an input that is
// rejected gets an error that says so; an accepted input is valid by
// Validate and survives a round trip through JSON unchanged, and the other
// entry points accept what one accepted, with the same meaning.
//
// The seed corpora are in testdata/fuzz/<FuzzName>/; `go test` runs the
// seeds as ordinary tests, and `go test -fuzz=^FuzzName$ -fuzztime=20s`
// explores from them (test/e2e/run.sh does so for CI).

// FuzzCaddyfile feeds arbitrary text to the Caddyfile parser as a whole
// file, whose first token stands for the directive name.
func FuzzCaddyfile(f *testing.F) {
	f.Fuzz(func(t *testing.T, input string) {
		if strings.Contains(input, "{$") {
			// NewTestDispenser expands environment variables, which would
			// make the outcome depend on the machine's environment.
			return
		}
		if _, err := caddyfile.Tokenize([]byte(input), "Testfile"); err != nil {
			return // NewTestDispenser exits the process on a lexer error
		}
		var o Options
		err := o.unmarshalCaddyfile(caddyfile.NewTestDispenser(input))
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("rejected %q with an empty error", input)
			}
			return
		}
		if err := o.Validate(); err != nil {
			t.Fatalf("parser accepted %q but Validate rejects %+v: %v", input, o, err)
		}
		checkRoundTrip(t, o)
	})
}

// FuzzHandlerJSON unmarshals arbitrary bytes into the handler, as Caddy
// does with a route's handler object, then validates it.
func FuzzHandlerJSON(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var h Handler
		if err := json.Unmarshal(data, &h); err != nil {
			if err.Error() == "" {
				t.Fatalf("rejected %q with an empty error", data)
			}
			return
		}
		if err := h.Validate(); err != nil {
			// Validate's errors name the field, the value and the range;
			// they all start with the package's prefix.
			if !strings.HasPrefix(err.Error(), "tcpops: ") {
				t.Fatalf("Validate error for %q lacks the tcpops: prefix: %v", data, err)
			}
			return
		}
		checkRoundTrip(t, h.Options)

		// Caddy decodes module configs strictly (unknown fields are an
		// error); whatever it accepts must mean the same as above.
		var strict Handler
		if err := caddy.StrictUnmarshalJSON(data, &strict); err == nil {
			if !reflect.DeepEqual(strict.Options, h.Options) {
				t.Fatalf("strict and plain decoding of %q differ: %+v vs %+v", data, strict.Options, h.Options)
			}
		}
	})
}

// FuzzAdminPatchBody feeds arbitrary bodies to the admin API's PATCH
// decoder.
func FuzzAdminPatchBody(f *testing.F) {
	f.Fuzz(func(t *testing.T, body []byte) {
		o, err := decodeOptions(bytes.NewReader(body))
		if err != nil {
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusBadRequest || apiErr.Err == nil || apiErr.Err.Error() == "" {
				t.Fatalf("rejected %q without a 400 APIError that says why: %#v", body, err)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted a body that is not one JSON value: %q", body)
		}
		if err := o.Validate(); err != nil {
			t.Fatalf("accepted %q but Validate rejects %+v: %v", body, o, err)
		}
		checkRoundTrip(t, o)
		// A PATCH on a connection with nothing set yet leaves exactly the
		// PATCH in force.
		if got := (Options{}).merge(o); !reflect.DeepEqual(got, o) {
			t.Fatalf("merging %q over nothing gave %+v, want %+v", body, got, o)
		}
	})
}

// checkRoundTrip checks that valid options marshal to JSON that the admin
// API's strict decoder and the handler's config decoding both accept and
// read back as the same options; the layer4 handler refuses
// max_lifetime_grace (caddy-l4 routes have no requests to wait for), and
// only that.
func checkRoundTrip(t *testing.T, o Options) {
	t.Helper()
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatalf("marshal %+v: %v", o, err)
	}
	back, err := decodeOptions(bytes.NewReader(b))
	if reflect.ValueOf(o).IsZero() {
		// Nothing set: a config may say nothing, a PATCH must change
		// something.
		if err == nil {
			t.Fatalf("the admin decoder accepts the marshaled %s, which changes nothing", b)
		}
		back = o
	} else if err != nil {
		t.Fatalf("the admin decoder rejects the marshaled %s of %+v: %v", b, o, err)
	}
	if !reflect.DeepEqual(back, o) {
		t.Fatalf("round trip through %s: got %+v, want %+v", b, back, o)
	}
	var h Handler
	if err := caddy.StrictUnmarshalJSON(b, &h); err != nil {
		t.Fatalf("the handler config rejects the marshaled %s: %v", b, err)
	}
	if err := h.Validate(); (err != nil) != o.MaxLifetimeGrace.IsSet() {
		t.Fatalf("the handler config's verdict on the marshaled %s: %v", b, err)
	}
	if !reflect.DeepEqual(h.Options, o) {
		t.Fatalf("handler round trip through %s: got %+v, want %+v", b, h.Options, o)
	}
}

// fuzzConn is a simulated connection that may be closed: the admin fuzz
// target's DELETEs close it.
type fuzzConn struct {
	simConn
	closed atomic.Bool
}

func (c *fuzzConn) Close() error { c.closed.Store(true); return nil }

// FuzzAdminRequests drives the admin API's handler with random methods,
// query strings and bodies, over a registry of connections on shared and
// distinct IPs and ports, and checks the promise of docs/admin.md's
// "Limits and strictness": a 2xx PATCH or DELETE acts only on connections
// the query names, as documented (remote= and local=, each an IP or
// IP:port, each given once), and a 4xx changes nothing.
func FuzzAdminRequests(f *testing.F) {
	for _, seed := range []struct {
		method byte
		query  string
		body   string
	}{
		{1, "remote=192.0.2.1", `{"lifetime":"2h"}`},
		{2, "remote=192.0.2.1&local=127.0.0.2%zz", ""},
		{2, "remote=192.0.2.1;", ""},
		{2, "remote=192.0.2.1&remote=192.0.2.2", ""},
		{2, "remote=192.0.2.1&loacl=127.0.0.1", ""},
		{1, "remote=192.0.2.1:5060&local=127.0.0.1", `{"LIFETIME":"2h"}`},
		{1, "local=127.0.0.2:5060", `{"lifetime":"2h","lifetime":"3h"}`},
		{2, "remote=[2001:db8::1]:5061", ""},
		{0, "remote=192.0.2.1&after=18446744073709551615", ""},
		{1, "remote=192.0.2.2", `{}`},
	} {
		f.Add(seed.method, seed.query, []byte(seed.body))
	}
	peers := []string{"192.0.2.1:5060", "192.0.2.1:5061", "192.0.2.1:5060", "192.0.2.2:5060", "[2001:db8::1]:5061", "[::ffff:192.0.2.2]:5062"}
	locals := []string{"127.0.0.1:5060", "127.0.0.2:5060", "127.0.0.2:5060", "127.0.0.1:5060", "127.0.0.1:5061", "127.0.0.2:5060"}
	a := &adminAPI{logger: zap.NewNop()}
	f.Fuzz(func(t *testing.T, method byte, query string, body []byte) {
		r := quietRegistry()
		tr := simTracker()
		var conns []*Conn
		var socks []*fuzzConn
		before := map[*Conn]string{}
		for i := range peers {
			sc := &fuzzConn{simConn: simConn{remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(peers[i])),
				local: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(locals[i]))}}
			c := &Conn{Conn: sc, start: time.Now(), tracker: tr}
			r.add(c)
			c.update(&Options{Lifetime: OptionalDuration(time.Hour)}, zap.NewNop())
			conns, socks = append(conns, c), append(socks, sc)
			before[c] = mustJSON(c.opts)
		}
		defer func() {
			for _, c := range conns {
				c.end(ReasonClosed, CauseEOF)
			}
		}()
		m := [...]string{http.MethodGet, http.MethodPatch, http.MethodDelete}[method%3]
		req, err := http.NewRequest(m, "http://localhost/tcpops/connections", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.URL.RawQuery = query
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		withRegistry(r, func() {
			if err := a.handleConnections(w, req); err != nil {
				var apiErr caddy.APIError
				if !errors.As(err, &apiErr) {
					t.Fatalf("%s ?%s: error that is not an APIError: %v", m, query, err)
				}
				w.Code = apiErr.HTTPStatus
			}
		})
		changed := func(i int) bool {
			return socks[i].closed.Load() || conns[i].isEnded() || mustJSON(conns[i].opts) != before[conns[i]]
		}
		if w.Code >= 400 {
			if w.Code >= 500 {
				t.Fatalf("%s ?%s %q: %d", m, query, body, w.Code)
			}
			for i := range conns {
				if changed(i) {
					t.Fatalf("%s ?%s %q: %d, yet connection %s was changed", m, query, body, w.Code, peers[i])
				}
			}
			return
		}
		if m == http.MethodGet {
			return
		}
		// A 2xx PATCH or DELETE: the query is what docs/admin.md allows,
		// and what was changed is named by it.
		v, err := url.ParseQuery(query)
		if err != nil {
			t.Fatalf("%s ?%s: %d for a query that does not parse: %v", m, query, w.Code, err)
		}
		named := func(param, addr string) bool {
			vs, ok := v[param]
			if !ok {
				return true
			}
			if len(vs) != 1 {
				t.Fatalf("%s ?%s: %d with %s given %d times", m, query, w.Code, param, len(vs))
			}
			have := netip.MustParseAddrPort(addr)
			if ap, err := netip.ParseAddrPort(vs[0]); err == nil {
				return ap.Addr().Unmap() == have.Addr().Unmap() && ap.Port() == have.Port()
			}
			ip, err := netip.ParseAddr(strings.Trim(vs[0], "[]"))
			if err != nil {
				t.Fatalf("%s ?%s: %d with %s=%q, which is no address", m, query, w.Code, param, vs[0])
			}
			return ip.Unmap() == have.Addr().Unmap()
		}
		for name := range v {
			if name != "remote" && name != "local" {
				t.Fatalf("%s ?%s: %d with parameter %q", m, query, w.Code, name)
			}
		}
		for i := range conns {
			if changed(i) && !(named("remote", peers[i]) && named("local", locals[i])) {
				t.Fatalf("%s ?%s %q: %d changed connection %s -> %s, which the query does not name", m, query, body, w.Code, peers[i], locals[i])
			}
		}
	})
}
