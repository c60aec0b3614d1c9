package tcpops

import (
	"math"
	"strconv"
	"strings"
	"time"
)

// humanDuration formats d for a person reading a table: two significant
// units at most, the way an operator says it ("1h2m", "4.2s", "350ms").
// time.Duration's own String is exact ("1h2m3.456789s") and too wide for a
// column; the exact values are in --json.
func humanDuration(d time.Duration) string {
	if d < 0 {
		// Only a clock step makes a time left or an age negative; show it
		// rather than hide it.
		return "-" + humanDuration(-max(d, -math.MaxInt64))
	}
	if d == 0 {
		return "0s"
	}
	// Below a minute: one decimal under ten of the unit, whole units up to
	// the next one. Each step rounds at its own precision, and a value that
	// rounds up past the step's end is formatted by the next step, so 999.96ms
	// is "1s", never "1000ms".
	for _, u := range []struct {
		unit time.Duration
		name string
		next time.Duration // where the next unit takes over
	}{
		{time.Nanosecond, "ns", time.Microsecond},
		{time.Microsecond, "µs", time.Millisecond},
		{time.Millisecond, "ms", time.Second},
		{time.Second, "s", time.Minute},
	} {
		if u.unit > time.Nanosecond {
			if r := d.Round(u.unit / 10); r < 10*u.unit {
				return trimPointZero(strconv.FormatFloat(float64(r)/float64(u.unit), 'f', 1, 64)) + u.name
			}
		}
		if r := d.Round(u.unit); r < u.next {
			return strconv.FormatInt(int64(r/u.unit), 10) + u.name
		}
	}
	// From a minute on: the unit and the one below it, rounded to the one
	// below ("1m2s", "1h2m", "3d4h"), the lower one left out when it is 0.
	for _, u := range []struct {
		big, small   time.Duration
		bname, sname string
		next         time.Duration
	}{
		{time.Minute, time.Second, "m", "s", time.Hour},
		{time.Hour, time.Minute, "h", "m", 24 * time.Hour},
		{24 * time.Hour, time.Hour, "d", "h", 0},
	} {
		r := d.Round(u.small)
		if u.next != 0 && r >= u.next {
			continue
		}
		s := strconv.FormatInt(int64(r/u.big), 10) + u.bname
		if rest := (r % u.big) / u.small; rest != 0 {
			s += strconv.FormatInt(int64(rest), 10) + u.sname
		}
		return s
	}
	panic("unreachable")
}

// humanBytes formats a byte count in binary units: "0 B", "512 B",
// "1.5 KiB", "3.2 MiB", "120 GiB". One decimal under ten of a unit, whole
// units above, as ls -h and ss do.
func humanBytes(n uint64) string {
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n)
	for i, u := range units {
		v /= 1024
		// Round as the output will, so that 1023.96 KiB becomes "1.0 MiB"
		// and not "1024 KiB".
		if v < 9.95 {
			return trimPointZero(strconv.FormatFloat(v, 'f', 1, 64)) + " " + u
		}
		if v < 1023.5 || i == len(units)-1 {
			return strconv.FormatFloat(v, 'f', 0, 64) + " " + u
		}
	}
	panic("unreachable")
}

// trimPointZero drops a ".0" decimal: "4.0" is "4".
func trimPointZero(s string) string {
	return strings.TrimSuffix(s, ".0")
}
