package tcpops

import (
	"math"
	"sync"
	"time"
)

// The lifetime and max_lifetime are enforced by timers that close the
// connection, not by socket deadlines: caddy-l4's matching and Go's HTTP
// server both set and clear deadlines, which would wipe ours. The data path
// only stores the time of the last activity; a connection's timer, when it
// fires, works out whether the connection really is idle and re-arms itself
// if not. So a busy connection costs one timer wake-up per lifetime, not
// one reset per Read.
//
// On a connection an HTTP server serves (httpstate.go), what the server
// reports moves the deadlines too: the lifetime waits while a request is in
// flight, and max_lifetime drains (drain.go). dueLocked weighs it all, for
// the timer and for each report alike.
//
// The timers of all connections are one schedule per registry (deadlines):
// a heap of the next deadline of each connection, under one runtime timer
// for the earliest. A runtime timer per connection (time.AfterFunc) costs
// about 150 bytes (its runtime timer and the closure); an entry of the heap
// costs 16, which matters at a registrar's million connections
// (BENCHMARKS.md). Due connections are handled each in a goroutine of its
// own, as AfterFunc would, so that one slow close does not delay the next.

// epoch is the origin of the schedule's clock: deadlines are monotonic
// nanoseconds since it. Set once, never changed.
var epoch = time.Now()

// monoNow returns the schedule's clock.
func monoNow() int64 { return int64(time.Since(epoch)) }

// addSat returns a + b for durations that are not negative, or the longest
// duration where that would overflow. Every deadline is such a sum (the
// process's clock plus a wait, max_lifetime plus its grace, the last
// activity plus the lifetime): the config's maxima keep them far from
// overflowing (options.go), and this keeps a value that got past them from
// wrapping negative, where it would be due at once and, at the head of the
// schedule, stand before every other connection's deadline.
func addSat[D ~int64](a, b D) D {
	if b > 0 && a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// deadlines is a registry's schedule of connection deadlines.
type deadlines struct {
	mu      sync.Mutex
	heap    []deadline  // a binary min-heap by when; Conn.sched is 1 + its index
	timer   *time.Timer // fires at armedAt for heap[0]
	armed   bool        // the timer is set to fire
	armedAt int64       // when it fires, if armed
	// manual leaves the runtime timer alone: armedAt only records when it
	// would fire, and a test calls popDue with a clock of its own.
	manual bool
	// decided, when set (by a test), runs where a timer has decided to end
	// c and is about to: c.mu is held there, and nothing else may run
	// between the decision and the end.
	decided func(c *Conn)
}

// deadline is an entry of the schedule: when c's timer fires.
type deadline struct {
	when int64
	c    *Conn
}

// schedule sets c's timer to fire at when (on the monoNow clock).
func (d *deadlines) schedule(c *Conn, when int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i := int(c.sched) - 1; i >= 0 {
		old := d.heap[i].when
		d.heap[i].when = when
		if when < old {
			d.up(i)
		} else {
			d.down(i)
		}
	} else {
		d.heap = append(d.heap, deadline{when, c})
		c.sched = int32(len(d.heap))
		d.up(len(d.heap) - 1)
	}
	if first := d.heap[0].when; !d.armed || first < d.armedAt {
		d.armLocked(first)
	}
}

// unschedule stops c's timer; stopping one that is not set is harmless.
func (d *deadlines) unschedule(c *Conn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.removeLocked(c)
	// The runtime timer stays armed for what was the earliest; when it
	// fires it finds nothing due and arms itself for the next.
	if len(d.heap) == 0 && cap(d.heap) > 1024 {
		d.heap = nil // give back the memory of a burst that is over
	}
}

func (d *deadlines) removeLocked(c *Conn) {
	i := int(c.sched) - 1
	if i < 0 {
		return
	}
	c.sched = 0
	last := len(d.heap) - 1
	if i != last {
		d.heap[i] = d.heap[last]
		d.heap[i].c.sched = int32(i + 1)
	}
	d.heap[last] = deadline{}
	d.heap = d.heap[:last]
	if i != last {
		d.down(i)
		d.up(i)
	}
}

// armLocked arms the runtime timer to fire at when. d.mu must be held.
func (d *deadlines) armLocked(when int64) {
	d.armed, d.armedAt = true, when
	if d.manual {
		return
	}
	wait := time.Duration(when - monoNow())
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
		return
	}
	d.timer.Reset(wait)
}

