package tcpops

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// A SIP registrar's scale, simulated: these benchmarks track 1,000, 18,000
// and 1,000,000 connections without sockets (simConn, one peer address
// each), since a process here may hold no more than 20,000 descriptors.
// Everything but the socket is real: each connection is a Conn registered in
// a registry with its remote address indexed, and has its lifetime timer
// armed, as track does. BENCHMARKS.md has the figures:
//
//	go test -run '^$' -bench 'BenchmarkScale|BenchmarkSocketClosed' -timeout 30m .
//
// The admin benchmarks call the admin API's handler with an httptest
// request, so they include routing the request and encoding the answer;
// the connections have no socket to read with getsockopt.

// scaleSizes are the registry sizes the benchmarks compare.
var scaleSizes = []int{1_000, 18_000, 1_000_000}

// scaleFixture is a registry of n simulated connections.
type scaleFixture struct {
	reg     *registry
	conns   []*Conn
	tracker *tracker
}

var (
	scaleMu       sync.Mutex
	scaleFixtures = map[int]*scaleFixture{}
)

// scaleOptions are those of example/Caddyfile's registered phones: a
// lifetime long enough that no timer fires while the benchmarks run.
var scaleOptions = &Options{Lifetime: OptionalDuration(time.Hour), MaxLifetime: OptionalDuration(24 * time.Hour)}

// simTracker returns a tracker with scaleOptions that reports nowhere.
func simTracker() *tracker {
	return &tracker{opts: scaleOptions, logger: zap.NewNop()}
}

// trackSim tracks sc in r as track does for a real connection: registered,
// options applied, timer armed. Every connection is watched by the sweep,
// as a registrar's are behind a tcpops in a non-terminal route.
func trackSim(r *registry, t *tracker, sc *simConn) *Conn {
	c := &Conn{Conn: sc, start: time.Now(), tracker: t}
	r.add(c)
	c.update(t.opts, t.logger)
	watchSim(r, c)
	return c
}

// fixture returns the shared registry of n simulated connections, built on
// first use.
func fixture(b *testing.B, n int) *scaleFixture {
	b.Helper()
	scaleMu.Lock()
	defer scaleMu.Unlock()
	if f := scaleFixtures[n]; f != nil {
		return f
	}
	f := &scaleFixture{reg: quietRegistry(), tracker: simTracker(), conns: make([]*Conn, n)}
	for i := range n {
		f.conns[i] = trackSim(f.reg, f.tracker, &simConn{remote: simAddr(i), local: simLocal})
	}
	scaleFixtures[n] = f
	runtime.GC() // the build's garbage is not the benchmarks' to collect
	return f
}

// withRegistry makes r the registry the admin API answers from while fn
// runs. No Caddy runs during these benchmarks, so nothing else uses it.
func withRegistry(r *registry, fn func()) {
	saved := connections
	connections = r
	defer func() { connections = saved }()
	fn()
}

// forEachSize runs fn as a sub-benchmark per registry size.
func forEachSize(b *testing.B, fn func(b *testing.B, f *scaleFixture)) {
	for _, n := range scaleSizes {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) { fn(b, fixture(b, n)) })
	}
}

// BenchmarkScaleMemory is the memory one tracked connection costs: the
// Conn, its timer, its registry entry and its place in the address index,
// measured as the growth of the live heap while n connections are tracked.
// The simulated sockets are allocated before the first measure.
func BenchmarkScaleMemory(b *testing.B) {
	for _, peers := range []string{"distinct", "one-IP"} {
		for _, n := range scaleSizes {
			b.Run(fmt.Sprintf("peers=%s/conns=%d", peers, n), func(b *testing.B) {
				benchmarkScaleMemory(b, n, peers == "one-IP")
			})
		}
	}
}

func benchmarkScaleMemory(b *testing.B, n int, oneIP bool) {
	var perConn float64
	for b.Loop() {
		socks := make([]*simConn, n)
		for i := range socks {
			socks[i] = &simConn{remote: simAddr(i), local: simLocal}
			if oneIP {
				socks[i] = simSharedIP(i)
			}
		}
		r, t := quietRegistry(), simTracker()
		conns := make([]*Conn, n) // the benchmark's own, not counted
		before := liveHeap()
		for i, sc := range socks {
			conns[i] = trackSim(r, t, sc)
		}
		perConn = float64(liveHeap()-before) / float64(n)
		for _, c := range conns {
			c.end(ReasonClosed, CauseEOF)
		}
		runtime.KeepAlive(socks)
	}
	b.ReportMetric(perConn, "B/conn")
}

