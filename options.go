package tcpops

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Limits the kernel enforces (Linux: net/ipv4/tcp.c); values outside them
// fail with EINVAL, so they are rejected at config load instead.
const (
	minKeepaliveSeconds = 1
	maxKeepaliveSeconds = 32767 // TCP_KEEPIDLE and TCP_KEEPINTVL: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL
	minKeepaliveCount   = 1
	maxKeepaliveCount   = 127 // TCP_KEEPCNT: MAX_TCP_KEEPCNT
	minUserTimeout      = time.Millisecond
	maxUserTimeout      = time.Duration(math.MaxInt32) * time.Millisecond // TCP_USER_TIMEOUT is an int of ms
)

// The range of lifetime, max_lifetime and max_lifetime_grace: 1ms to 3650
// days (ten years). A timer shorter than a millisecond is never what an
// operator meant, and in JSON it is what a number of seconds written
// without a unit becomes (30 is 30ns). Ten years covers every real use (a
// phone that stays registered for years would still be closed by its NAT
// long before) and, unlike time.Duration's 292 years, leaves room for the
// schedule's sums (the process's uptime + max_lifetime + grace) to stay
// far from an int64's end; the schedule saturates as well (lifetime.go),
// so that no value, however it got in, can wrap a deadline. Longer than ten
// years is no limit, which is written "off".
const (
	minLifetime      = time.Millisecond
	maxLifetimeValue = 3650 * 24 * time.Hour
	// maxLifetimeText is maxLifetimeValue as the errors and docs write it.
	maxLifetimeText = "3650d (87600h)"
)

// Options is the per-connection TCP configuration shared by the layer4
// handler, the listener wrapper and the admin API's PATCH body. A field left
// out (zero) keeps whatever the socket or an earlier tcpops on the same
// connection set.
type Options struct {
	// Keepalive sets the kernel's TCP keepalive on the socket: SO_KEEPALIVE
	// and, where given, TCP_KEEPIDLE, TCP_KEEPCNT and TCP_KEEPINTVL. An
	// empty object ({}) turns keepalive on and keeps the socket's current
	// idle, count and interval. Go already enables keepalive with idle 15s,
	// interval 15s and 9 probes on every accepted and dialed connection;
	// this overrides those values.
	Keepalive *Keepalive `json:"keepalive,omitempty"`

	// UserTimeout sets TCP_USER_TIMEOUT: the longest time transmitted data
	// may stay unacknowledged (or keepalive probes unanswered) before the
	// kernel aborts the connection with ETIMEDOUT. It bounds a dead peer
	// while data is in flight, which keepalive alone does not. Whole
	// milliseconds, at least 1ms; "off" restores the kernel default (0).
	// Linux only: elsewhere it is ignored with a warning at provision.
	UserTimeout OptionalDuration `json:"user_timeout,omitempty"`

	// Lifetime is the inactivity lifetime, as Kamailio's
	// tcp_set_connection_lifetime means it: the connection is closed once no
	// byte has passed in either direction for this long. Traffic re-arms it;
	// keepalive probes do not. "off" removes a lifetime set earlier.
	Lifetime OptionalDuration `json:"lifetime,omitempty"`

	// MaxLifetime is an absolute cap on the connection's age, counted from
	// the moment tcpops first saw the connection, whatever its traffic.
	// "off" removes a cap set earlier.
	//
	// On a connection an HTTP server serves through the listener wrapper
	// it drains instead of cutting: requests in flight finish, and the
	// connection closes at the first moment none is, or when
	// MaxLifetimeGrace runs out (docs/listener.md).
	MaxLifetime OptionalDuration `json:"max_lifetime,omitempty"`

	// MaxLifetimeJitter spreads MaxLifetime over connections, so that
	// connections opened together (after a restart or a failover) do not
	// all close, and reconnect, together. Each connection's max_lifetime is
	// drawn uniformly from [max_lifetime × (1 − p/100), max_lifetime]: the
	// configured value stays a maximum. A number of percent, 0 to 100 (10
	// is 10%), or a string such as "10%". The admin API shows each
	// connection's own drawn value. gRPC-Go draws its MaxConnectionAge
	// with ±10%; Envoy calls this
	// max_downstream_connection_duration_jitter_percentage.
	MaxLifetimeJitter *Percent `json:"max_lifetime_jitter,omitempty"`

	// MaxLifetimeGrace bounds the drain of an HTTP connection that reached
	// its max_lifetime with requests in flight: they may finish for this
	// long, then the connection is closed hard. Default 30s; "off" waits
	// for them however long they take. Only the listener wrapper of an
	// HTTP server takes it: caddy-l4 routes have no requests to wait for,
	// so the layer4 handler refuses it (there max_lifetime closes the
	// connection when it is reached). gRPC-Go's MaxConnectionAgeGrace.
	MaxLifetimeGrace OptionalDuration `json:"max_lifetime_grace,omitempty"`

	// Events switches the Caddy events tcp_closed, tcp_timeout and tcp_reset
	// on (true) or off (false) for the connection, as Kamailio's
	// closed_event does for its tcp:closed, tcp:timeout and tcp:reset event
	// routes. They are emitted through the events app when the connection
	// ends (see docs/events.md). Left out, it keeps the setting of an
	// earlier tcpops on the same connection, so a later route or the admin
	// API can switch one connection on (Kamailio's
	// tcp_enable_closed_event); a connection nobody switched on emits
	// nothing and pays nothing for it. The end is logged and counted in
	// the metrics whatever this says.
	Events *bool `json:"events,omitempty"`

	// StatsPeriod makes the connection count in the TCP statistics
	// (caddy_tcpops_tcp_* metrics, docs/events.md) while it lives, every
	// this long, as Envoy's tcp_stats update_period: a registrar's
	// hour-long connections then show up before they end. Each sample adds
	// only what changed since the last one, so that the end adds the rest
	// and nothing counts twice. Without it (the default) a connection
	// counts once, at its end. Whole seconds, 1s to 3650d (the registry's
	// sweeper, which samples, wakes once a second); "off" stops the
	// sampling an earlier tcpops started.
	StatsPeriod OptionalDuration `json:"stats_period,omitempty"`
}

