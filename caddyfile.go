package tcpops

import (
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	tcpops {
//		keepalive <idle> <count> <interval>
//		keepalive off|on
//		keepalive {
//			idle <duration>
//			count <n>
//			interval <duration>
//		}
//		user_timeout <duration>|off
//		lifetime <duration>|off
//		max_lifetime <duration>|off
//		max_lifetime_jitter <percent>
//		events on|off
//		stats_period <duration>|off
//	}
//
// Durations take Caddy's forms (90s, 1m30s, 1d); a bare integer means
// seconds, as in Kamailio's tcpops. max_lifetime_grace, which the listener
// wrapper takes, is refused here: see Handler.Validate.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if err := h.Options.unmarshalCaddyfileFor(d, true); err != nil {
		return err
	}
	if err := h.validateRoute(); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

// unmarshalCaddyfile parses a tcpops block into o and validates it, so that
// `caddy adapt` already rejects what Provision would. It takes every
// option, as the listener wrapper does.
func (o *Options) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return o.unmarshalCaddyfileFor(d, false)
}

// unmarshalCaddyfileFor is unmarshalCaddyfile for a caddy-l4 route when
// route is set: the options an unknown one is told to choose from are then
// those a route takes, without max_lifetime_grace (which the route parses
// only to refuse it with the reason, in Handler.validateRoute).
func (o *Options) unmarshalCaddyfileFor(d *caddyfile.Dispenser, route bool) error {
	d.Next() // consume the directive name
	name := d.Val()
	if d.CountRemainingArgs() > 0 {
		return d.Errf("%s: takes no arguments on its own line, only a block", name)
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("%s: duplicate option '%s'", name, opt)
		}
		seen[opt] = true
		var err error
		switch opt {
		case "keepalive":
			o.Keepalive, err = parseKeepalive(d, name)
		case "user_timeout":
			o.UserTimeout, err = parseOptionalDurationArg(d, name, opt, checkUserTimeout)
		case "lifetime", "max_lifetime", "max_lifetime_grace":
			var v OptionalDuration
			v, err = parseOptionalDurationArg(d, name, opt, func(v time.Duration) error { return checkPositive(opt, v) })
			switch opt {
			case "lifetime":
				o.Lifetime = v
			case "max_lifetime":
				o.MaxLifetime = v
			default:
				o.MaxLifetimeGrace = v
			}
		case "max_lifetime_jitter":
			o.MaxLifetimeJitter, err = parseJitterArg(d, name, opt)
		case "events":
			o.Events, err = parseOnOff(d, name, opt)
		case "stats_period":
			o.StatsPeriod, err = parseOptionalDurationArg(d, name, opt, checkStatsPeriod)
		default:
			if route {
				return d.Errf("%s: unknown option '%s' (want keepalive, user_timeout, lifetime, max_lifetime, max_lifetime_jitter, events or stats_period)", name, opt)
			}
			return d.Errf("%s: unknown option '%s' (want keepalive, user_timeout, lifetime, max_lifetime, max_lifetime_jitter, max_lifetime_grace, events or stats_period)", name, opt)
		}
		if err != nil {
			return err
		}
	}
	if err := o.Validate(); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