// simSharedIP returns the i-th simulated connection of peers that all share
// one IP, as phones behind a carrier-grade NAT: a port is 1024 to 61023,
// and past 60,000 connections the same ports come again to another of our
// addresses (one IP can reach one address of ours from 60,000 ports only).
func simSharedIP(i int) *simConn {
	return &simConn{
		remote: &net.TCPAddr{IP: net.IPv4(10, 9, 0, 1).To4(), Port: 1024 + i%60000},
		local:  &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i/60000)).To4(), Port: 5060},
	}
}

// BenchmarkScaleLookupSharedIP is Kamailio's tcp_get_conid among n
// connections that all come from one IP: the connections of a peer IP:port
// from the IP:port index, which does not walk the IP's other connections.
// At 1,000,000 each IP:port has 16 or 17 connections, to as many of our
// addresses (simSharedIP), and the lookup returns them all.
func BenchmarkScaleLookupSharedIP(b *testing.B) {
	for _, n := range scaleSizes {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			r, tr := quietRegistry(), simTracker()
			conns := make([]*Conn, n)
			for i := range conns {
				conns[i] = trackSim(r, tr, simSharedIP(i))
			}
			b.Cleanup(func() {
				for _, c := range conns {
					c.end(ReasonClosed, CauseEOF)
				}
			})
			ip := netip.AddrFrom4([4]byte{10, 9, 0, 1})
			want := (n + 59999) / 60000
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				port := uint16(1024 + i%min(n, 60000))
				i += 7919
				if got := r.byRemoteAddr(ip, port); len(got) < want-1 || len(got) > want {
					b.Fatalf("%v:%d: %d connections, want %d", ip, port, len(got), want)
				}
			}
		})
	}
}

// liveHeap returns the bytes of live heap objects after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkScaleAddRemove is a connection coming and going while n are
// tracked: registered (id, order, index), options applied, timer armed,
// then ended.
func BenchmarkScaleAddRemove(b *testing.B) {
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		sc := &simConn{remote: simAddr(len(f.conns) + 1), local: simLocal}
		b.ReportAllocs()
		for b.Loop() {
			trackSim(f.reg, f.tracker, sc).end(ReasonClosed, CauseEOF)
		}
	})
}

// BenchmarkScaleLookupByAddress is Kamailio's tcp_get_conid: the
// connection of a peer IP:port, from the index.
func BenchmarkScaleLookupByAddress(b *testing.B) {
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		peers := make([]netip.AddrPort, 4096)
		for i := range peers {
			peers[i] = simAddr(rand.IntN(len(f.conns))).AddrPort()
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			p := peers[i%len(peers)]
			i++
			if got := f.reg.byRemoteAddr(p.Addr().Unmap(), p.Port()); len(got) != 1 {
				b.Fatalf("%v: %d connections", p, len(got))
			}
		}
	})
}

// BenchmarkScalePage is choosing a page of 100 connections, in id order,
// at the start, the middle and the end of the registry: what
// GET /tcpops/connections?limit=100&after= costs before each listed
// connection is read and encoded (BenchmarkScaleAdmin has the whole
// request).
func BenchmarkScalePage(b *testing.B) {
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		n := len(f.conns)
		for _, at := range []struct {
			name  string
			after uint64
		}{{"start", 0}, {"middle", f.conns[n/2].id}, {"end", f.conns[n-101].id}} {
			b.Run(at.name, func(b *testing.B) {
				page := make([]*Conn, 0, 101)
				b.ReportAllocs()
				for b.Loop() {
					page = page[:0]
					f.reg.eachAfter(at.after, func(c *Conn) bool {
						page = append(page, c)
						return len(page) <= 100
					})
					if len(page) < 100 {
						b.Fatalf("page of %d", len(page))
					}
				}
			})
		}
	})
}

