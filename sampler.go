package tcpops

import (
	"sync"
	"sync/atomic"
	"time"
)

// statsSampler is a registry's list of the connections that stats_period
// samples while they live (tcpstats.go). It adds no goroutine or timer: the
// registry's sweeper, which wakes once a sweepInterval, walks it (step), and
// runs while the list has connections, as it does while connections are
// watched. So a period is whole seconds (checkStatsPeriod), and a sample
// comes up to a sweepInterval after it is due.
//
// Each entry keeps its connection's period and next due time beside the
// pointers, so that a wake-up that samples nobody compares integers and
// chases no pointer: at 18,000 connections with stats_period 10s, a
// wake-up looks at 18,000 entries and finds the 1,800 due
// (BenchmarkScaleIdleCPUStats). The entry also holds what the metrics have
// of the connection (connStats), until its end takes it (take): a Conn
// holds only its place in the list, in 4 bytes that were padding, so that
// it stays in its 320-byte allocation class (BENCHMARKS.md).
type statsSampler struct {
	mu   sync.Mutex
	list []sampled    // Conn.statsIdx of each is 1 + its index
	n    atomic.Int64 // len(list), for the sweeper to read without the lock
}

// sampled is an entry of the sampler's list.
type sampled struct {
	c  *Conn
	cs *connStats
	// period is 0 for a connection whose stats_period was switched off:
	// it is not sampled any more, and stays for its end to take what the
	// samples counted.
	period, next int64 // on the monoNow clock
}

// statsBatch is how many entries a wake-up looks at per hold of the lock.
const statsBatch = 256

// set samples c every period from now on, or changes its period (0: no
// more samples); it reports whether the list was empty (the sweeper may
// have to start). A period of 0 for a connection never sampled does
// nothing.
func (s *statsSampler) set(c *Conn, period time.Duration) (first bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := addSat(monoNow(), int64(period))
	if i := c.statsIdx.Load() - 1; i >= 0 {
		if e := &s.list[i]; e.period != int64(period) {
			e.period, e.next = int64(period), next
		}
		return false
	}
	if period <= 0 {
		return false
	}
	s.list = append(s.list, sampled{c: c, cs: new(connStats), period: int64(period), next: next})
	c.statsIdx.Store(int32(len(s.list)))
	s.n.Store(int64(len(s.list)))
	return len(s.list) == 1
}

// stats returns what the metrics have of c while it is sampled; nil when it
// is not.
func (s *statsSampler) stats(c *Conn) *connStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := c.statsIdx.Load() - 1; i >= 0 {
		return s.list[i].cs
	}
	return nil
}

// take stops sampling c and returns what the metrics have of it, for its
// end; nil when it was not sampled.
func (s *statsSampler) take(c *Conn) *connStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := int(c.statsIdx.Load()) - 1
	if i < 0 {
		return nil
	}
	cs := s.list[i].cs
	c.statsIdx.Store(0)
	last := len(s.list) - 1
	if i != last {
		s.list[i] = s.list[last]
		s.list[i].c.statsIdx.Store(int32(i + 1))
	}
	s.list[last] = sampled{}
	s.list = s.list[:last]
	s.n.Store(int64(len(s.list)))
	if len(s.list) == 0 && cap(s.list) > 1024 {
		s.list = nil // give back the memory of a burst that is over
	}
	return cs
}

// len returns how many connections are sampled.
func (s *statsSampler) len() int { return int(s.n.Load()) }

// step samples the connections due at now, each once, and sets their next
// due time a period on. The lock is held for statsBatch entries at a time
// and never during a TCP_INFO read. An entry that an end moves from the
// list's end to before the walk's position waits for the next wake-up.
func (s *statsSampler) step(now int64) {
	var due []sampled
	for i := 0; ; {
		due = due[:0]
		s.mu.Lock()
		end := min(i+statsBatch, len(s.list))
		for ; i < end; i++ {
			if e := &s.list[i]; e.period > 0 && e.next <= now {
				due = append(due, *e)
				// From now, not from when it was due: a late wake-up
				// (a loaded machine) does not make samples bunch up.
				e.next = addSat(now, e.period)
			}
		}
		more := i < len(s.list)
		s.mu.Unlock()
		for _, e := range due {
			e.c.sampleTCP(e.cs)
		}
		if !more {
			return
		}
	}
}
