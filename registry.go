package tcpops

import (
	"cmp"
	"net"
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
//   - byRemote indexes the connections by the peer's IP address, and
//     byAddr by its IP and port, as Kamailio's tcp_get_conid hashes both:
//     a lookup by IP:port costs the same however many peers share the IP
//     (phones behind one carrier-grade NAT, every client of a load
//     balancer that sends no PROXY header), and a page of the connections
//     of one IP costs what it returns (ipChain).
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
	byRemote map[uint64]*Conn // remoteKey -> first (lowest id) connection of the IP's chain
	ipCount  map[uint64]int   // remoteKey -> connections in the chain, for chains of 2 or more
	mixedIP  map[uint64]bool  // remoteKeys shared by two IPs (a hash collision): counted by walking
	byAddr   map[uint64]*Conn // addrPortKey -> a chain of the connections of that IP:port, for IPs with 2 or more

	// The connections the sweeper looks at, in no order (watchedList), and
	// where its walk is: [0, sweepCursor) has been visited this round.
	watchedList []*Conn
	sweepCursor int

	deadlines deadlines    // the connections' timers (lifetime.go)
	queues    queueSet     // the events queues with events to deliver, of every configuration (events.go)
	stats     statsSampler // the connections stats_period samples (sampler.go), walked by the sweeper

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
	return &registry{
		byRemote: make(map[uint64]*Conn),
		ipCount:  make(map[uint64]int),
		mixedIP:  make(map[uint64]bool),
		byAddr:   make(map[uint64]*Conn),
	}
}

// add assigns c a fresh id and registers it, indexed by its remote address.
// When asking c for its address may wait for the peer (addrMayBlock), it is
// indexed at its first Read instead (Conn.Read), so that a listener's
// Accept never waits.
func (r *registry) add(c *Conn) {
	lazy := addrMayBlock(c.Conn)
	var peer netip.AddrPort
	if lazy {
		// Before c is visible: a listing must not ask c for its addresses
		// (Conn.addrs). c's first Read comes after add returns.
		c.readHook.Store(hookIndex)
	} else {
		peer, _ = addrPortOf(c.RemoteAddr())
	}
	r.mu.Lock()
	r.lastID++
	c.id = r.lastID
	c.reg = r
	r.order = append(r.order, regEntry{c.id, c})
	r.indexLocked(c, peer)
	r.mu.Unlock()
	r.live.Add(1)
}

// indexLocked links c, whose peer is peer, into the chain of its IP and the
// chain of its IP:port; an invalid peer (no IP address) is not indexed.
// r.mu must be held.
//
// An IP's chain is in id order, so that a page of it is a walk from where
// the last page ended. Its first connection's remotePrev is its last (a
// circular back link), so that adding the newest connection, which has the
// highest id, is O(1); a connection indexed late (at its first Read,
// behind proxy_protocol) walks back from the end to its place, past the
// few connections accepted meanwhile.
func (r *registry) indexLocked(c *Conn, peer netip.AddrPort) {
	if !peer.IsValid() {
		return
	}
	key := addrKey(peer.Addr())
	c.remoteKey, c.remotePort = key, peer.Port()
	if head := r.byRemote[key]; head == nil {
		c.remotePrev = c
		r.byRemote[key] = c
	} else {
		if !r.mixedIP[key] {
			if hp, _ := addrPortOf(head.RemoteAddr()); hp.Addr() != peer.Addr() {
				r.mixedIP[key] = true
			}
		}
		tail := head.remotePrev
		p := tail
		for p.id > c.id && p != head {
			p = p.remotePrev
		}
		switch {
		case p.id > c.id: // before the head
			c.remoteNext, c.remotePrev = head, tail
			head.remotePrev = c
			r.byRemote[key] = c
		default: // after p
			c.remotePrev, c.remoteNext = p, p.remoteNext
			p.remoteNext = c
			if c.remoteNext != nil {
				c.remoteNext.remotePrev = c
			} else {
				head.remotePrev = c // the new tail
			}
		}
		r.ipCount[key] = max(r.ipCount[key], 1) + 1
	}
	// byAddr holds the connections of the IPs that have two or more: an
	// IP's only connection is found through byRemote, which spares the
	// most common case, one connection per phone, a second map entry.
	switch n := r.ipCount[key]; {
	case n == 2: // c is the second: the first joins byAddr with it
		for o := r.byRemote[key]; o != nil; o = o.remoteNext {
			if o != c {
				r.addrLinkLocked(o)
			}
		}
		fallthrough
	case n > 2:
		r.addrLinkLocked(c)
	}
}

// addrLinkLocked links c into the chain of its IP:port. r.mu must be held.
func (r *registry) addrLinkLocked(c *Conn) {
	ak := addrPortKey(c.remoteKey, c.remotePort)
	if next := r.byAddr[ak]; next != nil {
		next.addrPrev = c
		c.addrNext = next
	}
	r.byAddr[ak] = c
}