// Keepalive holds the TCP keepalive settings of Options. Idle and Interval
// are whole seconds between 1s and 32767s; Count is between 1 and 127. A zero
// field keeps the socket's current value.
type Keepalive struct {
	// Off turns keepalive off (SO_KEEPALIVE=0). It cannot be combined with
	// idle, count or interval.
	Off bool `json:"off,omitempty"`

	// Idle is how long the connection must be idle before the first probe
	// is sent (TCP_KEEPIDLE).
	Idle Duration `json:"idle,omitempty"`

	// Count is how many unanswered probes make the kernel drop the
	// connection (TCP_KEEPCNT).
	Count int `json:"count,omitempty"`

	// Interval is the time between two probes (TCP_KEEPINTVL).
	Interval Duration `json:"interval,omitempty"`
}

// Validate checks every field against the range the kernel accepts and
// returns an error naming the field, the value and the range.
func (o *Options) Validate() error {
	if ka := o.Keepalive; ka != nil {
		if ka.Off && (ka.Idle != 0 || ka.Count != 0 || ka.Interval != 0) {
			return fmt.Errorf("tcpops: keepalive off cannot be combined with idle, count or interval")
		}
		if err := validateKeepaliveSeconds("idle", ka.Idle); err != nil {
			return err
		}
		if err := validateKeepaliveSeconds("interval", ka.Interval); err != nil {
			return err
		}
		if err := validateKeepaliveCount(ka.Count); err != nil {
			return err
		}
	}
	if err := validateUserTimeout(o.UserTimeout); err != nil {
		return err
	}
	if err := validatePositive("lifetime", o.Lifetime); err != nil {
		return err
	}
	if err := validatePositive("max_lifetime", o.MaxLifetime); err != nil {
		return err
	}
	if o.MaxLifetimeJitter != nil {
		if err := checkJitter(float64(*o.MaxLifetimeJitter)); err != nil {
			return err
		}
	}
	if err := validatePositive("max_lifetime_grace", o.MaxLifetimeGrace); err != nil {
		return err
	}
	if o.StatsPeriod.IsSet() && !o.StatsPeriod.IsOff() {
		return checkStatsPeriod(o.StatsPeriod.Duration())
	}
	return nil
}

