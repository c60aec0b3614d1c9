package tcpops

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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
