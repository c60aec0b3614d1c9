package tcpops

import (
	"sync"
	"sync/atomic"
	"time"
)

// registryShards spreads the registry over independent locks so that
// connections opening and closing on different cores do not contend, and a
// listing holds one small lock at a time.
const registryShards = 64

// registry holds every live tracked connection by id. It is the package's
// only mutable state: ids must be unique across config reloads, and the
// admin API must see connections of every handler and listener.
type registry struct {
	lastID   atomic.Uint64
	sweeping atomic.Bool
	shards   [registryShards]registryShard
}

type registryShard struct {
	mu sync.Mutex
	m  map[uint64]*Conn
	_  [40]byte // keep shards on separate cache lines
}

// connections is the process-wide connection registry.
var connections = newRegistry()

func newRegistry() *registry {
	r := new(registry)
	for i := range r.shards {
		r.shards[i].m = make(map[uint64]*Conn)
	}
	return r
}

// add assigns c a fresh id and registers it.
func (r *registry) add(c *Conn) {
	c.id = r.lastID.Add(1)
	s := &r.shards[c.id%registryShards]
	s.mu.Lock()
	s.m[c.id] = c
	s.mu.Unlock()
	if !r.sweeping.Load() && r.sweeping.CompareAndSwap(false, true) {
		go r.sweep()
	}
}

// sweepInterval is how often the registry looks for connections whose socket
// was closed by an owner that did not tell tcpops (caddy-l4's server closes
// the raw socket after routing, which a wrapper never sees).
const sweepInterval = time.Second

// sweep ends connections whose socket has been closed behind tcpops' back.
// It runs only while connections are tracked, so an idle process (and a test
// checking for leaked goroutines) has no sweeper.
func (r *registry) sweep() {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for range t.C {
		r.each(func(c *Conn) bool {
			if c.socketClosed() {
				c.end(ReasonClosed, CauseEOF)
			}
			return true
		})
		if r.len() > 0 {
			continue
		}
		r.sweeping.Store(false)
		// A connection added between the check and the Store saw sweeping
		// still true and did not start a sweeper: take the job back.
		if r.len() == 0 || !r.sweeping.CompareAndSwap(false, true) {
			return
		}
	}
}

// remove unregisters c; removing twice is harmless.
func (r *registry) remove(c *Conn) {
	s := &r.shards[c.id%registryShards]
	s.mu.Lock()
	delete(s.m, c.id)
	s.mu.Unlock()
}

// get returns the live connection with the id, or nil.
func (r *registry) get(id uint64) *Conn {
	s := &r.shards[id%registryShards]
	s.mu.Lock()
	c := s.m[id]
	s.mu.Unlock()
	return c
}

// each calls fn for every live connection until fn returns false. It holds
// one shard's lock at a time, and not while fn runs, so that traffic on other
// shards (and on this one) goes on during a long listing.
func (r *registry) each(fn func(*Conn) bool) {
	var batch []*Conn
	for i := range r.shards {
		s := &r.shards[i]
		s.mu.Lock()
		batch = batch[:0]
		for _, c := range s.m {
			batch = append(batch, c)
		}
		s.mu.Unlock()
		for _, c := range batch {
			if !fn(c) {
				return
			}
		}
	}
}

// len returns the number of live connections.
func (r *registry) len() int {
	n := 0
	for i := range r.shards {
		s := &r.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}