// The range of stats_period. The registry's sweeper samples once a
// sweepInterval (1s), so a shorter period, or a fraction of a second,
// could not be kept; the longest is that of the lifetimes.
const minStatsPeriod = time.Second

// checkStatsPeriod checks a stats_period that was given (not off).
func checkStatsPeriod(d time.Duration) error {
	if d < minStatsPeriod || d > maxLifetimeValue {
		return fmt.Errorf("tcpops: stats_period %v: must be between %v and %s, or off", d, minStatsPeriod, maxLifetimeText)
	}
	if d%time.Second != 0 {
		return fmt.Errorf("tcpops: stats_period %v: must be whole seconds (the sweeper that samples wakes once a second)", d)
	}
	return nil
}

func validateKeepaliveCount(n int) error {
	if n != 0 && (n < minKeepaliveCount || n > maxKeepaliveCount) {
		return fmt.Errorf("tcpops: keepalive count %d: must be between %d and %d",
			n, minKeepaliveCount, maxKeepaliveCount)
	}
	return nil
}

func validateUserTimeout(ut OptionalDuration) error {
	if !ut.IsSet() || ut.IsOff() {
		return nil
	}
	return checkUserTimeout(ut.Duration())
}

// checkUserTimeout checks a user_timeout that was given (not off).
func checkUserTimeout(d time.Duration) error {
	if d < minUserTimeout || d > maxUserTimeout {
		return fmt.Errorf("tcpops: user_timeout %v: must be between %v and %v (or off)",
			d, minUserTimeout, maxUserTimeout)
	}
	if d%time.Millisecond != 0 {
		return fmt.Errorf("tcpops: user_timeout %v: must be whole milliseconds (TCP_USER_TIMEOUT is in ms)", d)
	}
	return nil
}

func validatePositive(field string, v OptionalDuration) error {
	if !v.IsSet() || v.IsOff() {
		return nil
	}
	return checkPositive(field, v.Duration())
}

// checkPositive checks a lifetime, max_lifetime or max_lifetime_grace that
// was given (not off) against its range, minLifetime to maxLifetimeValue.
func checkPositive(field string, d time.Duration) error {
	if d < minLifetime || d > maxLifetimeValue {
		return fmt.Errorf("tcpops: %s %v: must be between %v and %s, or off", field, d, minLifetime, maxLifetimeText)
	}
	return nil
}

// unmarshalOptionsJSON decodes a JSON object of Options (the handler's and
// the listener wrapper's config, the admin API's PATCH body) into v, a
// *Options or a type with the same fields, after checkOptionsJSON: as
// strictly as the admin API must be, so that what a registrar's script
// sends with a slip is refused, not half-applied.
func unmarshalOptionsJSON(b []byte, v any) error {
	if err := checkOptionsJSON(b); err != nil {
		return err
	}
	return caddy.StrictUnmarshalJSON(b, v)
}

// The fields of Options and of Keepalive in JSON, exactly as written.
var (
	optionsFields   = []string{"keepalive", "user_timeout", "lifetime", "max_lifetime", "max_lifetime_jitter", "max_lifetime_grace", "events", "stats_period"}
	keepaliveFields = []string{"off", "idle", "count", "interval"}
)

// checkOptionsJSON refuses, naming the field, what encoding/json would take
// without a word but does not mean what it seems to:
//
//   - a field name in another case ({"LIFETIME": "2h"}: encoding/json
//     matches names case-insensitively), one given twice (it keeps the
//     last), or null (it keeps what was there);
//   - a duration of zero ({"lifetime": "0s"} or 0), which in Options means
//     "not set" and so would change nothing; "off" is the word for no
//     lifetime;
//   - a duration written as a JSON number below a millisecond: JSON numbers
//     are nanoseconds, as everywhere in Caddy's JSON, and such a number is
//     almost always seconds written without a unit ({"lifetime": 30} would
//     close every connection 30ns after its last byte);
//   - a number with a fraction or an exponent where a whole number is
//     meant (keepalive count 3.0, lifetime 1e9).
//
// What is not an object, or not JSON, is left to the decoding proper, whose
// error says so. Caddy itself re-encodes a module's JSON through
// map[string]any before the module sees it (getModuleNameInline), so in a
// config duplicate keys are already merged and 3.0 is already 3 by then;
// the admin API sees the body as it was sent.
func checkOptionsJSON(raw []byte) error {
	return checkJSONObject(raw, "", optionsFields)
}