// parseOptionalDurationArg parses "<opt> <duration>|off" with no block, and
// checks a duration (0 included: in the Caddyfile it is a value, not "unset").
func parseOptionalDurationArg(d *caddyfile.Dispenser, name, opt string, check func(time.Duration) error) (OptionalDuration, error) {
	if d.CountRemainingArgs() != 1 {
		return 0, d.Errf("%s: %s takes exactly one argument, a duration or off; got %d", name, opt, d.CountRemainingArgs())
	}
	d.NextArg()
	v, err := parseOptionalDuration(d.Val())
	if errors.Is(err, errOutOfRange) {
		// Give the option's range, not time.Duration's.
		longest := maxLifetimeValue
		if opt == "user_timeout" {
			longest = maxUserTimeout
		}
		if rangeErr := check(longest + time.Millisecond); rangeErr != nil {
			_, why, _ := strings.Cut(rangeErr.Error(), ": must be")
			return 0, d.Errf("tcpops: %s %s: out of range: must be%s", opt, d.Val(), why)
		}
	}
	if err != nil {
		return 0, d.Errf("%s: %s: %v", name, opt, err)
	}
	if err := noBlock(d, name, opt); err != nil {
		return 0, err
	}
	if !v.IsOff() {
		if err := check(v.Duration()); err != nil {
			return 0, d.Err(asWritten(err, opt, v.Duration(), d.Val()).Error())
		}
	}
	return v, nil
}

// asWritten puts a value back into a range error as it was written: the
// checks name a duration as Go prints it, and "keepalive idle 9h6m8s: must
// be between 1s and 32767s" does not say which value of the config was
// 32768. field is what the error names before the value ("keepalive
// idle", "lifetime"); an error that does not name d so is returned as it
// is.
func asWritten(err error, field string, d time.Duration, written string) error {
	canonical := " " + field + " " + d.String() + ":"
	msg := err.Error()
	if written == d.String() || !strings.Contains(msg, canonical) {
		return err
	}
	return errors.New(strings.Replace(msg, canonical, " "+field+" "+written+":", 1))
}

// parseJitterArg parses "<opt> <percent>" with no block, and checks it.
func parseJitterArg(d *caddyfile.Dispenser, name, opt string) (*Percent, error) {
	if d.CountRemainingArgs() != 1 {
		return nil, d.Errf("%s: %s takes exactly one argument, a percentage such as 10%%; got %d", name, opt, d.CountRemainingArgs())
	}
	d.NextArg()
	f, err := parsePercent(d.Val())
	if err != nil {
		return nil, d.Errf("%s: %s: %v", name, opt, err)
	}
	if err := noBlock(d, name, opt); err != nil {
		return nil, err
	}
	if err := checkJitter(f); err != nil {
		return nil, d.Err(err.Error())
	}
	p := Percent(f)
	return &p, nil
}

// parseOnOff parses "<opt> on|off" with no block.
func parseOnOff(d *caddyfile.Dispenser, name, opt string) (*bool, error) {
	if d.CountRemainingArgs() != 1 {
		return nil, d.Errf("%s: %s takes exactly one argument, on or off; got %d", name, opt, d.CountRemainingArgs())
	}
	d.NextArg()
	var on bool
	switch d.Val() {
	case "on":
		on = true
	case "off":
	default:
		return nil, d.Errf("%s: %s %q: want on or off", name, opt, d.Val())
	}
	if err := noBlock(d, name, opt); err != nil {
		return nil, err
	}
	return &on, nil
}

// parseKeepalive parses the three keepalive forms: Kamailio's positional
// "<idle> <count> <interval>", "off" or "on", and a block.
func parseKeepalive(d *caddyfile.Dispenser, name string) (*Keepalive, error) {
	ka := new(Keepalive)
	args := d.RemainingArgs()
	switch len(args) {
	case 0:
		outer := d.Nesting()
		if !d.NextBlock(outer) {
			return nil, d.Errf("%s: keepalive needs <idle> <count> <interval>, off, on, or a block", name)
		}
		return ka, parseKeepaliveBlock(d, name, ka, outer)
	case 1:
		switch args[0] {
		case "off":
			ka.Off = true
		case "on":
		default:
			return nil, d.Errf("%s: keepalive %q: want off, on, <idle> <count> <interval>, or a block", name, args[0])
		}
	case 3:
		var err error
		if ka.Idle, err = parseKeepaliveSeconds(d, name, "idle", args[0]); err != nil {
			return nil, err
		}
		if ka.Count, err = parseKeepaliveCount(d, name, args[1]); err != nil {
			return nil, err
		}
		if ka.Interval, err = parseKeepaliveSeconds(d, name, "interval", args[2]); err != nil {
			return nil, err
		}
	default:
		return nil, d.Errf("%s: keepalive takes 1 or 3 arguments (off|on, or <idle> <count> <interval>); got %d", name, len(args))
	}
	return ka, noBlock(d, name, "keepalive")
}

