package tcpops

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// registry holds every live tracked connection. It is the package's only
// mutable state: ids must be unique across config reloads, and the admin
// API must see connections of every handler and listener.
//
// It is built for a SIP registrar's scale (10^5 to 10^6 connections), where
// every question the admin API answers must cost the same whatever the
// number of connections:
//
//   - order holds the connections sorted by id. Ids are handed out under
//     the lock in increasing order, so adding is an append; removing leaves
//     a tombstone that a compaction clears once they are half the slice.
//     Finding an id, and a page at any position (?after=), is a binary
//     search: no sort per request, no map beside it.
//   - byRemote indexes the connections by the peer's IP address, as
//     Kamailio's tcp_get_conid looks connections up in a hash: a lookup by
//     address walks the connections of that one IP.
//
// One mutex guards both. Its critical sections are an append, a binary
// search or a map operation (tens of nanoseconds), and no system call or
// JSON encoding runs under it, so even a connection rate of 10^5 per second
// keeps it free almost all the time; it is never taken on the data path.
type registry struct {
	mu       sync.Mutex
	lastID   uint64
	order    []regEntry       // by id, ascending; c == nil is a removed entry
	dead     int              // removed entries still in order
	byRemote map[uint64]*Conn // remoteKey -> first connection of the chain

	deadlines deadlines // the connections' timers (lifetime.go)
	queues    queueSet  // the events queues with events to deliver, of every configuration (events.go)

	live     atomic.Int64 // connections in the registry
	watched  atomic.Int64 // connections the sweeper looks at
	sweeping atomic.Bool  // a sweeper goroutine runs
}

// regEntry is an element of registry.order. The id is kept next to the
// pointer so that a binary search does not chase pointers around the heap.
type regEntry struct {
	id uint64
	c  *Conn
}

// connections is the process-wide connection registry.
var connections = newRegistry()

func newRegistry() *registry {
	return &registry{byRemote: make(map[uint64]*Conn)}
}

// add assigns c a fresh id and registers it, indexed by its remote address.
// When asking c for its address may wait for the peer (addrMayBlock), it is
// indexed at its first Read instead (Conn.Read), so that a listener's
// Accept never waits.
func (r *registry) add(c *Conn) {
	lazy := addrMayBlock(c.Conn)
	var key uint64
	if lazy {
		// Before c is visible: a listing must not ask c for its addresses
		// (Conn.addrs). c's first Read comes after add returns.
		c.indexPending.Store(true)
	} else {
		key = remoteKeyOf(c)
	}
	r.mu.Lock()
	r.lastID++
	c.id = r.lastID
	c.reg = r
	r.order = append(r.order, regEntry{c.id, c})
	r.indexLocked(c, key)
	r.mu.Unlock()
	r.live.Add(1)
}

// indexLocked links c into the chain of its remote address key; key 0 is no
// address. r.mu must be held.
func (r *registry) indexLocked(c *Conn, key uint64) {
	if key == 0 {
		return
	}
	c.remoteKey = key
	if head := r.byRemote[key]; head != nil {
		head.remotePrev = c
		c.remoteNext = head
	}
	r.byRemote[key] = c
}

// indexLate indexes c, which add left for its first Read, if it is still
// registered.
func (r *registry) indexLate(c *Conn) {
	key := remoteKeyOf(c) // no longer waits: the Read has had the header
	r.mu.Lock()
	defer r.mu.Unlock()
	if i, found := r.search(c.id); found && r.order[i].c == c && c.remoteKey == 0 {
		r.indexLocked(c, key)
	}
}

// remove unregisters c; removing twice is harmless.
func (r *registry) remove(c *Conn) {
	r.mu.Lock()
	i, found := r.search(c.id)
	if !found || r.order[i].c != c {
		r.mu.Unlock()
		return
	}
	r.order[i].c = nil
	r.dead++
	r.unindexLocked(c)
	r.compactLocked()
	r.mu.Unlock()
	r.live.Add(-1)
}

