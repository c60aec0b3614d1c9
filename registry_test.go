package tcpops

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// These tests and benchmarks use a private registry, marked as already
// sweeping so that no sweeper starts: the sweeper would end the test's
// connections, which share one socket and have no tracker.

func quietRegistry() *registry {
	r := newRegistry()
	r.sweeping.Store(true)
	return r
}

// simConn stands for an accepted connection without a socket of its own:
// the registry, the index and the admin API only ask it for its addresses.
// It is how the benchmarks simulate a million connections on a machine
// that allows 20,000 descriptors per process.
type simConn struct {
	net.Conn // nil: reading or writing a simConn is a bug in the test
	remote   *net.TCPAddr
	local    *net.TCPAddr
}

func (c *simConn) RemoteAddr() net.Addr { return c.remote }
func (c *simConn) LocalAddr() net.Addr  { return c.local }

// simAddr returns the i-th simulated peer: 10.x.y.z, one address per phone
// as a registrar sees them, port 5060 + i%1000.
func simAddr(i int) *net.TCPAddr {
	return &net.TCPAddr{IP: net.IPv4(10, byte(i>>16), byte(i>>8), byte(i)).To4(), Port: 5060 + i%1000}
}

var simLocal = &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1).To4(), Port: 5060}

// socketPair returns the server side of a loopback TCP connection, a real
// socket for getsockopt to read; both ends close when the test ends.
func socketPair(tb testing.TB) *net.TCPConn {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return server.(*net.TCPConn)
}

// fillRegistry registers n connections that all wrap the socket tc, from
// n different peers (simAddr).
func fillRegistry(r *registry, tc *net.TCPConn, n int) {
	start := time.Now()
	for i := range n {
		c := &Conn{Conn: &simConn{remote: simAddr(i), local: simLocal}, tcp: tc, start: start}
		c.opts = Options{Lifetime: OptionalDuration(time.Minute), Keepalive: &Keepalive{Idle: 7e9}}
		r.add(c)
	}
}

func TestRegistryIDsUniqueUnderParallelAdd(t *testing.T) {
	r := quietRegistry()
	const goroutines, each = 8, 500
	var wg sync.WaitGroup
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r.add(&Conn{Conn: &simConn{remote: simAddr(i), local: simLocal}})
			}
		}()
	}
	wg.Wait()
	if n := r.len(); n != goroutines*each {
		t.Fatalf("len %d, want %d", n, goroutines*each)
	}
	seen := make(map[uint64]bool)
	r.each(func(c *Conn) bool {
		if c.id == 0 || seen[c.id] || r.get(c.id) != c {
			t.Fatalf("id %d: zero, duplicate or not found by get", c.id)
		}
		seen[c.id] = true
		return true
	})
	if len(seen) != goroutines*each {
		t.Fatalf("each saw %d, want %d", len(seen), goroutines*each)
	}
	r.each(func(c *Conn) bool {
		r.remove(c)
		r.remove(c) // harmless
		return true
	})
	if n := r.len(); n != 0 {
		t.Fatalf("len after removing all: %d", n)
	}
}

func TestListConnectionsSortsAndPages(t *testing.T) {
	r := quietRegistry()
	tc := socketPair(t)
	fillRegistry(r, tc, 300)
	l := listConnections(r, listQuery{limit: 100, after: 50})
	if l.Total != 300 || len(l.Connections) != 100 || l.NextAfter != 150 {
		t.Fatalf("total %d, listed %d, next %d; want 300 (every match, on every page), 100, 150", l.Total, len(l.Connections), l.NextAfter)
	}
	for i, ci := range l.Connections {
		if ci.ID != uint64(51+i) {
			t.Fatalf("entry %d has id %d, want %d", i, ci.ID, 51+i)
		}
	}
	if l := listConnections(r, listQuery{limit: 100, after: 200}); len(l.Connections) != 100 || l.NextAfter != 0 {
		t.Fatalf("last page: listed %d, next %d; want 100 and no next page", len(l.Connections), l.NextAfter)
	}
	miss, _ := parseAddrFilter("remote", "10.1.2.3")
	if l := listConnections(r, listQuery{limit: 10, remote: miss}); l.Total != 0 || len(l.Connections) != 0 {
		t.Fatalf("filter that matches nothing: %+v", l)
	}
}