// parseKeepaliveBlock parses the block form; the dispenser is on its first
// option, and outer is the nesting level the block opened from.
func parseKeepaliveBlock(d *caddyfile.Dispenser, name string, ka *Keepalive, outer int) error {
	seen := make(map[string]bool)
	for ok := true; ok; ok = d.NextBlock(outer) {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("%s: duplicate keepalive option '%s'", name, opt)
		}
		seen[opt] = true
		if opt != "idle" && opt != "count" && opt != "interval" {
			return d.Errf("%s: unknown keepalive option '%s' (want idle, count or interval)", name, opt)
		}
		if d.CountRemainingArgs() != 1 {
			return d.Errf("%s: keepalive %s takes exactly one argument; got %d", name, opt, d.CountRemainingArgs())
		}
		d.NextArg()
		var err error
		switch opt {
		case "idle":
			ka.Idle, err = parseKeepaliveSeconds(d, name, opt, d.Val())
		case "interval":
			ka.Interval, err = parseKeepaliveSeconds(d, name, opt, d.Val())
		case "count":
			ka.Count, err = parseKeepaliveCount(d, name, d.Val())
		}
		if err != nil {
			return err
		}
		if err := noBlock(d, name, "keepalive "+opt); err != nil {
			return err
		}
	}
	return nil
}

func parseKeepaliveSeconds(d *caddyfile.Dispenser, name, field, s string) (Duration, error) {
	v, err := parseDuration(s)
	if err != nil {
		return 0, d.Errf("%s: keepalive %s: %v", name, field, err)
	}
	if v == 0 {
		// 0 would mean "unchanged" in JSON; in the Caddyfile it is a value,
		// and the kernel rejects it.
		v = -1
	}
	if err := validateKeepaliveSeconds(field, Duration(v)); err != nil {
		if v == -1 {
			return 0, d.Errf("tcpops: keepalive %s %s: must be between %ds and %ds", field, s, minKeepaliveSeconds, maxKeepaliveSeconds)
		}
		return 0, d.Err(asWritten(err, "keepalive "+field, v, s).Error())
	}
	return Duration(v), nil
}

func parseKeepaliveCount(d *caddyfile.Dispenser, name, s string) (int, error) {
	n, err := strconv.Atoi(s)
	if errors.Is(err, strconv.ErrRange) {
		return 0, d.Errf("tcpops: keepalive count %s: out of range: must be between %d and %d", s, minKeepaliveCount, maxKeepaliveCount)
	}
	if err != nil {
		return 0, d.Errf("%s: keepalive count %q: not a whole number", name, s)
	}
	if n == 0 {
		return 0, d.Errf("tcpops: keepalive count 0: must be between %d and %d", minKeepaliveCount, maxKeepaliveCount)
	}
	if err := validateKeepaliveCount(n); err != nil {
		return 0, d.Err(err.Error())
	}
	return n, nil
}

// noBlock rejects a block after an option that takes none, an empty one
// ("lifetime 10 { }") included: Dispenser.NextBlock reports an empty block
// as no block and steps over it, and NextArg stops before a brace, so the
// block is told by its opening brace on the option's line.
func noBlock(d *caddyfile.Dispenser, name, opt string) error {
	file, line := d.File(), d.Line()
	if !d.Next() {
		return nil
	}
	open := d.Val() == "{" && d.File() == file && d.Line() == line
	d.Prev()
	if open {
		return d.Errf("%s: %s does not take a block", name, opt)
	}
	return nil
}