// checkJSONObject checks the object of Options (obj "") or of its field obj.
func checkJSONObject(raw []byte, obj string, fields []string) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil
	}
	seen := make(map[string]bool, len(fields))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		key, _ := tok.(string)
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil
		}
		in, name := "", key
		if obj != "" {
			in, name = " in "+obj, obj+" "+key
		}
		if !slices.Contains(fields, key) {
			for _, f := range fields {
				if strings.EqualFold(f, key) {
					return fmt.Errorf("tcpops: field %q%s: field names are case-sensitive; write %q", key, in, f)
				}
			}
			return fmt.Errorf("tcpops: unknown field %q%s; the fields are %s", key, in, strings.Join(fields, ", "))
		}
		if seen[key] {
			return fmt.Errorf("tcpops: field %q%s is given twice", key, in)
		}
		seen[key] = true
		if string(value) == "null" {
			return fmt.Errorf("tcpops: %s null: leave the field out to keep the setting in force", name)
		}
		if err := checkJSONField(name, value); err != nil {
			return err
		}
	}
	return nil
}

// checkJSONField checks the literal form of one field's value; its type and
// range are left to the decoding and to Validate.
func checkJSONField(name string, value json.RawMessage) error {
	switch name {
	case "keepalive":
		if value[0] == '{' {
			return checkJSONObject(value, "keepalive", keepaliveFields)
		}
	case "keepalive count":
		if isJSONNumber(value) && !isWholeJSONNumber(value) {
			return fmt.Errorf("tcpops: keepalive count %s: must be a whole number between %d and %d", value, minKeepaliveCount, maxKeepaliveCount)
		}
		if n, err := strconv.ParseInt(string(value), 10, 64); err == nil && n == 0 {
			// 0 (or -0) would mean "unchanged", and turn keepalive on.
			return fmt.Errorf("tcpops: keepalive count %s: must be between %d and %d; leave it out to keep the count in force",
				value, minKeepaliveCount, maxKeepaliveCount)
		}
	case "keepalive idle", "keepalive interval", "user_timeout", "lifetime", "max_lifetime", "max_lifetime_grace", "stats_period":
		return checkJSONDuration(name, value)
	}
	return nil
}

// checkJSONDuration checks the literal form of a duration field.
func checkJSONDuration(name string, value json.RawMessage) error {
	var d time.Duration
	switch {
	case isJSONNumber(value):
		if !isWholeJSONNumber(value) {
			return fmt.Errorf("tcpops: %s %s: a JSON number is a whole number of nanoseconds, without a fraction or an exponent; "+
				`or write a duration string such as "90s"`, name, value)
		}
		n, err := strconv.ParseInt(string(value), 10, 64)
		if err != nil {
			return fmt.Errorf("tcpops: %s %s: out of range: a JSON number of nanoseconds is at most %d (%v)",
				name, value, int64(math.MaxInt64), time.Duration(math.MaxInt64))
		}
		if n > 0 && n < int64(time.Millisecond) {
			return fmt.Errorf(`tcpops: %s %d: a JSON number is nanoseconds, so this is %v, below the 1ms minimum; for %d seconds write "%ds"`,
				name, n, time.Duration(n), n, n)
		}
		d = time.Duration(n)
	case value[0] == '"':
		var s string
		if json.Unmarshal(value, &s) != nil || s == "off" {
			return nil
		}
		v, err := parseDuration(s)
		if err != nil {
			return fmt.Errorf("tcpops: %s: %w", name, err)
		}
		d = v
	default:
		return nil
	}
	if d != 0 {
		return nil
	}
	if strings.HasPrefix(name, "keepalive ") {
		return fmt.Errorf("tcpops: %s %s: must be between %ds and %ds; leave it out to keep the value in force",
			name, value, minKeepaliveSeconds, maxKeepaliveSeconds)
	}
	return fmt.Errorf(`tcpops: %s %s: zero is not a duration tcpops can enforce; to remove the %s write "off"`, name, value, name)
}

