package tcpops

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// Percent is a percentage, 0 to 100: max_lifetime_jitter. In JSON it is a
// number of percent (10 is 10%) or a string in the Caddyfile's form ("10%",
// "12.5%", or "10").
type Percent float64

// MarshalJSON writes the percentage as a number of percent.
func (p Percent) MarshalJSON() ([]byte, error) {
	return strconv.AppendFloat(nil, float64(p), 'g', -1, 64), nil
}

// UnmarshalJSON accepts a number of percent or a string such as "10%".
// The range is checked by Validate, so that the error names the field.
func (p *Percent) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		v, err := parsePercent(s)
		if err != nil {
			return err
		}
		*p = Percent(v)
		return nil
	}
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		var num json.Number
		if json.Unmarshal(b, &num) == nil { // a number too large for a float64
			return fmt.Errorf("tcpops: max_lifetime_jitter %s: must be between 0%% and 100%%", b)
		}
		return fmt.Errorf("tcpops: max_lifetime_jitter %s: want a number of percent (10 is 10%%) or a string such as \"10%%\"", b)
	}
	*p = Percent(f)
	return nil
}

// String returns the percentage with its % sign.
func (p Percent) String() string {
	return strconv.FormatFloat(float64(p), 'g', -1, 64) + "%"
}

// parsePercent parses "10%", "12.5%" or "10". Only finite decimal numbers
// are accepted: strconv.ParseFloat also reads "NaN", "Inf" and hex floats,
// none of which is a percentage anyone writes.
func parsePercent(s string) (float64, error) {
	num := strings.TrimSuffix(strings.TrimSpace(s), "%")
	valid := num != ""
	for _, r := range num {
		if (r < '0' || r > '9') && r != '.' && r != '-' && r != '+' {
			valid = false
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if !valid || err != nil {
		return 0, fmt.Errorf("percentage %q: want a number of percent such as 10%% or 12.5%%", s)
	}
	return f, nil
}

// checkJitter checks a max_lifetime_jitter: a share of max_lifetime, so
// between 0% (every connection gets max_lifetime itself) and 100% (anything
// up to it).
func checkJitter(p float64) error {
	if !(p >= 0 && p <= 100) { // also refuses NaN
		return fmt.Errorf("tcpops: max_lifetime_jitter %v: must be between 0%% and 100%%", Percent(p))
	}
	return nil
}

// jitterPercent returns the max_lifetime_jitter in force, 0 when unset.
func (o *Options) jitterPercent() float64 {
	if o.MaxLifetimeJitter == nil {
		return 0
	}
	return float64(*o.MaxLifetimeJitter)
}

// jitterRange returns the range a connection's max_lifetime is drawn from:
// [ml × (1 − p/100), ml].
func jitterRange(ml time.Duration, p float64) (lo, hi time.Duration) {
	if p >= 100 {
		// float64(ml) of a max_lifetime near the largest Duration rounds
		// to 2^63, which no int64 holds.
		return 0, ml
	}
	return ml - time.Duration(float64(ml)*p/100), ml
}

// drawMaxLifetime draws one connection's max_lifetime, uniformly from
// jitterRange. Each connection draws its own, so that a fleet's connections
// opened in the same moment spread their ends (and their clients'
// reconnects) over the range instead of repeating that moment. The
// top-level functions of math/rand/v2 are safe for concurrent use and need
// no seeding. 0 (no max_lifetime) stays 0, and a draw never gives 0, which
// would mean "no max_lifetime".
func drawMaxLifetime(ml time.Duration, p float64) time.Duration {
	if ml <= 0 || p <= 0 {
		return ml
	}
	lo, hi := jitterRange(ml, p)
	if hi-lo == math.MaxInt64 { // hi-lo+1 would overflow
		return max(lo+rand.N(hi-lo), 1)
	}
	return max(lo+rand.N(hi-lo+1), 1)
}