// fire runs the timers that are due, each in a goroutine of its own, and
// arms the runtime timer for the next.
func (d *deadlines) fire() {
	for _, c := range d.popDue(monoNow()) {
		go c.onTimer()
	}
}

// popDue takes every entry due at now (when <= now) off the schedule and
// returns their connections, and arms the runtime timer for the next.
func (d *deadlines) popDue(now int64) []*Conn {
	var due []*Conn
	d.mu.Lock()
	defer d.mu.Unlock()
	d.armed = false
	for len(d.heap) > 0 && d.heap[0].when <= now {
		c := d.heap[0].c
		d.removeLocked(c)
		due = append(due, c)
	}
	if len(d.heap) > 0 {
		d.armLocked(d.heap[0].when)
	}
	return due
}

func (d *deadlines) less(i, j int) bool { return d.heap[i].when < d.heap[j].when }

func (d *deadlines) swap(i, j int) {
	d.heap[i], d.heap[j] = d.heap[j], d.heap[i]
	d.heap[i].c.sched = int32(i + 1)
	d.heap[j].c.sched = int32(j + 1)
}

func (d *deadlines) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !d.less(i, parent) {
			return
		}
		d.swap(i, parent)
		i = parent
	}
}

func (d *deadlines) down(i int) {
	for n := len(d.heap); ; {
		smallest := i
		if l := 2*i + 1; l < n && d.less(l, smallest) {
			smallest = l
		}
		if r := 2*i + 2; r < n && d.less(r, smallest) {
			smallest = r
		}
		if smallest == i {
			return
		}
		d.swap(i, smallest)
		i = smallest
	}
}

// deadlines returns the schedule c's timer is in: its registry's, or for a
// connection made by hand in a test, the process registry's.
func (c *Conn) deadlines() *deadlines {
	if c.reg != nil {
		return &c.reg.deadlines
	}
	return &connections.deadlines
}

// due is what a connection's deadlines call for: nothing yet (cause empty),
// or an end for cause, closed hard or, on an idle HTTP connection,
// gracefully (drain.go).
type due struct {
	cause    string
	graceful bool
	goaway   bool // plaintext HTTP/2: send GOAWAY and PING first (h2close.go)
}

// dueLocked returns the end c's deadlines call for at now, if any; else how
// long until the next deadline, and false when there is none. c.mu must be
// held.
func (c *Conn) dueLocked(now time.Duration) (d due, wait time.Duration, ok bool) {
	if h := c.http; h != nil && h.lingerCause != "" {
		return c.lingerDueLocked(now) // closed gracefully: only the linger is left (httpstate.go)
	}
	if d, wait, ok, handled := c.h2DueLocked(now); handled {
		return d, wait, ok
	}
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
		d = due{cause: cause, graceful: true}
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
				cut := addSat(ml, g)
				if now >= cut {
					return due{cause: CauseMaxLifetimeGrace}, 0, true
				}
				next(cut - now)
			}
		}
	}
	if lt := c.opts.Lifetime.Duration(); lt > 0 && phase != httpActive {
		end := addSat(c.lifetimeStartLocked(), lt)
		switch {
		case now < end:
			next(end - now)
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

// armForLocked starts c's timer to fire in wait, or stops it when !ok.
// c.mu must be held.
func (c *Conn) armForLocked(wait time.Duration, ok bool) {
	if !ok {
		c.deadlines().unschedule(c)
		return
	}
	c.deadlines().schedule(c, addSat(monoNow(), int64(max(wait, 0))))
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
	if d.goaway {
		return c.startGoAwayLocked(d, now)
	}
	// The end is marked in the critical section that found it due: a
	// PATCH raising the lifetime, or a request starting, either came
	// before and was weighed here, or finds the connection ended.
	if hook := c.deadlines().decided; hook != nil {
		hook(c)
	}
	if d.graceful {
		// The graceful close is decided here too: its FIN goes out now,
		// and a PATCH from now on is refused with its cause
		// (Conn.change), though the end is reported when the linger
		// closes the socket.
		return c.closeGracefullyLocked(d.cause, now)
	}
	c.closeWithLocked(ReasonTimeout, d.cause)
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
			lifetime = min(lt, max(0, addSat(c.lifetimeStartLocked(), lt)-now))
		}
	}
	if ml := c.maxLifetime; ml > 0 {
		maxLifetime = max(0, ml-now)
	}
	return lifetime, maxLifetime
}