// isJSONNumber reports whether a JSON value is a number.
func isJSONNumber(v json.RawMessage) bool {
	return len(v) > 0 && (v[0] == '-' || v[0] >= '0' && v[0] <= '9')
}

// isWholeJSONNumber reports whether a JSON number is written as an integer.
func isWholeJSONNumber(v json.RawMessage) bool {
	return !bytes.ContainsAny(v, ".eE")
}

func validateKeepaliveSeconds(field string, d Duration) error {
	if d == 0 {
		return nil
	}
	td := time.Duration(d)
	if td < minKeepaliveSeconds*time.Second || td > maxKeepaliveSeconds*time.Second {
		return fmt.Errorf("tcpops: keepalive %s %v: must be between %ds and %ds",
			field, td, minKeepaliveSeconds, maxKeepaliveSeconds)
	}
	if td%time.Second != 0 {
		return fmt.Errorf("tcpops: keepalive %s %v: must be whole seconds (the kernel counts %s in seconds)",
			field, td, field)
	}
	return nil
}

// OptionalDuration is a duration that may also be "off". In JSON it is a
// number of nanoseconds (like caddy.Duration), a duration string ("90s",
// "1m30s", "1d") or the string "off". The zero value means "not set".
type OptionalDuration int64

// durationOff is the sentinel for "off". No JSON number maps to it: negative
// numbers are kept for Validate to reject, and math.MinInt64 itself is refused.
const durationOff OptionalDuration = math.MinInt64

// Off returns the OptionalDuration meaning "off".
func Off() OptionalDuration { return durationOff }

// IsSet reports whether the duration was given at all.
func (d OptionalDuration) IsSet() bool { return d != 0 }

// IsOff reports whether the duration is "off".
func (d OptionalDuration) IsOff() bool { return d == durationOff }

// Duration returns the duration; 0 when unset or off.
func (d OptionalDuration) Duration() time.Duration {
	if d == durationOff {
		return 0
	}
	return time.Duration(d)
}

// String returns "off" or the duration's string form.
func (d OptionalDuration) String() string {
	if d == durationOff {
		return "off"
	}
	return time.Duration(d).String()
}

// MarshalJSON writes "off" as a string and any other value as nanoseconds,
// the form caddy.Duration uses.
func (d OptionalDuration) MarshalJSON() ([]byte, error) {
	if d == durationOff {
		return []byte(`"off"`), nil
	}
	return strconv.AppendInt(nil, int64(d), 10), nil
}

// UnmarshalJSON accepts a number of nanoseconds, a duration string or "off".
func (d *OptionalDuration) UnmarshalJSON(b []byte) error {
	v, err := unmarshalDuration(b, parseOptionalDuration, `a number of nanoseconds, a duration string or "off"`)
	if err != nil {
		return err
	}
	if v == durationOff && bytes.TrimSpace(b)[0] != '"' {
		return fmt.Errorf("duration %d: out of range", v)
	}
	*d = v
	return nil
}

// unmarshalDuration decodes a JSON duration: a string through parse, or a
// number of nanoseconds; want says what is allowed, for the error.
func unmarshalDuration[T ~int64](b []byte, parse func(string) (T, error), want string) (T, error) {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return 0, err
		}
		return parse(s)
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return 0, fmt.Errorf("duration %s: must be %s", b, want)
	}
	return T(n), nil
}

// Duration is a duration in tcpops' JSON: a number of nanoseconds, as
// caddy.Duration, or a string in the Caddyfile's forms: Caddy's duration
// strings ("90s", "1m30s", "1d") or a bare integer, which means seconds, as
// in Kamailio's tcpops and in the Caddyfile. The zero value means "not set".
type Duration time.Duration