// addrUnlinkLocked takes c out of the chain of its IP:port. r.mu must be
// held.
func (r *registry) addrUnlinkLocked(c *Conn) {
	ak := addrPortKey(c.remoteKey, c.remotePort)
	if c.addrPrev != nil {
		c.addrPrev.addrNext = c.addrNext
	} else if c.addrNext != nil {
		r.byAddr[ak] = c.addrNext
	} else {
		delete(r.byAddr, ak)
	}
	if c.addrNext != nil {
		c.addrNext.addrPrev = c.addrPrev
	}
	c.addrPrev, c.addrNext = nil, nil
}

// indexLate indexes c, which add left for its first Read, if it is still
// registered.
func (r *registry) indexLate(c *Conn) {
	peer, _ := addrPortOf(c.RemoteAddr()) // no longer waits: the Read has had the header
	r.mu.Lock()
	defer r.mu.Unlock()
	if i, found := r.search(c.id); found && r.order[i].c == c && c.remoteKey == 0 {
		r.indexLocked(c, peer)
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
	r.unwatchLocked(c)
	r.compactLocked()
	r.mu.Unlock()
	r.live.Add(-1)
}

// unindexLocked takes c out of its address chains. r.mu must be held.
func (r *registry) unindexLocked(c *Conn) {
	key := c.remoteKey
	if key == 0 {
		return
	}
	head := r.byRemote[key]
	switch {
	case c == head && c.remoteNext == nil:
		delete(r.byRemote, key)
		delete(r.mixedIP, key)
	case c == head:
		c.remoteNext.remotePrev = c.remotePrev // the tail
		r.byRemote[key] = c.remoteNext
	default:
		c.remotePrev.remoteNext = c.remoteNext
		if c.remoteNext != nil {
			c.remoteNext.remotePrev = c.remotePrev
		} else {
			head.remotePrev = c.remotePrev // c was the tail
		}
	}
	switch n := r.ipCount[key]; {
	case n > 2:
		r.ipCount[key] = n - 1
		r.addrUnlinkLocked(c)
	case n == 2: // one is left: it leaves byAddr too (indexLocked)
		delete(r.ipCount, key)
		r.addrUnlinkLocked(c)
		r.addrUnlinkLocked(r.byRemote[key])
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
// ip and, when port is not 0, the port, sorted by id. With a port it costs a
// map lookup and a walk over the connections of that IP:port (one, but for
// a peer that connected from the same port to two of our addresses); with
// none, a walk over the connections of the IP.
func (r *registry) byRemoteAddr(ip netip.Addr, port uint16) []*Conn {
	var out []*Conn
	key := addrKey(ip)
	r.mu.Lock()
	if port != 0 {
		first := r.byAddr[addrPortKey(key, port)]
		if r.ipCount[key] == 0 { // at most one connection: not in byAddr
			first = r.byRemote[key]
		}
		for c := first; c != nil; c = c.addrNext {
			// The key and port are c's own; only where two IPs share
			// the key does the address itself need to be asked.
			if c.remoteKey == key && c.remotePort == port && r.ofIPLocked(c, ip) {
				out = append(out, c)
			}
		}
		r.mu.Unlock()
		// The chain has the newest first, but for connections indexed
		// late (at their first Read).
		slices.Reverse(out)
		if !slices.IsSortedFunc(out, byID) {
			slices.SortFunc(out, byID)
		}
		return out
	}
	for c := r.byRemote[key]; c != nil; c = c.remoteNext {
		if r.ofIPLocked(c, ip) {
			out = append(out, c)
		}
	}
	r.mu.Unlock()
	return out
}

// byID orders connections by id.
func byID(a, b *Conn) int { return cmp.Compare(a.id, b.id) }

// ofIPLocked reports whether c, in the chain of ip's key, has the peer IP
// ip: always, but where two IPs share a key. r.mu must be held.
func (r *registry) ofIPLocked(c *Conn, ip netip.Addr) bool {
	if !r.mixedIP[c.remoteKey] {
		return true
	}
	ap, ok := addrPortOf(c.RemoteAddr())
	return ok && ap.Addr() == ip
}

// remotePage returns up to n connections with the peer IP ip and an id above
// after, in id order, and how many connections that IP has in all. It costs
// what it returns: the walk starts at the connection after (the last of
// the previous page) when it is still there, and only when it has ended
// meanwhile walks the IP's connections from the first.
func (r *registry) remotePage(ip netip.Addr, after uint64, n int) (page []*Conn, total int) {
	key := addrKey(ip)
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.byRemote[key]
	if c == nil {
		return nil, 0
	}
	switch i, found := r.search(after); {
	case c.remotePrev.id <= after: // after the IP's last connection
		c = nil
	case found && after != 0 && r.order[i].c != nil && r.order[i].c.remoteKey == key:
		c = r.order[i].c
	}
	for ; c != nil && len(page) < n; c = c.remoteNext {
		if c.id > after && r.ofIPLocked(c, ip) {
			page = append(page, c)
		}
	}
	switch {
	case r.mixedIP[key]:
		for c := r.byRemote[key]; c != nil; c = c.remoteNext {
			if r.ofIPLocked(c, ip) {
				total++
			}
		}
	default:
		total = max(r.ipCount[key], 1)
	}
	return page, total
}

// addrPortOf returns a's IP (unmapped) and port.
func addrPortOf(a net.Addr) (netip.AddrPort, bool) {
	switch v := a.(type) {
	case nil:
		return netip.AddrPort{}, false
	case *net.TCPAddr:
		ap := v.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
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

// addrPortKey is the index key of an IP:port: the key of the IP, key, mixed
// with the port by the same finaliser.
func addrPortKey(key uint64, port uint16) uint64 {
	h := key ^ (uint64(port)+1)*0x9e3779b97f4a7c15
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
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
	r.mu.Lock()
	r.watchLocked(c)
	r.mu.Unlock()
	r.watched.Add(1)
	r.startSweeper()
}

// startSweeper starts the sweeper goroutine unless one runs.
func (r *registry) startSweeper() {
	if !r.sweeping.Load() && r.sweeping.CompareAndSwap(false, true) {
		go r.sweep()
	}
}

// sweeperNeeded reports whether the sweeper has work: connections to
// watch, or to sample on their stats_period.
func (r *registry) sweeperNeeded() bool { return r.watched.Load() > 0 || r.stats.len() > 0 }

// watchLocked puts c, if it is still registered, on the sweeper's list.
// r.mu must be held.
func (r *registry) watchLocked(c *Conn) {
	if i, found := r.search(c.id); !found || r.order[i].c != c || c.watchIdx != 0 {
		return
	}
	r.watchedList = append(r.watchedList, c)
	c.watchIdx = int32(len(r.watchedList))
}

// unwatchLocked takes c off the sweeper's list, keeping [0, sweepCursor)
// the connections visited this round: one from the visited part is
// replaced by the last visited one, whose place the list's last (not yet
// visited) one takes. r.mu must be held.
func (r *registry) unwatchLocked(c *Conn) {
	i := int(c.watchIdx) - 1
	if i < 0 {
		return
	}
	c.watchIdx = 0
	move := func(from, to int) {
		if from != to {
			r.watchedList[to] = r.watchedList[from]
			r.watchedList[to].watchIdx = int32(to + 1)
		}
	}
	if i < r.sweepCursor {
		r.sweepCursor--
		move(r.sweepCursor, i)
		i = r.sweepCursor
	}
	last := len(r.watchedList) - 1
	move(last, i)
	r.watchedList[last] = nil
	r.watchedList = r.watchedList[:last]
	if len(r.watchedList) == 0 && cap(r.watchedList) > 1024 {
		r.watchedList = nil
	}
}

// unwatched is called by finish for a connection that was watched.
func (r *registry) unwatched() { r.watched.Add(-1) }

// sweep ends watched connections whose socket has been closed behind
// tcpops' back, and samples those on a stats_period (sampler.go). It runs
// only while connections are watched or sampled, so an idle process (and a
// test checking for leaked goroutines) has no sweeper.
func (r *registry) sweep() {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for range t.C {
		r.sweepStep(sweepBudget)
		r.stats.step(monoNow())
		if r.sweeperNeeded() {
			continue
		}
		r.sweeping.Store(false)
		// A connection watched or sampled between the check and the
		// Store saw sweeping still true and did not start a sweeper:
		// take the job back.
		if !r.sweeperNeeded() || !r.sweeping.CompareAndSwap(false, true) {
			return
		}
	}
}

// sweepStep visits up to budget watched connections, from where the last
// step stopped, and ends those whose socket is closed. A round over all
// watched connections takes one step while there are no more than budget,
// so a socket closed behind tcpops' back is noticed within a sweepInterval;
// beyond, within watched/budget of them. It reports whether the step
// finished a round.
func (r *registry) sweepStep(budget int) (roundDone bool) {
	batch := make([]*Conn, 0, eachBatch)
	for budget > 0 {
		r.mu.Lock()
		n := min(eachBatch, budget, len(r.watchedList)-r.sweepCursor)
		batch = append(batch[:0], r.watchedList[r.sweepCursor:r.sweepCursor+n]...)
		r.sweepCursor += n
		roundDone = r.sweepCursor >= len(r.watchedList)
		if roundDone {
			r.sweepCursor = 0
		}
		r.mu.Unlock()
		budget -= n
		for _, c := range batch {
			if c.socketClosed() {
				// Closed by whoever owns the socket (caddy-l4), not by
				// tcpops: this side's close, unless the peer said more.
				c.end(ReasonClosed, CauseLocal)
			}
		}
		if roundDone {
			return true
		}
	}
	return false
}