// unindexLocked takes c out of its remote address chain. r.mu must be held.
func (r *registry) unindexLocked(c *Conn) {
	if c.remoteKey == 0 {
		return
	}
	if c.remotePrev != nil {
		c.remotePrev.remoteNext = c.remoteNext
	} else if c.remoteNext != nil {
		r.byRemote[c.remoteKey] = c.remoteNext
	} else {
		delete(r.byRemote, c.remoteKey)
	}
	if c.remoteNext != nil {
		c.remoteNext.remotePrev = c.remotePrev
	}
	c.remotePrev, c.remoteNext = nil, nil
}

// compactLocked drops removed entries from the end of order at once (most
// connections are short-lived, so most removals are near the end), and
// rewrites the whole slice once they are half of it: amortised O(1) per
// removal. It gives memory back when the slice has shrunk to a quarter of
// its capacity. r.mu must be held.
func (r *registry) compactLocked() {
	for n := len(r.order); n > 0 && r.order[n-1].c == nil; n-- {
		r.order = r.order[:n-1]
		r.dead--
	}
	if r.dead < 64 || r.dead*2 < len(r.order) {
		return
	}
	live := r.order[:0]
	for _, e := range r.order {
		if e.c != nil {
			live = append(live, e)
		}
	}
	clear(r.order[len(live):]) // let the removed connections be collected
	r.order, r.dead = live, 0
	if cap(r.order) > 4*len(r.order)+1024 {
		shrunk := make([]regEntry, len(r.order), 2*len(r.order))
		copy(shrunk, r.order)
		r.order = shrunk
	}
}

// search returns the position of id in order, or where it would be, and
// whether it is there (removed or not). r.mu must be held.
func (r *registry) search(id uint64) (int, bool) {
	return slices.BinarySearchFunc(r.order, id, func(e regEntry, id uint64) int { return cmp.Compare(e.id, id) })
}

// get returns the live connection with the id, or nil.
func (r *registry) get(id uint64) *Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i, found := r.search(id); found {
		return r.order[i].c
	}
	return nil
}

// len returns the number of live connections.
func (r *registry) len() int { return int(r.live.Load()) }

// nextBatch appends to batch up to n live connections with ids above after,
// in id order, and returns it with the last id it looked at and whether it
// reached the end. It holds the lock for no more than n entries.
func (r *registry) nextBatch(batch []*Conn, after uint64, n int) ([]*Conn, uint64, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	i, found := r.search(after)
	if found {
		i++
	}
	for ; i < len(r.order) && n > 0; i++ {
		after = r.order[i].id
		if c := r.order[i].c; c != nil {
			batch = append(batch, c)
			n--
		}
	}
	return batch, after, i == len(r.order)
}

// eachBatch is how many connections each and page copy under the lock at a
// time.
const eachBatch = 256

// each calls fn for every live connection, in id order, until fn returns
// false. fn runs without the registry's lock, so that it may take the
// connection's own lock, make system calls, or end the connection.
func (r *registry) each(fn func(*Conn) bool) {
	r.eachAfter(0, fn)
}

// eachAfter is each for the connections with an id above after.
func (r *registry) eachAfter(after uint64, fn func(*Conn) bool) {
	batch := make([]*Conn, 0, eachBatch)
	for {
		var end bool
		batch, after, end = r.nextBatch(batch[:0], after, eachBatch)
		for _, c := range batch {
			if !fn(c) {
				return
			}
		}
		if end {
			return
		}
	}
}

// byRemoteAddr returns the live connections whose peer has the IP address
// ip and, when port is not 0, the port, sorted by id. It costs a map lookup
// and a walk over the connections of that one IP.
func (r *registry) byRemoteAddr(ip netip.Addr, port uint16) []*Conn {
	var out []*Conn
	r.mu.Lock()
	for c := r.byRemote[addrKey(ip)]; c != nil; c = c.remoteNext {
		// Different addresses may share a key: compare the address itself.
		if ap, ok := addrPortOf(c.RemoteAddr()); ok && ap.Addr() == ip && (port == 0 || ap.Port() == port) {
			out = append(out, c)
		}
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b *Conn) int { return cmp.Compare(a.id, b.id) })
	return out
}

