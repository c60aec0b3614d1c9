package tcpops

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt runs every testdata/*.caddytest (a Caddyfile, a line of
// dashes, the JSON `caddy adapt` must print) through Caddy's adapter: the
// handler's cases (handler_*) and the listener wrapper's (listener_*).
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/*.caddytest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no adapt cases: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, want, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatalf("%s: no ---------- separator", f)
			}
			if !caddytest.CompareAdapt(t, f, strings.TrimSpace(caddyfile)+"\n", "caddyfile", strings.TrimSpace(want)) {
				t.Fail()
			}
			// What adapts must load back: caddy validate on the JSON
			// (issue 22: a lifetime of 9223372036854775807ns adapted to
			// a float-rounded number that validate then refused).
			validateJSON(t, []byte(want))
		})
	}
}

// TestExamples adapts and validates every example config, as `caddy adapt`
// and `caddy validate` would, and checks that each JSON example is what its
// Caddyfile adapts to.
func TestExamples(t *testing.T) {
	caddyfiles, _ := filepath.Glob("example/*Caddyfile")
	jsons, _ := filepath.Glob("example/*.json")
	if len(caddyfiles) == 0 || len(jsons) == 0 {
		t.Fatal("no examples found")
	}
	adapted := map[string][]byte{}
	for _, f := range caddyfiles {
		t.Run(filepath.Base(f), func(t *testing.T) {
			body, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": f})
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("adapt warning: %s", w)
			}
			adapted[f] = cfg
			validateJSON(t, cfg)
		})
	}
	for _, f := range jsons {
		t.Run(filepath.Base(f), func(t *testing.T) {
			body, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			validateJSON(t, body)
			if from, ok := adapted[strings.TrimSuffix(f, ".json")]; ok && !sameJSON(t, from, body) {
				t.Errorf("%s is not what %s adapts to; regenerate it with caddy adapt --pretty", f, strings.TrimSuffix(f, ".json"))
			}
		})
	}
}

// validateJSON provisions the config without starting it, as `caddy validate`.
func validateJSON(t *testing.T, cfg []byte) {
	t.Helper()
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if err := caddy.Validate(&c); err != nil {
		t.Fatalf("validate: %v", err)
	}
}

func sameJSON(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatal(err)
	}
	ja, _ := json.Marshal(x)
	jb, _ := json.Marshal(y)
	return bytes.Equal(ja, jb)
}