// The registry keeps its order, ids and index through removals in any
// order, compactions included.
func TestRegistryRemovalsKeepOrderAndIndex(t *testing.T) {
	r := quietRegistry()
	const n = 5000
	var all []*Conn
	for i := range n {
		c := &Conn{Conn: &simConn{remote: simAddr(i % 100), local: simLocal}}
		r.add(c)
		all = append(all, c)
	}
	// Remove every id not divisible by 7, odd ids first, so that
	// compactions happen in the middle of the slice and at its end.
	for pass := range 2 {
		for i, c := range all {
			if (i+1)%7 != 0 && (i+1)%2 == 1-pass {
				r.remove(c)
			}
		}
	}
	var want []uint64
	for i := range all {
		if (i+1)%7 == 0 {
			want = append(want, uint64(i+1))
		}
	}
	var got []uint64
	r.each(func(c *Conn) bool { got = append(got, c.id); return true })
	if !slices.Equal(got, want) || r.len() != len(want) {
		t.Fatalf("after removals: %d connections (len %d), want %d in id order", len(got), r.len(), len(want))
	}
	if r.dead*2 >= len(r.order) && r.dead >= 64 {
		t.Fatalf("%d removed entries of %d not compacted", r.dead, len(r.order))
	}
	for i, c := range all {
		if live := (i+1)%7 == 0; (r.get(c.id) == c) != live {
			t.Fatalf("get(%d): live %v, registry says otherwise", c.id, live)
		}
	}
	// Peer i%100: ids i+1 for i ≡ p (mod 100), of which the multiples of 7
	// live.
	for p := range 100 {
		addr := simAddr(p)
		ip, _ := netip.AddrFromSlice(addr.IP)
		var wantIDs []uint64
		for _, id := range want {
			if int(id-1)%100 == p {
				wantIDs = append(wantIDs, id)
			}
		}
		var gotIDs []uint64
		for _, c := range r.byRemoteAddr(ip, 0) {
			gotIDs = append(gotIDs, c.id)
		}
		if !slices.Equal(gotIDs, wantIDs) {
			t.Fatalf("byRemoteAddr(%v): %v, want %v", ip, gotIDs, wantIDs)
		}
		if got := r.byRemoteAddr(ip, uint16(addr.Port)); len(got) != len(wantIDs) {
			t.Fatalf("byRemoteAddr(%v, %d): %d, want %d", ip, addr.Port, len(got), len(wantIDs))
		}
		if got := r.byRemoteAddr(ip, uint16(addr.Port+1)); len(got) != 0 {
			t.Fatalf("byRemoteAddr with another port found %d", len(got))
		}
	}
	for _, c := range all {
		r.remove(c)
	}
	if r.len() != 0 || len(r.order) != 0 || len(r.byRemote) != 0 {
		t.Fatalf("after removing all: len %d, order %d, index %d", r.len(), len(r.order), len(r.byRemote))
	}
}

// An IPv4 peer is found whether the question or the socket uses the
// IPv4-mapped IPv6 form, and an IPv6 peer is told apart from it.
func TestRegistryRemoteIndexAddressForms(t *testing.T) {
	r := quietRegistry()
	v4 := &Conn{Conn: &simConn{remote: &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 5060}, local: simLocal}} // 16-byte form
	v6 := &Conn{Conn: &simConn{remote: &net.TCPAddr{IP: net.ParseIP("2001:db8::7"), Port: 5060}, local: simLocal}}
	r.add(v4)
	r.add(v6)
	for q, want := range map[string]*Conn{"192.0.2.7:5060": v4, "[::ffff:192.0.2.7]:5060": v4, "[2001:db8::7]:5060": v6, "2001:db8::7": v6} {
		f, err := parseAddrFilter("remote", q)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.byRemoteAddr(f.ip, f.port); len(got) != 1 || got[0] != want {
			t.Errorf("remote=%s: %v", q, got)
		}
	}
}

