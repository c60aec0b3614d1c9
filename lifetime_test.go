package tcpops

import (
	"encoding/binary"
	"errors"
	"math"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"go.uber.org/zap"
)

// A lifetime, max_lifetime or grace at the end of time.Duration's range,
// however it got past the config's maxima, neither ends its connection at
// once nor stops any other connection's timer: the schedule's sums
// saturate instead of wrapping negative.
func TestDeadlineAtTheEndOfTimeDelaysNoOther(t *testing.T) {
	for _, huge := range []Options{
		{Lifetime: OptionalDuration(math.MaxInt64)},
		{MaxLifetime: OptionalDuration(math.MaxInt64)},
		{Lifetime: OptionalDuration(math.MaxInt64 - int64(time.Hour)), MaxLifetime: OptionalDuration(math.MaxInt64 - 1)},
	} {
		r := quietRegistry()
		tr := simTracker()
		mk := func(o *Options) *Conn {
			tc := socketPair(t)
			c := &Conn{Conn: tc, tcp: tc, start: time.Now(), tracker: tr}
			r.add(c)
			c.update(o, zap.NewNop())
			t.Cleanup(func() { c.end(ReasonClosed, CauseEOF) })
			return c
		}
		long := mk(&huge)
		short := mk(&Options{Lifetime: OptionalDuration(50 * time.Millisecond)})
		deadline := time.Now().Add(10 * time.Second)
		for !short.isEnded() {
			if time.Now().After(deadline) {
				t.Fatalf("%+v on one connection: another's 50ms lifetime has not fired after 10s", huge)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if reason, cause := short.endedWith(); reason != ReasonTimeout || cause != CauseLifetime {
			t.Fatalf("the short connection ended %s/%s, want timeout/lifetime", reason, cause)
		}
		if long.isEnded() {
			reason, cause := long.endedWith()
			t.Fatalf("%+v: the connection ended at once (%s/%s)", huge, reason, cause)
		}
		if lt, ml := long.timesLeft(); lt < 0 && ml < 0 || lt >= 0 && lt < time.Hour || ml >= 0 && ml < time.Hour {
			t.Fatalf("%+v: times left %v, %v", huge, lt, ml)
		}
	}
}

func TestAddSat(t *testing.T) {
	for _, c := range []struct{ a, b, want int64 }{
		{1, 2, 3},
		{math.MaxInt64, 1, math.MaxInt64},
		{math.MaxInt64 - 5, 5, math.MaxInt64},
		{math.MaxInt64 - 5, 6, math.MaxInt64},
		{1 << 62, 1 << 62, math.MaxInt64},
		{5, -3, 2},
		{math.MaxInt64, math.MaxInt64, math.MaxInt64},
	} {
		if got := addSat(c.a, c.b); got != c.want {
			t.Errorf("addSat(%d, %d) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
}

// FuzzDeadlines drives a schedule with random schedule and unschedule
// operations, deadlines anywhere in int64 (math.MaxInt64 and negative ones
// included) and a clock that moves to random points, and checks that
// popDue returns every entry that is due and none that is not, and that
// the timer is always armed no later than the earliest deadline.
func FuzzDeadlines(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17})
	f.Add(binary.BigEndian.AppendUint64([]byte{1, 0}, math.MaxUint64>>1))
	f.Add(binary.BigEndian.AppendUint64([]byte{1, 2}, 1<<63))
	f.Fuzz(func(t *testing.T, ops []byte) {
		d := &deadlines{manual: true}
		conns := make([]*Conn, 8)
		for i := range conns {
			conns[i] = &Conn{}
		}
		want := map[*Conn]int64{}
		for len(ops) >= 2 {
			op, c := ops[0]%3, conns[ops[1]%8]
			ops = ops[2:]
			var v int64
			if len(ops) >= 8 {
				v = int64(binary.BigEndian.Uint64(ops))
				ops = ops[8:]
			}
			switch op {
			case 0:
				d.unschedule(c)
				delete(want, c)
			case 1:
				d.schedule(c, v)
				want[c] = v
			case 2: // the clock reaches v
				due := d.popDue(v)
				got := map[*Conn]bool{}
				for _, c := range due {
					if w, ok := want[c]; !ok || w > v {
						t.Fatalf("at %d: fired an entry due at %d (scheduled: %v)", v, w, ok)
					}
					got[c] = true
					delete(want, c)
				}
				for c, w := range want {
					if w <= v {
						t.Fatalf("at %d: an entry due at %d did not fire", v, w)
					}
					_ = c
				}
			}
			if len(d.heap) != len(want) {
				t.Fatalf("%d scheduled, want %d", len(d.heap), len(want))
			}
			if len(d.heap) > 0 && (!d.armed || d.armedAt > d.heap[0].when) {
				t.Fatalf("timer armed %v for %d, after the earliest deadline %d", d.armed, d.armedAt, d.heap[0].when)
			}
			for i, e := range d.heap {
				if int(e.c.sched) != i+1 || want[e.c] != e.when {
					t.Fatalf("entry %d: sched %d, when %d; want %d, %d", i, e.c.sched, e.when, i+1, want[e.c])
				}
			}
		}
	})
}

// A timer's decision to end a connection is the end: a PATCH racing it
// either comes first, and counts, or finds the connection ended, and is
// answered 404 with the end's reason. Nothing can take c.mu between the
// timer's decision and the end (the registry's decided hook probes it
// there), and a change after the end says why it ended.
func TestTimerEndIsAtomicWithChange(t *testing.T) {
	r := quietRegistry()
	var probed, gap atomic.Bool
	r.deadlines.decided = func(c *Conn) {
		probed.Store(true)
		if c.mu.TryLock() { // a PATCH could have run here
			gap.Store(true)
			c.mu.Unlock()
		}
	}
	tc := socketPair(t)
	c := &Conn{Conn: tc, tcp: tc, start: time.Now(), tracker: simTracker()}
	r.add(c)
	c.update(&Options{Lifetime: OptionalDuration(30 * time.Millisecond)}, zap.NewNop())
	t.Cleanup(func() { c.end(ReasonClosed, CauseEOF) })
	eventually(t, 10*time.Second, "the lifetime's end", c.isEnded)
	if reason, cause := c.endedWith(); reason != ReasonTimeout || cause != CauseLifetime || !probed.Load() {
		t.Fatalf("ended %s/%s (the hook ran: %v), want timeout/lifetime from the timer", reason, cause, probed.Load())
	}
	if gap.Load() {
		t.Fatal("the timer released c.mu between its decision to end the connection and the end: a PATCH there is answered 200, then undone")
	}
	err := c.change(&Options{Lifetime: OptionalDuration(time.Hour)}, zap.NewNop(), true)
	if !errors.Is(err, errConnEnded) {
		t.Fatalf("a change after the end: %v, want errConnEnded", err)
	}
	var apiErr caddy.APIError
	if !errors.As(changeError(c, err), &apiErr) || apiErr.HTTPStatus != 404 || !strings.Contains(apiErr.Error(), "ended (timeout, lifetime)") {
		t.Fatalf("the answer to a change after the end: %v, want 404 with the end's reason", changeError(c, err))
	}
}
