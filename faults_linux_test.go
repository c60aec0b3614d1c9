//go:build linux

package tcpops

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The fault table of docs/events.md: each way a peer can fail (its packets
// silently dropped; a router answering for it with ICMP host, net or port
// unreachable; an RST; a zero window; its FIN) crossed with what detects
// it: keepalive alone on an idle connection, user_timeout alone with data
// in flight, and data in flight with keepalive alone (the kernel's
// tcp_retries2). Every cell is a connection through its own layer4 server,
// all in one Caddy in one private network namespace, run in parallel so
// that the table costs the time of its slowest cell.

// faultColumn is what can detect a fault, as a tcpops handler's options.
type faultColumn struct {
	name   string
	tcpops string
	flow   bool // the upstream keeps sending once the fault is in place
}

var faultColumns = []faultColumn{
	{"keepalive", `{"handler":"tcpops","keepalive":{"idle":"2s","count":2,"interval":"1s"},"events":true}`, false},
	{"user_timeout", `{"handler":"tcpops","keepalive":{"off":true},"user_timeout":"2s","events":true}`, true},
	{"in_flight", `{"handler":"tcpops","keepalive":{"idle":"2s","count":2,"interval":"1s"},"events":true}`, true},
}

// faultRow is a way the peer fails, with the end it must give in each
// column (reason/cause, or "open": the connection lives on, as it should),
// and when: how long after the fault, at least and at most (0: not
// checked).
type faultRow struct {
	name   string
	reject string // iptables' --reject-with for Caddy's packets to the peer; "" none
	drop   bool   // the peer's own packets are dropped (not with an RST forged in its name: it would be dropped too)
	want   [3]string
	within [3][2]time.Duration
}

// keepalive 2 2 1 gives up 2s + 2 x 1s after the last traffic; the user
// timeout 2s after the first unacknowledged data; tcp_retries2 3 between
// 3s and the retransmission timer at 12.6s (TestDeadPeerKernelTimeout).
var (
	afterKeepalive   = [2]time.Duration{3 * time.Second, 9 * time.Second}
	afterUserTimeout = [2]time.Duration{1500 * time.Millisecond, 8 * time.Second}
	afterRetries2    = [2]time.Duration{3 * time.Second, 15 * time.Second}
	silentDead       = [3][2]time.Duration{afterKeepalive, afterUserTimeout, afterRetries2}
)

var faultRows = []faultRow{
	{"drop", "", true, [3]string{"timeout/keepalive", "timeout/user_timeout", "timeout/kernel"}, silentDead},
	{"icmp_host_unreachable", "icmp-host-unreachable", true, [3]string{"timeout/keepalive", "timeout/user_timeout", "timeout/kernel"}, silentDead},
	{"icmp_net_unreachable", "icmp-net-unreachable", true, [3]string{"timeout/keepalive", "timeout/user_timeout", "timeout/kernel"}, silentDead},
	{"icmp_port_unreachable", "icmp-port-unreachable", true, [3]string{"timeout/keepalive", "timeout/user_timeout", "timeout/kernel"}, silentDead},
	{"rst", "tcp-reset", false, [3]string{"reset/reset", "reset/reset", "reset/reset"}, [3][2]time.Duration{}},
	{"zero_window", "", false, [3]string{"open", "timeout/user_timeout", "open"}, [3][2]time.Duration{{}, afterUserTimeout, {}}},
	{"fin", "", false, [3]string{"closed/eof", "closed/eof", "closed/eof"}, [3][2]time.Duration{}},
}

// faultOpenFor is how long an "open" cell must stay open after its fault:
// past every other cell's latest end but the kernel's.
const faultOpenFor = 9 * time.Second

// faultCell is one cell of the table: its server's address, and the
// channel that starts its upstream's flow.
type faultCell struct {
	row   faultRow
	col   int
	name  string
	addr  string
	send  chan struct{}
	small bool // the client's receive window is small: it stops reading
}

// iptables runs iptables in the namespace.
func iptables(t *testing.T, args ...string) {
	t.Helper()
	// -w: the cells run in parallel, and iptables takes a lock.
	if out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("iptables %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func TestFaultTable(t *testing.T) {
	if !deadPeerNetns.Run(t) {
		return
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_retries2", []byte("3"), 0o644); err != nil {
		t.Fatalf("lowering tcp_retries2 in the namespace: %v", err)
	}
	var cells []*faultCell
	var servers []string
	for _, row := range faultRows {
		for i, col := range faultColumns {
			ce := &faultCell{row: row, col: i, name: row.name + "/" + col.name, addr: freePort(t), send: make(chan struct{}), small: row.name == "zero_window"}
			var handle func(net.Conn) // an echo: the connection stays idle
			if col.flow {
				handle = floodAfter(ce.send)
			}
			up := startUpstream(t, handle)
			servers = append(servers, fmt.Sprintf(`%q:{"listen":[%q],"routes":[{"handle":[%s,%s]}]}`,
				ce.name, ce.addr, col.tcpops, proxyTo(up.addr())))
			cells = append(cells, ce)
		}
	}
	et := startEventsTestServers(t, "", strings.Join(servers, ","), cells[0].addr, 0)

	// All at once: t.Parallel would run no more than GOMAXPROCS of them
	// at a time, and they mostly wait on the kernel. Run may be called
	// from several goroutines.
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, ce := range cells {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(strings.ReplaceAll(ce.name, "/", "_"), func(t *testing.T) { ce.run(t, et) })
		}()
	}
}

// run connects through the cell's server, puts the fault in place and
// checks the end.
func (ce *faultCell) run(t *testing.T, et *eventsTest) {
	var c *net.TCPConn
	if ce.small {
		c = dialSmallWindow(t, ce.addr)
	} else {
		c = dial(t, ce.addr)
	}
	roundTrip(t, c, "hello")
	tc := waitTracked(t, c)
	// The rules name both ports: Linux gives connections to different
	// destinations the same ephemeral port, so a rule on the client's port
	// alone can catch another cell's connection (the zero_window cell's
	// first echo timed out 1 run in 6 so).
	port := strconv.Itoa(c.LocalAddr().(*net.TCPAddr).Port)
	server := strconv.Itoa(c.RemoteAddr().(*net.TCPAddr).Port)
	if ce.row.reject != "" {
		iptables(t, "-I", "INPUT", "-p", "tcp", "--sport", server, "--dport", port, "-j", "REJECT", "--reject-with", ce.row.reject)
	}
	if ce.row.drop {
		iptables(t, "-I", "INPUT", "-p", "tcp", "--sport", port, "--dport", server, "-j", "DROP")
	}
	fault := time.Now()
	close(ce.send)
	if ce.row.name == "fin" {
		// The peer's FIN, then (data may still come) its close.
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "the FIN read", tc.readDone.Load)
		_ = c.Close()
	}

	want := ce.row.want[ce.col]
	if want == "open" {
		time.Sleep(faultOpenFor) // a claim that nothing happens for a while
		if reason, cause := tc.endedWith(); reason != "" {
			t.Fatalf("%s: ended %s/%s after %v, want it open: the peer is alive", ce.name, reason, cause, time.Since(fault))
		}
		return
	}
	ev := et.rec.waitEvent(t, tc.ID(), 30*time.Second)
	if got := fmt.Sprintf("%v/%v", ev.data["reason"], ev.data["cause"]); got != want {
		t.Fatalf("%s: ended %s, want %s", ce.name, got, want)
	}
	// When the end was, by tcpops' own clock: the connection's
	// start plus the event's duration.
	took := tc.start.Add(time.Duration(ev.data["duration"].(float64) * float64(time.Second))).Sub(fault)
	t.Logf("%s: %s %v after the fault (idle %.2fs)", ce.name, want, took.Round(10*time.Millisecond), ev.data["idle"])
	if w := ce.row.within[ce.col]; w[1] > 0 && (took < w[0] || took > w[1]) {
		t.Errorf("%s: %s after %v, want between %v and %v", ce.name, want, took, w[0], w[1])
	}
}
