package tcpops

import "time"

// The lifetime and max_lifetime are enforced by one timer per connection
// that closes it, not by socket deadlines: caddy-l4's matching and Go's HTTP
// server both set and clear deadlines, which would wipe ours. The data path
// only stores the time of the last activity; the timer, when it fires, works
// out whether the connection really is idle and re-arms itself if not. So a
// busy connection costs one timer wake-up per lifetime, not one reset per
// Read.
//
// On a connection an HTTP server serves (httpstate.go), what the server
// reports moves the deadlines too: the lifetime waits while a request is in
// flight, and max_lifetime drains (drain.go). dueLocked weighs it all, for
// the timer and for each report alike.

// due is what a connection's deadlines call for: nothing yet (cause empty),
// or an end for cause, closed hard or, on an idle HTTP connection,
// gracefully (drain.go).
type due struct {
	cause    string
	graceful bool
}

// dueLocked returns the end c's deadlines call for at now, if any; else how
// long until the next deadline, and false when there is none. c.mu must be
// held.
func (c *Conn) dueLocked(now time.Duration) (d due, wait time.Duration, ok bool) {
	next := func(w time.Duration) {
		if !ok || w < wait {
			wait, ok = w, true
		}
	}
	// idleEnd ends an idle HTTP connection gracefully for cause, once it
	// is quiet (httpstate.go), and reports whether that is now.
	idleEnd := func(cause string) bool {
		if w := c.quietLocked(now); w > 0 {
			next(w)
			return false
		}
		d = due{cause, true}
		return true
	}
	phase := c.httpPhaseLocked()
	if ml := c.maxLifetime; ml > 0 {
		switch {
		case now < ml:
			next(ml - now)
		case phase == httpUnseen:
			return due{cause: CauseMaxLifetime}, 0, true
		case phase == httpIdle:
			if idleEnd(CauseMaxLifetime) {
				return d, 0, true
			}
		default: // requests in flight: they may finish within the grace
			if g := c.graceLocked(); g > 0 {
				if now >= ml+g {
					return due{cause: CauseMaxLifetimeGrace}, 0, true
				}
				next(ml + g - now)
			}
		}
	}
	if lt := c.opts.Lifetime.Duration(); lt > 0 && phase != httpActive {
		start := c.lifetimeStartLocked()
		switch {
		case now-start < lt:
			next(start + lt - now)
		case phase != httpIdle:
			return due{cause: CauseLifetime}, 0, true
		default:
			if idleEnd(CauseLifetime) {
				return d, 0, true
			}
		}
	}
	return due{}, wait, ok
}

// armLocked (re)starts the timer for the earliest deadline, or stops it when
// there is none. c.mu must be held.
func (c *Conn) armLocked(now time.Duration) {
	d, wait, ok := c.dueLocked(now)
	if d.cause != "" {
		wait, ok = 0, true // the timer closes it
	}
	c.armForLocked(wait, ok)
}

// armForLocked starts the timer to fire in wait, or stops it when !ok.
func (c *Conn) armForLocked(wait time.Duration, ok bool) {
	if !ok {
		if c.timer != nil {
			c.timer.Stop()
		}
		return
	}
	wait = max(wait, 0)
	if c.timer == nil {
		c.timer = time.AfterFunc(wait, c.onTimer)
		return
	}
	c.timer.Reset(wait)
}

// lifetimeStartLocked returns when (after start) the lifetime started to
// run: the last activity, or the moment the lifetime was set if that is
// later. On an idle HTTP connection bytes do not count: its lifetime runs
// from when it last went idle (lifetimeFrom), or was set. c.mu must be held.
func (c *Conn) lifetimeStartLocked() time.Duration {
	if c.httpPhaseLocked() == httpIdle {
		return c.lifetimeFrom
	}
	return max(time.Duration(c.lastActive.Load()), c.lifetimeFrom)
}

// httpPhaseLocked returns what the HTTP server last reported about c;
// httpUnseen for a connection no HTTP server reports on. c.mu must be held.
func (c *Conn) httpPhaseLocked() httpPhase {
	if c.http == nil {
		return httpUnseen
	}
	return c.http.phase
}

// onTimer runs when a deadline may have passed. Activity since the timer was
// armed moves the lifetime deadline on, so it checks before it closes.
func (c *Conn) onTimer() {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	if c.settleLocked(c.since()) {
		c.tracker.rearmed()
	}
}

// settleLocked ends c if a deadline is due at now, else re-arms its timer
// for the next one, or stops it. It reports whether it re-armed the timer.
// c.mu must be held; it is released.
func (c *Conn) settleLocked(now time.Duration) (rearmed bool) {
	d, wait, ok := c.dueLocked(now)
	if d.cause == "" {
		c.armForLocked(wait, ok)
		c.mu.Unlock()
		return ok
	}
	c.mu.Unlock()
	if d.graceful {
		c.closeGracefully(d.cause)
	} else {
		c.closeWith(ReasonTimeout, d.cause)
	}
	return false
}

// timesLeft returns how long until the lifetime and the max_lifetime expire;
// a negative value means that limit is not set. While an HTTP request is in
// flight the lifetime does not run: all of it is left.
func (c *Conn) timesLeft() (lifetime, maxLifetime time.Duration) {
	now := c.since()
	c.mu.Lock()
	defer c.mu.Unlock()
	lifetime, maxLifetime = -1, -1
	if lt := c.opts.Lifetime.Duration(); lt > 0 {
		lifetime = lt
		if c.httpPhaseLocked() != httpActive {
			lifetime = min(lt, max(0, c.lifetimeStartLocked()+lt-now))
		}
	}
	if ml := c.maxLifetime; ml > 0 {
		maxLifetime = max(0, ml-now)
	}
	return lifetime, maxLifetime
}
