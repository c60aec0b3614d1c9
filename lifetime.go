package tcpops

import "time"

// The lifetime and max_lifetime are enforced by one timer per connection
// that closes it, not by socket deadlines: caddy-l4's matching and Go's HTTP
// server both set and clear deadlines, which would wipe ours. The data path
// only stores the time of the last activity; the timer, when it fires, works
// out whether the connection really is idle and re-arms itself if not. So a
// busy connection costs one timer wake-up per lifetime, not one reset per
// Read.

// armLocked (re)starts the timer for the earliest of the lifetime and the
// max_lifetime deadlines, or stops it when neither is set. c.mu must be held.
func (c *Conn) armLocked(now time.Duration) {
	wait, ok := c.nextExpiryLocked(now)
	if !ok {
		if c.timer != nil {
			c.timer.Stop()
		}
		return
	}
	if wait < 0 {
		wait = 0
	}
	if c.timer == nil {
		c.timer = time.AfterFunc(wait, c.onTimer)
		return
	}
	c.timer.Reset(wait)
}

// nextExpiryLocked returns how long from now the earliest deadline is, and
// false when no deadline is set. c.mu must be held.
func (c *Conn) nextExpiryLocked(now time.Duration) (time.Duration, bool) {
	var wait time.Duration
	ok := false
	if lt := c.opts.Lifetime.Duration(); lt > 0 {
		wait, ok = c.lifetimeStartLocked()+lt-now, true
	}
	if ml := c.maxLifetime; ml > 0 {
		if d := ml - now; !ok || d < wait {
			wait, ok = d, true
		}
	}
	return wait, ok
}

// lifetimeStartLocked returns when (after start) the lifetime started to
// run: the last activity, or the moment the lifetime was set if that is
// later. c.mu must be held.
func (c *Conn) lifetimeStartLocked() time.Duration {
	return max(time.Duration(c.lastActive.Load()), c.lifetimeFrom)
}

// onTimer runs when a deadline may have passed. Activity since the timer was
// armed moves the lifetime deadline on, so it checks before it closes.
func (c *Conn) onTimer() {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return
	}
	now := c.since()
	cause := ""
	if ml := c.maxLifetime; ml > 0 && now >= ml {
		cause = CauseMaxLifetime
	} else if lt := c.opts.Lifetime.Duration(); lt > 0 && now-c.lifetimeStartLocked() >= lt {
		cause = CauseLifetime
	}
	if cause == "" {
		c.armLocked(now)
		c.mu.Unlock()
		c.tracker.rearmed()
		return
	}
	c.mu.Unlock()
	c.closeWith(ReasonTimeout, cause)
}

// timesLeft returns how long until the lifetime and the max_lifetime expire;
// a negative value means that limit is not set.
func (c *Conn) timesLeft() (lifetime, maxLifetime time.Duration) {
	now := c.since()
	c.mu.Lock()
	defer c.mu.Unlock()
	lifetime, maxLifetime = -1, -1
	if lt := c.opts.Lifetime.Duration(); lt > 0 {
		lifetime = max(0, c.lifetimeStartLocked()+lt-now)
	}
	if ml := c.maxLifetime; ml > 0 {
		maxLifetime = max(0, ml-now)
	}
	return lifetime, maxLifetime
}
