package tcpops

import (
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"
)

// The remote address indexes (registry.byRemote and byAddr) against a
// model: every live connection, filtered by hand. Peers share IPs by the
// thousand (a carrier-grade NAT), share ports across IPs, and now and then
// an IP:port (one peer port to two of our addresses); connections are
// added, removed, and indexed late (at their first Read, behind
// proxy_protocol), out of id order.

// indexModel is what the index must answer, worked out by walking.
type indexModel struct {
	r    *registry
	live []*Conn // every registered connection, in id order
}

func (m *indexModel) peer(c *Conn) netip.AddrPort {
	ap, _ := addrPortOf(c.RemoteAddr())
	return ap
}

// check compares every answer of the index with the model's, for ip and
// for ip:port, and the chains' invariants.
func (m *indexModel) check(t testing.TB, ip netip.Addr, port uint16) {
	t.Helper()
	var wantIP, wantAddr []uint64
	for _, c := range m.live {
		if c.remoteKey == 0 {
			continue // not indexed yet
		}
		if p := m.peer(c); p.Addr() == ip {
			wantIP = append(wantIP, c.id)
			if p.Port() == port {
				wantAddr = append(wantAddr, c.id)
			}
		}
	}
	ids := func(cs []*Conn) []uint64 {
		out := []uint64{}
		for _, c := range cs {
			out = append(out, c.id)
		}
		return out
	}
	if got := ids(m.r.byRemoteAddr(ip, 0)); !slices.Equal(got, append([]uint64{}, wantIP...)) {
		t.Fatalf("byRemoteAddr(%v): %v, want %v", ip, got, wantIP)
	}
	if got := ids(m.r.byRemoteAddr(ip, port)); !slices.Equal(got, append([]uint64{}, wantAddr...)) {
		t.Fatalf("byRemoteAddr(%v, %d): %v, want %v", ip, port, got, wantAddr)
	}
	// Pages of 7 from the start, each after the last of the one before,
	// cover the IP's connections exactly once, in order.
	var paged []uint64
	var after uint64
	for {
		page, total := m.r.remotePage(ip, after, 7)
		if total != len(wantIP) {
			t.Fatalf("remotePage(%v): total %d, want %d", ip, total, len(wantIP))
		}
		if len(page) == 0 {
			break
		}
		paged = append(paged, ids(page)...)
		after = page[len(page)-1].id
	}
	if !slices.Equal(paged, append([]uint64{}, wantIP...)) {
		t.Fatalf("remotePage(%v) pages: %v, want %v", ip, paged, wantIP)
	}
	// A page after any id, live or not, is what follows it.
	for _, after := range []uint64{1, m.r.lastID / 2, m.r.lastID, m.r.lastID + 1, ^uint64(0)} {
		page, _ := m.r.remotePage(ip, after, 3)
		var want []uint64
		for _, id := range wantIP {
			if id > after && len(want) < 3 {
				want = append(want, id)
			}
		}
		if got := ids(page); !slices.Equal(got, append([]uint64{}, want...)) {
			t.Fatalf("remotePage(%v, after %d): %v, want %v", ip, after, got, want)
		}
	}
	m.r.mu.Lock()
	defer m.r.mu.Unlock()
	for key, head := range m.r.byRemote {
		n := 0
		var last *Conn
		for c := head; c != nil; c = c.remoteNext {
			if last != nil && (c.id <= last.id || c.remotePrev != last) {
				t.Fatalf("chain of key %x out of order at %d", key, c.id)
			}
			last = c
			n++
		}
		if head.remotePrev != last {
			t.Fatalf("chain of key %x: the first one's back link is %d, not the last, %d", key, head.remotePrev.id, last.id)
		}
		if c := m.r.ipCount[key]; (n > 1 && c != n) || (n == 1 && c != 0) {
			t.Fatalf("chain of key %x: %d connections, counted %d", key, n, c)
		}
	}
}