// The sweep visits only watched connections, ends the ones whose socket is
// closed, and visits no more than its budget at a time.
func TestRegistrySweepWatchedOnly(t *testing.T) {
	r := quietRegistry()
	open := socketPair(t)
	closed := socketPair(t)
	_ = closed.Close()
	mk := func(tc *net.TCPConn) *Conn {
		c := &Conn{Conn: &simConn{remote: simAddr(1), local: simLocal}, tcp: tc, start: time.Now()}
		r.add(c)
		return c
	}
	// Many unwatched connections first, whose sockets are closed: the
	// sweep must not spend its budget on them, nor end them.
	var unwatchedClosed []*Conn
	for range 1000 {
		unwatchedClosed = append(unwatchedClosed, mk(closed))
	}
	watchedOpen := mk(open)
	watchSim(r, watchedOpen)
	var watchedClosed []*Conn
	for range 10 {
		c := mk(closed)
		watchSim(r, c)
		watchedClosed = append(watchedClosed, c)
	}
	// A budget of 4 from the start: the open one and the first three
	// closed ones, in the order they were watched.
	if r.sweepStep(4) {
		t.Fatal("a budget of 4 finished a round of 11 watched connections")
	}
	for i, c := range watchedClosed {
		if c.isEnded() != (i < 3) {
			t.Fatalf("after a budget of 4: watched closed connection %d ended: %v, want %v", i, c.isEnded(), i < 3)
		}
	}
	// The ends took three from the visited part of the list: the next
	// step visits exactly the seven left, and finishes the round.
	if !r.sweepStep(7) {
		t.Fatal("a budget of 7 did not finish the round")
	}
	for _, c := range watchedClosed {
		if !c.isEnded() {
			t.Fatalf("watched connection %d with a closed socket not ended", c.id)
		}
	}
	if watchedOpen.isEnded() {
		t.Fatal("the sweep ended an open connection")
	}
	for _, c := range unwatchedClosed {
		if c.isEnded() {
			t.Fatalf("the sweep ended unwatched connection %d", c.id)
		}
	}
	if len(r.watchedList) != 1 || r.watchedList[0] != watchedOpen || r.sweepCursor != 0 {
		t.Fatalf("the sweeper's list after the round: %d entries, cursor %d", len(r.watchedList), r.sweepCursor)
	}
}

// watchSim puts c on r's sweeper list as registry.watch does, without
// starting a sweeper.
func watchSim(r *registry, c *Conn) {
	c.watched.Store(true)
	r.mu.Lock()
	r.watchLocked(c)
	r.mu.Unlock()
	r.watched.Add(1)
}

// BenchmarkRegistryAddRemove is the registry's cost on the connection path:
// one add (id, shard insert) and one remove per connection, from every
// core at once.
func BenchmarkRegistryAddRemove(b *testing.B) {
	r := quietRegistry()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		c := &Conn{Conn: &simConn{remote: simAddr(1), local: simLocal}}
		for pb.Next() {
			r.add(c)
			r.remove(c)
		}
	})
}

// BenchmarkRegistryAddRemoveWhileListing is the same with a listing of
// 8,000 connections running the whole time: a listing holds one shard's
// lock at a time, briefly, so connections keep opening and closing.
func BenchmarkRegistryAddRemoveWhileListing(b *testing.B) {
	r := quietRegistry()
	fillRegistry(r, socketPair(b), 8000)
	var stop atomic.Bool
	var listings atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			n := 0
			r.each(func(*Conn) bool { n++; return true })
			listings.Add(1)
		}
	}()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c := &Conn{Conn: &simConn{remote: simAddr(1), local: simLocal}}
		for pb.Next() {
			r.add(c)
			r.remove(c)
		}
	})
	b.StopTimer()
	stop.Store(true)
	<-done
	b.ReportMetric(float64(listings.Load()), "listings")
}

// BenchmarkRegistryEach is one walk over 8,000 registered connections, the
// part of a listing that holds registry locks.
func BenchmarkRegistryEach(b *testing.B) {
	r := quietRegistry()
	fillRegistry(r, socketPair(b), 8000)
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		r.each(func(*Conn) bool { n++; return true })
		if n != 8000 {
			b.Fatalf("walked %d", n)
		}
	}
}

// BenchmarkListConnections is GET /tcpops/connections without HTTP, with
// 8,000 connections registered: filter, sort, read each listed socket
// (getsockopt of keepalive, TCP_USER_TIMEOUT, TCP_INFO) and encode JSON.
// All the connections wrap one real socket, so the system calls are real.
func BenchmarkListConnections(b *testing.B) {
	r := quietRegistry()
	fillRegistry(r, socketPair(b), 8000)
	miss, _ := parseAddrFilter("remote", "10.1.2.3:5060")
	for _, bc := range []struct {
		name string
		q    listQuery
		want int
	}{
		{"filter-miss", listQuery{limit: defaultListLimit, remote: miss}, 0}, // tcp_get_conid of an absent peer
		{"limit-1", listQuery{limit: 1}, 1},
		{"default-limit", listQuery{limit: defaultListLimit}, defaultListLimit},
		{"all-8000", listQuery{limit: maxListLimit}, 8000},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			var size int
			for b.Loop() {
				l := listConnections(r, bc.q)
				if len(l.Connections) != bc.want {
					b.Fatalf("listed %d, want %d", len(l.Connections), bc.want)
				}
				body, err := json.Marshal(l)
				if err != nil {
					b.Fatal(err)
				}
				size = len(body)
			}
			b.ReportMetric(float64(size), "bytes/answer")
		})
	}
}

