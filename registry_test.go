package tcpops

import (
	"encoding/json"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// These tests and benchmarks use a private registry, marked as already
// sweeping so that no sweeper starts: the sweeper would end the test's
// connections, which share one socket and have no tracker.

func quietRegistry() *registry {
	r := newRegistry()
	r.sweeping.Store(true)
	return r
}

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

// fillRegistry registers n connections that all wrap the socket tc.
func fillRegistry(r *registry, tc *net.TCPConn, n int) {
	start := time.Now()
	for range n {
		c := &Conn{Conn: tc, tcp: tc, start: start}
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
			for range each {
				r.add(&Conn{})
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
	if l.Total != 250 || len(l.Connections) != 100 || l.NextAfter != 150 {
		t.Fatalf("total %d, listed %d, next %d; want 250, 100, 150", l.Total, len(l.Connections), l.NextAfter)
	}
	for i, ci := range l.Connections {
		if ci.ID != uint64(51+i) {
			t.Fatalf("entry %d has id %d, want %d", i, ci.ID, 51+i)
		}
	}
	miss, _ := parseAddrFilter("remote", "10.1.2.3")
	if l := listConnections(r, listQuery{limit: 10, remote: miss}); l.Total != 0 || len(l.Connections) != 0 {
		t.Fatalf("filter that matches nothing: %+v", l)
	}
}

// BenchmarkRegistryAddRemove is the registry's cost on the connection path:
// one add (id, shard insert) and one remove per connection, from every
// core at once.
func BenchmarkRegistryAddRemove(b *testing.B) {
	r := quietRegistry()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		c := &Conn{}
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
		c := &Conn{}
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
