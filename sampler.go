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
// pointer, so that a wake-up that samples nobody compares integers and
// chases no pointer: at 18,000 connections with stats_period 10s, a
// wake-up looks at 18,000 entries and samples the 1,800 due
// (BenchmarkScaleIdleCPU).
type statsSampler struct {
	mu   sync.Mutex
	list []sampled    // Conn.sampleIdx is 1 + its index
	n    atomic.Int64 // len(list), for the sweeper to read without the lock
}

// sampled is an entry of the sampler's list.
type sampled struct {
	c            *Conn
	period, next int64 // on the monoNow clock
}

// statsBatch is how many entries a wake-up looks at per hold of the lock.
const statsBatch = 256

// set samples c, whose stats are cs, every period from now on, or changes
// its period; it reports whether the list was empty (the sweeper may have
// to start).
func (s *statsSampler) set(c *Conn, cs *connStats, period time.Duration) (first bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := cs.idx - 1; i >= 0 {
		if e := &s.list[i]; e.period != int64(period) {
			e.period, e.next = int64(period), addSat(monoNow(), int64(period))
		}
		return false
	}
	s.list = append(s.list, sampled{c: c, period: int64(period), next: addSat(monoNow(), int64(period))})
	cs.idx = int32(len(s.list))
	s.n.Store(int64(len(s.list)))
	return len(s.list) == 1
}

// remove stops sampling the connection whose stats are cs; removing one
// that is not sampled is harmless.
func (s *statsSampler) remove(cs *connStats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := int(cs.idx) - 1
	if i < 0 {
		return
	}
	cs.idx = 0
	last := len(s.list) - 1
	if i != last {
		s.list[i] = s.list[last]
		s.list[i].c.stats.Load().idx = int32(i + 1)
	}
	s.list[last] = sampled{}
	s.list = s.list[:last]
	s.n.Store(int64(len(s.list)))
	if len(s.list) == 0 && cap(s.list) > 1024 {
		s.list = nil // give back the memory of a burst that is over
	}
}

// len returns how many connections are sampled.
func (s *statsSampler) len() int { return int(s.n.Load()) }

// step samples the connections due at now, each once, and sets their next
// due time a period on. The lock is held for statsBatch entries at a time
// and never during a TCP_INFO read. An entry that a removal moves from the
// list's end to before the walk's position waits for the next wake-up.
func (s *statsSampler) step(now int64) {
	var due []*Conn
	for i := 0; ; {
		due = due[:0]
		s.mu.Lock()
		end := min(i+statsBatch, len(s.list))
		for ; i < end; i++ {
			if e := &s.list[i]; e.next <= now {
				due = append(due, e.c)
				// From now, not from when it was due: a late wake-up
				// (a loaded machine) does not make samples bunch up.
				e.next = addSat(now, e.period)
			}
		}
		more := i < len(s.list)
		s.mu.Unlock()
		for _, c := range due {
			c.sampleTCP()
		}
		if !more {
			return
		}
	}
}