// adminCall sends one request to the admin API's handler and requires
// status 200.
func adminCall(b *testing.B, a *adminAPI, method, target, body string) {
	req := httptest.NewRequest(method, target, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	w := httptest.NewRecorder()
	if err := a.handleConnections(w, req); err != nil {
		b.Fatalf("%s %s: %v", method, target, err)
	}
	if w.Code != http.StatusOK {
		b.Fatalf("%s %s: %d %s", method, target, w.Code, w.Body)
	}
}

// BenchmarkScaleAdmin is each admin API question with n connections
// tracked, through the admin handler: GET by address, GET by id, PATCH by
// address (a registrar raising a phone's lifetime after its REGISTER), and
// a page of 100 at the start, the middle and the end (?limit=100&after=).
func BenchmarkScaleAdmin(b *testing.B) {
	a := &adminAPI{logger: zap.NewNop()}
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		n := len(f.conns)
		withRegistry(f.reg, func() {
			peer := func() string { return simAddr(rand.IntN(n)).String() }
			id := func() uint64 { return f.conns[rand.IntN(n)].id }
			for _, bc := range []struct {
				name string
				call func()
			}{
				{"get-by-address", func() { adminCall(b, a, http.MethodGet, "/tcpops/connections?remote="+peer(), "") }},
				{"get-by-id", func() { adminCall(b, a, http.MethodGet, fmt.Sprintf("/tcpops/connections/%d", id()), "") }},
				{"patch-by-address", func() {
					adminCall(b, a, http.MethodPatch, "/tcpops/connections?remote="+peer(), `{"lifetime":"1h"}`)
				}},
				{"page-start", func() { adminCall(b, a, http.MethodGet, "/tcpops/connections?limit=100", "") }},
				{"page-middle", func() {
					adminCall(b, a, http.MethodGet, fmt.Sprintf("/tcpops/connections?limit=100&after=%d", f.conns[n/2].id), "")
				}},
				{"page-end", func() {
					adminCall(b, a, http.MethodGet, fmt.Sprintf("/tcpops/connections?limit=100&after=%d", f.conns[n-101].id), "")
				}},
			} {
				b.Run(bc.name, func(b *testing.B) {
					b.ReportAllocs()
					for b.Loop() {
						bc.call()
					}
				})
			}
		})
	})
}

// BenchmarkScaleSweep is one wake-up of the sweep with n watched
// connections: it visits up to sweepBudget of them. It wakes up once a
// second, so its ns/op divided by 10^7 is the percentage of a core it
// takes. A simulated connection has no socket, so the visit leaves out the
// socket check, which BenchmarkSocketClosed measures.
func BenchmarkScaleSweep(b *testing.B) {
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		b.ReportAllocs()
		for b.Loop() {
			f.reg.sweepStep(sweepBudget)
		}
		perWake := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
		b.ReportMetric(perWake/1e7, "%core")
	})
}

// BenchmarkSocketClosed is the sweep's check of one real socket.
func BenchmarkSocketClosed(b *testing.B) {
	c := &Conn{tcp: socketPair(b)}
	b.ReportAllocs()
	for b.Loop() {
		if c.socketClosed() {
			b.Fatal("open socket reported closed")
		}
	}
}

// BenchmarkScaleIdleCPU is the CPU the process spends while n tracked
// connections are idle and the real sweeper runs, measured with getrusage
// over 5 seconds, in % of a core. Nothing else runs in the process then, so
// it is the background cost of tracking them: the sweep, and any timer
// work. Run it with -benchtime 1x.
func BenchmarkScaleIdleCPU(b *testing.B) {
	forEachSize(b, func(b *testing.B, f *scaleFixture) {
		for b.Loop() {
			f.reg.sweeping.Store(false) // the fixture's registry was quiet
			f.reg.sweeping.Store(true)
			go f.reg.sweep()
			runtime.GC()
			before, start := cpuTime(b), time.Now()
			time.Sleep(5 * time.Second)
			used, wall := cpuTime(b)-before, time.Since(start)
			b.ReportMetric(100*used.Seconds()/wall.Seconds(), "%core")
			// Stop the sweeper: it exits once nothing is watched.
			watched := f.reg.watched.Swap(0)
			for f.reg.sweeping.Load() {
				time.Sleep(10 * time.Millisecond)
			}
			f.reg.watched.Store(watched)
			f.reg.sweeping.Store(true) // quiet again
		}
	})
}