// MarshalJSON writes the duration as nanoseconds, the form caddy.Duration
// uses.
func (d Duration) MarshalJSON() ([]byte, error) {
	return strconv.AppendInt(nil, int64(d), 10), nil
}

// UnmarshalJSON accepts a number of nanoseconds or a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := unmarshalDuration(b, func(s string) (Duration, error) {
		v, err := parseDuration(s)
		return Duration(v), err
	}, "a number of nanoseconds or a duration string")
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// parseOptionalDuration parses "off" or a duration; see parseDuration.
func parseOptionalDuration(s string) (OptionalDuration, error) {
	if s == "off" {
		return durationOff, nil
	}
	v, err := parseDuration(s)
	if err != nil {
		return 0, err
	}
	if v == time.Duration(math.MinInt64) {
		return 0, fmt.Errorf("duration %q: out of range", s)
	}
	return OptionalDuration(v), nil
}

// errOutOfRange is wrapped by a duration too long for time.Duration.
var errOutOfRange = errors.New("out of range")

// durationForm is the syntax of a duration that caddy.ParseDuration reads:
// one that matches it and still fails to parse is out of range.
var durationForm = regexp.MustCompile(`^[-+]?([0-9]*(\.[0-9]*)?(ns|us|µs|μs|ms|s|m|h|d))+$`)

// parseDuration parses Caddy's duration forms ("90s", "1m30s", "1d"); a bare
// integer means seconds, as in Kamailio's tcpops.
func parseDuration(s string) (time.Duration, error) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n > math.MaxInt64/int64(time.Second) || n < math.MinInt64/int64(time.Second) {
			return 0, fmt.Errorf("duration %q: %w: the longest duration is %v (%d seconds)", s, errOutOfRange,
				time.Duration(math.MaxInt64), math.MaxInt64/int64(time.Second))
		}
		return time.Duration(n) * time.Second, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil {
		if durationForm.MatchString(s) {
			return 0, fmt.Errorf("duration %q: %w: the longest duration is %v (about 106751d)", s, errOutOfRange, time.Duration(math.MaxInt64))
		}
		return 0, fmt.Errorf("duration %q: want a whole number of seconds or a duration such as 90s, 1m30s or 1d", s)
	}
	return d, nil
}

// merge returns o with every field that next sets replacing o's. Keepalive
// fields merge one by one, so a later "keepalive { count 3 }" keeps an earlier
// idle; "off" replaces everything.
func (o Options) merge(next Options) Options {
	if next.Keepalive != nil {
		switch {
		case o.Keepalive == nil || next.Keepalive.Off:
			ka := *next.Keepalive
			o.Keepalive = &ka
		default:
			ka := *o.Keepalive
			ka.Off = false
			if next.Keepalive.Idle != 0 {
				ka.Idle = next.Keepalive.Idle
			}
			if next.Keepalive.Count != 0 {
				ka.Count = next.Keepalive.Count
			}
			if next.Keepalive.Interval != 0 {
				ka.Interval = next.Keepalive.Interval
			}
			o.Keepalive = &ka
		}
	}
	if next.UserTimeout.IsSet() {
		o.UserTimeout = next.UserTimeout
	}
	if next.Lifetime.IsSet() {
		o.Lifetime = next.Lifetime
	}
	if next.MaxLifetime.IsSet() {
		o.MaxLifetime = next.MaxLifetime
	}
	if next.MaxLifetimeJitter != nil {
		o.MaxLifetimeJitter = next.MaxLifetimeJitter
	}
	if next.MaxLifetimeGrace.IsSet() {
		o.MaxLifetimeGrace = next.MaxLifetimeGrace
	}
	if next.Events != nil {
		o.Events = next.Events
	}
	if next.StatsPeriod.IsSet() {
		o.StatsPeriod = next.StatsPeriod
	}
	return o
}

// Interface guards
var (
	_ json.Marshaler   = OptionalDuration(0)
	_ json.Unmarshaler = (*OptionalDuration)(nil)
	_ json.Marshaler   = Duration(0)
	_ json.Unmarshaler = (*Duration)(nil)
)
