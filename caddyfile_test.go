package tcpops

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestUnmarshalCaddyfileErrors feeds the parser one bad input per rule and
// checks that the error names the option, the value and the allowed range.
func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		want        []string // substrings of the error
	}{
		{"idle zero", "keepalive 0 5 5", []string{"keepalive idle 0:", "between 1s and 32767s"}},
		{"idle too big", "keepalive 32768 5 5", []string{"tcpops: keepalive idle 32768: must be between 1s and 32767s", "between 1s and 32767s"}},
		{"idle not whole seconds", "keepalive 1500ms 5 5", []string{"keepalive idle 1500ms:", "whole seconds"}},
		{"idle not a number", "keepalive abc 5 5", []string{"keepalive idle", `"abc"`}},
		{"interval zero", "keepalive 60 5 0", []string{"keepalive interval 0:", "between 1s and 32767s"}},
		{"interval too big in block", "keepalive {\ninterval 40000\n}", []string{"keepalive interval 40000:", "between 1s and 32767s"}},
		{"count zero", "keepalive 60 0 5", []string{"keepalive count 0", "between 1 and 127"}},
		{"count too big", "keepalive 60 128 5", []string{"keepalive count 128", "between 1 and 127"}},
		{"count not a number", "keepalive 60 x 5", []string{"keepalive count", `"x"`, "not a whole number"}},
		{"count negative in block", "keepalive {\ncount -3\n}", []string{"keepalive count -3", "between 1 and 127"}},
		{"keepalive two args", "keepalive 60 5", []string{"keepalive takes 1 or 3 arguments", "got 2"}},
		{"keepalive four args", "keepalive 60 5 5 5", []string{"keepalive takes 1 or 3 arguments", "got 4"}},
		{"keepalive bad word", "keepalive maybe", []string{`keepalive "maybe"`, "off, on"}},
		{"keepalive nothing", "keepalive", []string{"keepalive needs"}},
		{"keepalive off then values", "keepalive off\nkeepalive 60 5 5", []string{"duplicate option 'keepalive'"}},
		{"keepalive block unknown", "keepalive {\nprobes 3\n}", []string{"unknown keepalive option 'probes'"}},
		{"keepalive block duplicate", "keepalive {\nidle 5\nidle 6\n}", []string{"duplicate keepalive option 'idle'"}},
		{"keepalive block arity", "keepalive {\nidle 5 6\n}", []string{"keepalive idle takes exactly one argument", "got 2"}},
		{"keepalive block after args", "keepalive 60 5 5 {\ncount 3\n}", []string{"keepalive does not take a block"}},
		{"user_timeout zero", "user_timeout 0", []string{"user_timeout 0:", "between 1ms and"}},
		{"user_timeout sub-millisecond", "user_timeout 1500us", []string{"user_timeout 1500us:", "whole milliseconds"}},
		{"user_timeout too big", "user_timeout 30d", []string{"user_timeout 30d:", "between 1ms and 596h31m23.647s"}},
		{"user_timeout no arg", "user_timeout", []string{"user_timeout takes exactly one argument", "got 0"}},
		{"lifetime zero", "lifetime 0", []string{"lifetime 0:", "must be between 1ms and 3650d (87600h), or off"}},
		{"lifetime negative", "lifetime -5s", []string{"lifetime -5s", "must be between 1ms and 3650d (87600h), or off"}},
		// Below the minimum in the Caddyfile: no word about JSON numbers.
		{"lifetime sub-millisecond", "lifetime 500us", []string{"tcpops: lifetime 500us: must be between 1ms and 3650d (87600h), or off"}},
		{"lifetime not a number", "lifetime soon", []string{"lifetime", `"soon"`}},
		{"lifetime two args", "lifetime 1s 2s", []string{"lifetime takes exactly one argument", "got 2"}},
		// The maxima (issue 17): longer than 3650d is refused at adapt,
		// and so is what time.Duration cannot hold, with the same range.
		{"lifetime too long", "lifetime 9223372036854775807ns", []string{"lifetime 9223372036854775807ns: must be between 1ms and 3650d (87600h), or off"}},
		{"lifetime overflow", "lifetime 106752d", []string{"lifetime 106752d: out of range: must be between 1ms and 3650d (87600h), or off"}},
		{"max_lifetime bare seconds overflow", "max_lifetime 9223372037", []string{"max_lifetime 9223372037: out of range: must be between 1ms and 3650d (87600h), or off"}},
		{"user_timeout overflow", "user_timeout 9223372037", []string{"user_timeout 9223372037: out of range: must be between 1ms and 596h31m23.647s"}},
		{"keepalive count overflow", "keepalive 60 99999999999999999999 5", []string{"keepalive count 99999999999999999999", "between 1 and 127"}},
		{"lifetime duplicate", "lifetime 1s\nlifetime 2s", []string{"duplicate option 'lifetime'"}},
		{"max_lifetime zero", "max_lifetime 0s", []string{"max_lifetime 0s:", "must be between 1ms and 3650d (87600h), or off"}},
		{"max_lifetime block", "max_lifetime 1h {\nfoo\n}", []string{"max_lifetime does not take a block"}},
		{"unknown option", "idle_timeout 5s", []string{"unknown option 'idle_timeout'"}},
		// stats_period (issue 29): whole seconds, 1s to 3650d, or off.
		{"stats_period zero", "stats_period 0", []string{"stats_period 0: must be between 1s and 3650d (87600h), or off"}},
		{"stats_period below a second", "stats_period 500ms", []string{"stats_period 500ms: must be between 1s and 3650d (87600h), or off"}},
		{"stats_period fraction", "stats_period 1500ms", []string{"stats_period 1500ms: must be whole seconds"}},
		{"stats_period too long", "stats_period 3651d", []string{"stats_period 3651d: must be between 1s and 3650d (87600h), or off"}},
		{"stats_period overflow", "stats_period 106752d", []string{"stats_period 106752d: out of range: must be between 1s and 3650d (87600h), or off"}},
		{"stats_period no arg", "stats_period", []string{"stats_period takes exactly one argument", "got 0"}},
		// A route's list of options is what a route takes (issue 22).
		{"unknown option in a route", "idle_timeout 5s", []string{"(want keepalive, user_timeout, lifetime, max_lifetime, max_lifetime_jitter, events or stats_period)"}},
		// An empty block is a block (issue 22: "lifetime 10 { }" passed).
		{"lifetime empty block", "lifetime 10 { }", []string{"lifetime does not take a block"}},
		{"lifetime empty block on two lines", "lifetime 10 {\n}", []string{"lifetime does not take a block"}},
		{"user_timeout empty block", "user_timeout 5s { }", []string{"user_timeout does not take a block"}},
		{"events empty block", "events on { }", []string{"events does not take a block"}},
		{"jitter empty block", "max_lifetime_jitter 10% { }", []string{"max_lifetime_jitter does not take a block"}},
		{"keepalive off empty block", "keepalive off { }", []string{"keepalive does not take a block"}},
		{"keepalive positional empty block", "keepalive 60 5 5 { }", []string{"keepalive does not take a block"}},
		{"keepalive block option empty block", "keepalive {\nidle 5 { }\n}", []string{"keepalive idle does not take a block"}},
		{"keepalive empty block", "keepalive { }", []string{"keepalive needs"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := caddyfile.NewTestDispenser("tcpops {\n" + tc.input + "\n}")
			var h Handler
			err := h.UnmarshalCaddyfile(d)
			if err == nil {
				t.Fatalf("no error for %q; parsed %+v", tc.input, h.Options)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestUnmarshalCaddyfileArgsOnDirectiveLine(t *testing.T) {
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops 60 5 5"))
	if err == nil || !strings.Contains(err.Error(), "takes no arguments") {
		t.Fatalf("got %v", err)
	}
}

// TestUnmarshalCaddyfileForms checks what each accepted form parses to.
func TestUnmarshalCaddyfileForms(t *testing.T) {
	for _, tc := range []struct {
		input string
		want  Options
	}{
		{"keepalive 60 5 5", Options{Keepalive: &Keepalive{Idle: Duration(time.Minute), Count: 5, Interval: Duration(5 * time.Second)}}},
		{"keepalive 1m 127 32767s", Options{Keepalive: &Keepalive{Idle: Duration(time.Minute), Count: 127, Interval: Duration(32767 * time.Second)}}},
		{"keepalive off", Options{Keepalive: &Keepalive{Off: true}}},
		{"keepalive on", Options{Keepalive: &Keepalive{}}},
		{"keepalive {\nidle 2m\n}", Options{Keepalive: &Keepalive{Idle: Duration(2 * time.Minute)}}},
		{"user_timeout 1ms", Options{UserTimeout: OptionalDuration(time.Millisecond)}},
		{"user_timeout off", Options{UserTimeout: Off()}},
		{"lifetime 1d", Options{Lifetime: OptionalDuration(24 * time.Hour)}},
		{"stats_period 10", Options{StatsPeriod: OptionalDuration(10 * time.Second)}},
		{"stats_period 1m", Options{StatsPeriod: OptionalDuration(time.Minute)}},
		{"stats_period off", Options{StatsPeriod: Off()}},
		{"lifetime 90", Options{Lifetime: OptionalDuration(90 * time.Second)}},
		{"max_lifetime off", Options{MaxLifetime: Off()}},
		{"", Options{}},
	} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("tcpops {\n" + tc.input + "\n}")); err != nil {
			t.Errorf("%q: %v", tc.input, err)
			continue
		}
		got, _ := json.Marshal(h.Options)
		want, _ := json.Marshal(tc.want)
		if string(got) != string(want) {
			t.Errorf("%q: got %s, want %s", tc.input, got, want)
		}
	}
}

// TestProvisionRejectsBadJSON checks that JSON configs, which skip the
// Caddyfile parser, meet the same rules at load time.
func TestProvisionRejectsBadJSON(t *testing.T) {
	for _, tc := range []struct{ json, want string }{
		{`{"keepalive":{"off":true,"idle":"60s"}}`, "keepalive off cannot be combined"},
		{`{"keepalive":{"idle":"500ms"}}`, "keepalive idle 500ms: must be between 1s and 32767s"},
		{`{"keepalive":{"interval":-1}}`, "keepalive interval -1ns: must be between 1s and 32767s"},
		{`{"keepalive":{"count":200}}`, "keepalive count 200: must be between 1 and 127"},
		{`{"user_timeout":"0.5ms"}`, "user_timeout 500µs: must be between 1ms"},
		{`{"lifetime":-1}`, "lifetime -1ns: must be between 1ms and 3650d (87600h), or off"},
		{`{"max_lifetime":"-2s"}`, "max_lifetime -2s: must be between 1ms and 3650d (87600h), or off"},
		{`{"lifetime":"sometime"}`, `duration "sometime"`},
		{`{"lifetime":true}`, "must be a number of nanoseconds, a duration string or \"off\""},
		// Numbers are nanoseconds (Caddy's convention); a number of seconds
		// written without a unit is refused with the fix, not taken as ns.
		{`{"lifetime":30}`, `tcpops: lifetime 30: a JSON number is nanoseconds, so this is 30ns, below the 1ms minimum; for 30 seconds write "30s"`},
		{`{"max_lifetime":86400}`, `tcpops: max_lifetime 86400: a JSON number is nanoseconds, so this is 86.4µs, below the 1ms minimum; for 86400 seconds write "86400s"`},
		{`{"user_timeout":75}`, `tcpops: user_timeout 75: a JSON number is nanoseconds, so this is 75ns, below the 1ms minimum; for 75 seconds write "75s"`},
		{`{"keepalive":{"idle":60}}`, `keepalive idle 60: a JSON number is nanoseconds, so this is 60ns`},
		{`{"keepalive":{"idle":"60x"}}`, `duration "60x"`},
		{`{"stats_period":"999ms"}`, "stats_period 999ms: must be between 1s and 3650d (87600h), or off"},
		{`{"stats_period":"10500ms"}`, "stats_period 10.5s: must be whole seconds"},
	} {
		var h Handler
		err := json.Unmarshal([]byte(tc.json), &h)
		if err == nil {
			err = h.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got error %v, want one containing %q", tc.json, err, tc.want)
		}
	}
}

// TestLoadRejectsBadConfig checks that caddy itself refuses to load (and so
// `caddy validate` refuses) a bad tcpops config, with the message.
func TestLoadRejectsBadConfig(t *testing.T) {
	cfg := l4Config(freePort(t), `{"handler":"tcpops","keepalive":{"count":128}}`, proxyTo("127.0.0.1:1"))
	var c caddy.Config
	if err := json.Unmarshal([]byte(cfg), &c); err != nil {
		t.Fatal(err)
	}
	err := caddy.Validate(&c)
	if err == nil || !strings.Contains(err.Error(), "keepalive count 128: must be between 1 and 127") {
		t.Fatalf("got %v", err)
	}
}

// TestDurationJSON checks keepalive's duration type: numbers are
// nanoseconds, strings are Caddy durations or a bare integer of seconds.
func TestDurationJSON(t *testing.T) {
	for in, want := range map[string]Duration{
		`"90s"`: Duration(90 * time.Second), `"1d"`: Duration(24 * time.Hour), `"30"`: Duration(30 * time.Second),
		`1000000000`: Duration(time.Second), `0`: 0,
	} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err != nil || d != want {
			t.Errorf("%s: got %v, %v; want %v", in, d, err, want)
		}
	}
	for _, in := range []string{`"off"`, `"ten"`, `true`, `1.5`} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err == nil {
			t.Errorf("%s: accepted as %v", in, d)
		}
	}
	if b, _ := json.Marshal(Duration(5 * time.Second)); string(b) != "5000000000" {
		t.Errorf("5s marshals as %s", b)
	}
}

func TestOptionalDurationJSON(t *testing.T) {
	for in, want := range map[string]OptionalDuration{
		`"off"`: Off(), `"90s"`: OptionalDuration(90 * time.Second), `"1d"`: OptionalDuration(24 * time.Hour),
		`1000`: 1000, `"30"`: OptionalDuration(30 * time.Second),
	} {
		var d OptionalDuration
		if err := json.Unmarshal([]byte(in), &d); err != nil || d != want {
			t.Errorf("%s: got %v, %v; want %v", in, d, err, want)
		}
	}
	var d OptionalDuration
	if err := json.Unmarshal([]byte(`-9223372036854775808`), &d); err == nil {
		t.Errorf("the off sentinel's number was accepted as %v", d)
	}
	if b, _ := json.Marshal(Off()); string(b) != `"off"` {
		t.Errorf("off marshals as %s", b)
	}
}