// BenchmarkConnectionInfo is one entry of a listing, the answer to GET
// /tcpops/connections/{id}: a snapshot of a connection with a real socket.
func BenchmarkConnectionInfo(b *testing.B) {
	r := quietRegistry()
	fillRegistry(r, socketPair(b), 1)
	c := r.get(1)
	b.ReportAllocs()
	for b.Loop() {
		if ci := connectionInfoOf(c); ci.ID != 1 {
			b.Fatalf("id %d", ci.ID)
		}
	}
}

// The schedule of deadlines keeps its heap and each connection's place in it
// through any mix of scheduling, moving and unscheduling, so that the
// earliest deadline is always the one its runtime timer waits for.
func TestDeadlinesHeap(t *testing.T) {
	r := quietRegistry()
	d := &r.deadlines
	far := monoNow() + int64(time.Hour) // none fires during the test
	rng := rand.New(rand.NewPCG(1, 2))
	want := map[*Conn]int64{}
	conns := make([]*Conn, 500)
	for i := range conns {
		conns[i] = &Conn{reg: r}
	}
	for range 20000 {
		c := conns[rng.IntN(len(conns))]
		if rng.IntN(4) == 0 {
			d.unschedule(c)
			delete(want, c)
			continue
		}
		when := far + rng.Int64N(int64(time.Hour))
		d.schedule(c, when)
		want[c] = when
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.heap) != len(want) {
		t.Fatalf("%d scheduled, want %d", len(d.heap), len(want))
	}
	for i, e := range d.heap {
		if int(e.c.sched) != i+1 || want[e.c] != e.when {
			t.Fatalf("entry %d: sched %d, when %d; want sched %d, when %d", i, e.c.sched, e.when, i+1, want[e.c])
		}
		if i > 0 && d.heap[(i-1)/2].when > e.when {
			t.Fatalf("heap order broken at %d", i)
		}
	}
	for _, c := range conns {
		if _, ok := want[c]; !ok && c.sched != 0 {
			t.Fatal("an unscheduled connection keeps a place in the heap")
		}
	}
	if len(want) > 0 && (!d.armed || d.armedAt > d.heap[0].when) {
		t.Fatalf("timer armed for %d, after the earliest deadline %d", d.armedAt, d.heap[0].when)
	}
	d.timer.Stop()
}

// The sweeper in a real Caddy: tcpops in a first, non-terminal route (as a
// registrar's config has it) returns before the session ends, and the
// terminal route's echo ends it. echo does not shut its write side when the
// client leaves, so tcpops' wrapper sees the client's EOF but no close of
// its own: caddy-l4's server closes the raw socket behind tcpops' back,
// and only the sweep, once a second, notices. The connection must leave the
// registry within 2s of the client's close.
func TestSweepEndsConnectionClosedBehindTcpops(t *testing.T) {
	waitRegistryEmpty(t)
	addr := freePort(t)
	loadCaddy(t, fmt.Sprintf(`{"admin":{"disabled":true},"logging":{"logs":{"default":{"level":"ERROR"}}},
"apps":{"layer4":{"servers":{"srv0":{"listen":[%q],"routes":[
 {"handle":[{"handler":"tcpops","lifetime":"1h"}]},
 {"handle":[{"handler":"echo"}]}]}}}}}`, addr))

	c := dial(t, addr)
	roundTrip(t, c, "REGISTER")
	tc := waitTracked(t, c)
	if !tc.watched.Load() {
		t.Fatal("a connection of a non-terminal route is not watched by the sweep")
	}
	closed := time.Now()
	_ = c.Close()
	eventually(t, 2*time.Second, "the connection closed behind tcpops' back gone from the registry", func() bool {
		return connections.get(tc.ID()) == nil
	})
	t.Logf("gone from the registry %v after the client's close", time.Since(closed).Round(time.Millisecond))
	assertEnded(t, tc, ReasonClosed, CauseEOF)
}

// A Conn fits Go's 320-byte size class on 64-bit platforms: the memory per
// idle connection in BENCHMARKS.md counts on it, and the next class is
// 352 bytes, 32 more for every connection. A field that must grow it says
// so here.
func TestConnSizeClass(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("the size class is figured for 64-bit platforms")
	}
	if n := unsafe.Sizeof(Conn{}); n > 320 {
		t.Fatalf("a Conn is %d bytes, over the 320-byte size class", n)
	}
}