func (m *indexModel) add(c *Conn, late bool) {
	if late {
		c.readHook.Store(hookIndex)
		// registry.add without indexing, as for a connection behind
		// proxy_protocol: indexed at its first Read.
		m.r.mu.Lock()
		m.r.lastID++
		c.id = m.r.lastID
		c.reg = m.r
		m.r.order = append(m.r.order, regEntry{c.id, c})
		m.r.mu.Unlock()
		m.r.live.Add(1)
	} else {
		m.r.add(c)
	}
	m.live = append(m.live, c)
}

func (m *indexModel) remove(i int) {
	m.r.remove(m.live[i])
	m.live = slices.Delete(m.live, i, i+1)
}

// indexModelConn is a connection from ip:port to one of two local
// addresses.
func indexModelConn(ip netip.Addr, port uint16, local int) *Conn {
	return &Conn{Conn: &simConn{
		remote: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port)),
		local:  &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+local)), Port: 5060},
	}}
}

// Thousands of peers behind one IP, with churn and late indexing.
func TestRegistryIndexSharedIP(t *testing.T) {
	m := &indexModel{r: quietRegistry()}
	nat := netip.MustParseAddr("198.51.100.1")
	other := netip.MustParseAddr("2001:db8::1")
	rng := rand.New(rand.NewPCG(1, 2))
	var late []*Conn
	for i := range 5000 {
		ip := nat
		if i%10 == 0 {
			ip = other
		}
		c := indexModelConn(ip, uint16(1024+i%3000), i%2) // ports repeat: two locals
		isLate := i%13 == 0
		m.add(c, isLate)
		if isLate {
			late = append(late, c)
		}
		if i%3 == 0 && len(m.live) > 1 {
			m.remove(rng.IntN(len(m.live) - 1))
		}
		// Index the late ones a few connections later, out of id order.
		if len(late) > 0 && rng.IntN(4) == 0 {
			c := late[0]
			late = late[1:]
			if c.takeIndexPending() {
				m.r.indexLate(c)
			}
		}
	}
	for _, port := range []uint16{1024, 1500, 2999, 4000} {
		m.check(t, nat, port)
		m.check(t, other, port)
	}
	for len(m.live) > 0 {
		m.remove(rng.IntN(len(m.live)))
	}
	if len(m.r.byRemote) != 0 || len(m.r.byAddr) != 0 || len(m.r.ipCount) != 0 || len(m.r.mixedIP) != 0 {
		t.Fatalf("after removing all: %d IP chains, %d IP:port chains, %d counts, %d mixed",
			len(m.r.byRemote), len(m.r.byAddr), len(m.r.ipCount), len(m.r.mixedIP))
	}
}

// FuzzRegistryIndex drives the index with random adds (from a few IPs and
// ports), removals and late indexing, and compares every answer with the
// model's.
func FuzzRegistryIndex(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 200, 201, 130, 131})
	f.Add([]byte{7, 7, 7, 7, 7, 7, 255, 255, 128, 0, 0, 0})
	ips := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"),
		netip.MustParseAddr("::ffff:192.0.2.3"), netip.MustParseAddr("2001:db8::1")}
	f.Fuzz(func(t *testing.T, ops []byte) {
		m := &indexModel{r: quietRegistry()}
		var late []*Conn
		for _, op := range ops {
			switch {
			case op < 128: // add from ip op%4, port op/4%4, local op/16%2; late if op/32%2
				c := indexModelConn(ips[op%4].Unmap(), 5060+uint16(op/4%4), int(op/16%2))
				isLate := op/32%2 == 1
				m.add(c, isLate)
				if isLate {
					late = append(late, c)
				}
			case op < 192: // remove
				if len(m.live) > 0 {
					m.remove(int(op) % len(m.live))
				}
			default: // index the oldest late one
				if len(late) > 0 {
					c := late[0]
					late = late[1:]
					if c.takeIndexPending() {
						m.r.indexLate(c)
					}
				}
			}
		}
		for _, ip := range ips {
			m.check(t, ip.Unmap(), 5061)
		}
	})
}