// remoteKeyOf returns the index key of c's peer address, 0 when c has no IP
// peer address.
func remoteKeyOf(c *Conn) uint64 {
	ap, ok := addrPortOf(c.RemoteAddr())
	if !ok {
		return 0
	}
	return addrKey(ap.Addr())
}

// addrKey hashes an IP address (unmapped) to a non-zero map key: a 64-bit
// key keeps each index entry at 16 bytes where netip.Addr would take 24.
func addrKey(ip netip.Addr) uint64 {
	b := ip.Unmap().As16()
	var hi, lo uint64
	for i := range 8 {
		hi = hi<<8 | uint64(b[i])
		lo = lo<<8 | uint64(b[8+i])
	}
	// A 64-bit finaliser (splitmix64) over both halves.
	h := hi*0x9e3779b97f4a7c15 ^ lo
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	if ip.Is6() && !ip.Is4In6() {
		h ^= 0x6 // keep ::ffff:a.b.c.d and a.b.c.d apart from native IPv6
	}
	return max(h, 1)
}

// The sweep. caddy-l4's server (and its listener wrapper, for a connection
// it does not hand on) closes the raw socket once routing is over, which a
// wrapper never sees. A connection whose tcpops returned before its session
// ended (a non-terminal route) may be closed that way, and tcpops notices
// its end from the traffic (the peer's EOF and the proxy's half-close), from
// a timer, or failing both from this sweep. Only such connections are
// watched: connections of the listener wrapper and of a terminal route end
// through tcpops itself and cost the sweep nothing.
const (
	// sweepInterval is how often the sweeper wakes up.
	sweepInterval = time.Second
	// sweepBudget bounds the connections one wake-up visits, so that the
	// sweep's CPU does not grow with the number of connections: a visit
	// costs about 60ns with a real socket (BenchmarkScaleSweep and
	// BenchmarkSocketClosed, BENCHMARKS.md), so the sweep takes at most about
	// 0.3% of a core. Up to this many watched connections a socket closed
	// behind tcpops' back is noticed within a second; beyond, within
	// watched/sweepBudget seconds.
	sweepBudget = 50_000
)

// watch makes the sweeper look at c until it ends.
func (r *registry) watch(c *Conn) {
	c.mu.Lock()
	if c.ended || c.watched.Load() {
		c.mu.Unlock()
		return
	}
	c.watched.Store(true) // cleared with the count in finish, under c.mu
	c.mu.Unlock()
	r.watched.Add(1)
	if !r.sweeping.Load() && r.sweeping.CompareAndSwap(false, true) {
		go r.sweep()
	}
}

// unwatched is called by finish for a connection that was watched.
func (r *registry) unwatched() { r.watched.Add(-1) }

// sweep ends watched connections whose socket has been closed behind
// tcpops' back. It runs only while connections are watched, so an idle
// process (and a test checking for leaked goroutines) has no sweeper.
func (r *registry) sweep() {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	var cursor uint64
	for range t.C {
		cursor = r.sweepStep(cursor, sweepBudget)
		if r.watched.Load() > 0 {
			continue
		}
		r.sweeping.Store(false)
		// A connection watched between the check and the Store saw
		// sweeping still true and did not start a sweeper: take the job
		// back.
		if r.watched.Load() == 0 || !r.sweeping.CompareAndSwap(false, true) {
			return
		}
	}
}

// sweepStep visits up to budget connections after the id cursor and ends
// the watched ones whose socket is closed. It returns the cursor for the
// next step: 0 once it has reached the last connection.
func (r *registry) sweepStep(cursor uint64, budget int) uint64 {
	batch := make([]*Conn, 0, eachBatch)
	for budget > 0 {
		var end bool
		batch, cursor, end = r.nextBatch(batch[:0], cursor, min(eachBatch, budget))
		budget -= max(len(batch), 1)
		for _, c := range batch {
			if c.watched.Load() && c.socketClosed() {
				c.end(ReasonClosed, CauseEOF)
			}
		}
		if end {
			return 0
		}
	}
	return cursor
}
