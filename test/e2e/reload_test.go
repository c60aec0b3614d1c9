//go:build linux

package e2e

import (
	"fmt"
	"net"
	"sort"
	"sync"
	"testing"
	"time"
)

// reloadBatch is one generation of connections, opened under one config.
type reloadBatch struct {
	name      string
	keepalive [3]int // idle, count, interval
	lifetime  time.Duration

	conns      []*net.TCPConn
	lastActive []time.Time
	closedAt   []time.Time
}

func (b *reloadBatch) handler() string {
	return fmt.Sprintf(`{"handler":"tcpops","keepalive":{"idle":"%ds","count":%d,"interval":"%ds"},"lifetime":"%dms"}`,
		b.keepalive[0], b.keepalive[1], b.keepalive[2], b.lifetime.Milliseconds())
}

func (b *reloadBatch) config() string {
	return config(l4server{"srv", withAddr, []string{b.handler(), proxyTo(upAddr)}})
}

func (b *reloadBatch) wantKeepalive() string {
	return fmt.Sprintf("%d/%d/%d", b.keepalive[0], b.keepalive[1], b.keepalive[2])
}

// open dials n connections and exchanges a message on each, then waits in
// the background for each to be closed.
func (b *reloadBatch) open(t *testing.T, n int, wg *sync.WaitGroup) {
	t.Helper()
	b.conns = make([]*net.TCPConn, n)
	b.lastActive = make([]time.Time, n)
	b.closedAt = make([]time.Time, n)
	for i := range n {
		b.conns[i] = dial(t, withAddr)
		roundTrip(t, b.conns[i], "ping")
		b.lastActive[i] = time.Now()
	}
	for i, c := range b.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.closedAt[i], _ = readUntilClosed(c, 30*time.Second)
		}()
	}
}

// TestReload: connections opened under config A stay open across a
// `caddy reload` to B and a POST /load of C, keep A's keepalive on their
// sockets and A's lifetime, and are closed on A's schedule; connections
// opened under B and C get B's and C's values. No panic, and once all are
// closed Caddy's goroutines and descriptors are back to their baseline and
// tcpops tracks nothing.
func TestReload(t *testing.T) {
	if !inNetns(t) {
		return
	}
	const perBatch = 20
	batches := []*reloadBatch{
		{name: "A", keepalive: [3]int{7, 3, 2}, lifetime: 3 * time.Second},
		{name: "B", keepalive: [3]int{11, 4, 3}, lifetime: 6 * time.Second},
		{name: "C", keepalive: [3]int{13, 5, 4}, lifetime: 4500 * time.Millisecond},
	}
	u := startUpstream(t, upAddr, nil)
	c := startCaddy(t, batches[0].config(), withAddr)
	baseG, baseFD := c.goroutines(t), c.fds(t)

	var wg sync.WaitGroup
	batches[0].open(t, perBatch, &wg)
	c.reload(t, batches[1].config()) // the operator's way
	batches[1].open(t, perBatch, &wg)
	c.load(t, batches[2].config()) // the API's way
	batches[2].open(t, perBatch, &wg)
	if got := c.tracked(t); got != 3*perBatch {
		t.Fatalf("after two reloads tcpops tracks %d connections, want %d", got, 3*perBatch)
	}

	// Each connection's socket keeps the values of the config it was
	// opened under.
	conns := c.conns(t)
	for _, b := range batches {
		for _, cl := range b.conns {
			ci, ok := conns[cl.LocalAddr().String()]
			if !ok {
				t.Fatalf("batch %s: connection from %v not tracked", b.name, cl.LocalAddr())
			}
			if got := ci.keepalive(); got != b.wantKeepalive() {
				t.Errorf("batch %s: socket keepalive %s, want %s", b.name, got, b.wantKeepalive())
			}
		}
	}

	wg.Wait()
	var report []string
	for _, b := range batches {
		var idle []time.Duration
		for i := range b.conns {
			if b.closedAt[i].IsZero() {
				t.Fatalf("batch %s: connection %d not closed within 30s", b.name, i)
			}
			idle = append(idle, b.closedAt[i].Sub(b.lastActive[i]))
		}
		sort.Slice(idle, func(i, j int) bool { return idle[i] < idle[j] })
		lo, hi := idle[0], idle[len(idle)-1]
		// A client notes its last byte when its reader runs, which on a
		// loaded machine can be well after Caddy wrote it: its view of an
		// early close is judged within 1s, tcpops' own idle time below.
		if lo < b.lifetime-time.Second || hi > b.lifetime+1500*time.Millisecond {
			t.Errorf("batch %s: closed after %v..%v idle, want its lifetime %v (+1.5s)", b.name, lo, hi, b.lifetime)
		}
		report = append(report, fmt.Sprintf("%s (keepalive %s, lifetime %v): closed after %.2f..%.2fs idle",
			b.name, b.wantKeepalive(), b.lifetime, lo.Seconds(), hi.Seconds()))
	}
	lifetimeEnds := c.countEnds(t, "timeout", "lifetime", 3*perBatch)
	lifetimeOf := map[string]time.Duration{}
	for _, b := range batches {
		for _, cl := range b.conns {
			lifetimeOf[cl.LocalAddr().String()] = b.lifetime
		}
	}
	for _, e := range c.ends(t) {
		if lt := lifetimeOf[e.Remote]; time.Duration(e.Idle*float64(time.Second)) < lt {
			t.Errorf("tcpops closed the connection from %s after %.3fs idle, before its lifetime %v", e.Remote, e.Idle, lt)
		}
	}

	// Nothing left behind. A leak would be one goroutine or more per
	// connection (60 here); two spare allow for Caddy's own comings and
	// goings between configs.
	var g, fds int
	c.eventually(t, 10*time.Second, "caddy back to its baseline", func() bool {
		g, fds = c.goroutines(t), c.fds(t)
		return c.tracked(t) == 0 && u.open() == 0 && g <= baseG+2 && fds <= baseFD
	})
	figure(t, "reload", "%d connections per config, configs replaced by caddy reload and POST /load while open: %s; tcpops logged %d timeout/lifetime; goroutines %d -> %d, descriptors %d -> %d, tracked 0",
		perBatch, joinSemi(report), lifetimeEnds, baseG, g, baseFD, fds)
}

func joinSemi(parts []string) string {
	s := ""
	for i, p := range parts {
		if i > 0 {
			s += "; "
		}
		s += p
	}
	return s
}
