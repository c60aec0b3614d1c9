//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// The harness of the process-level tests: each test runs, alone, in a
// private network namespace of its own (fixed loopback ports, iptables rules
// that vanish with it, no traffic of other tests), against the Caddy binary
// named by CADDY_BIN, started as a child process.

const (
	// netnsEnv names the test a re-executed test binary runs inside its
	// namespace.
	netnsEnv = "TCPOPS_E2E_NETNS"
	// figureMark starts a line of the child's output that carries a
	// measured figure; the parent prints it on its own line without the mark.
	figureMark = "E2E-FIGURE "

	adminAddr = "127.0.0.1:2019"
)

// TestMain runs the scale test's client helper when this binary was started
// as one (see runClients), and the tests otherwise.
func TestMain(m *testing.M) {
	if spec := os.Getenv(clientsEnv); spec != "" {
		runClients(spec)
		return
	}
	os.Exit(m.Run())
}

// caddyBin returns the Caddy binary under test or skips the test.
func caddyBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("CADDY_BIN")
	if bin == "" {
		t.Skip("set CADDY_BIN to a caddy built with xcaddy (test/e2e/run.sh builds one)")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("CADDY_BIN: %v", err)
	}
	return abs
}

// inNetns runs the calling test again, alone, in a private network
// namespace (testutil.Netns) and reports its outcome; it returns true in
// that re-executed child, where the test body runs, and false in the
// parent, which prints the child's figures on lines of their own. tools
// are the commands the test needs besides unshare, ip and ss.
func inNetns(t *testing.T, tools ...string) bool {
	t.Helper()
	caddyBin(t)
	return testutil.Netns{
		Env:     netnsEnv,
		Tools:   append([]string{"ss"}, tools...),
		Timeout: 5 * time.Minute,
		Line: func(line string) {
			if _, fig, ok := strings.Cut(line, figureMark); ok {
				fmt.Println(fig)
			}
		},
	}.Run(t)
}

// figure prints a measured figure, e.g. figure(t, "deadpeer-idle",
// "closed after %.2fs (bound %.2fs)", took, bound).
func figure(t *testing.T, name, format string, args ...any) {
	t.Helper()
	fmt.Printf("%s%s: %s\n", figureMark, name, fmt.Sprintf(format, args...))
}

// caddyProc is a Caddy child process with its admin endpoint on adminAddr.
type caddyProc struct {
	cmd     *exec.Cmd
	dir     string
	logPath string
	http    *http.Client
	exited  chan struct{}
	waitErr error
	stopped bool // the test stopped it (caddy stop): its exit is no failure
}

// l4server is one caddy-l4 server of a test config: one route with the
// given handler objects.
type l4server struct {
	name, listen string
	handlers     []string
}

// config returns a Caddy JSON config with the admin endpoint on adminAddr,
// JSON logs at info level on stderr, and the layer4 servers.
func config(servers ...l4server) string {
	var b strings.Builder
	for i, s := range servers {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `%q:{"listen":[%q],"routes":[{"handle":[%s]}]}`,
			s.name, s.listen, strings.Join(s.handlers, ","))
	}
	return fmt.Sprintf(`{"admin":{"listen":%q,"config":{"persist":false}},
"logging":{"logs":{"default":{"level":"INFO","writer":{"output":"stderr"},"encoder":{"format":"json"}}}},
"apps":{"layer4":{"servers":{%s}}}}`, adminAddr, b.String())
}

// proxyTo is caddy-l4's proxy handler for one upstream.
func proxyTo(upstream string) string {
	return fmt.Sprintf(`{"handler":"proxy","upstreams":[{"dial":[%q]}]}`, upstream)
}

// startCaddy runs `caddy run` with cfg and waits until it listens on every
// address in listens. It is killed when the test ends, and its log is
// checked for panics then.
func startCaddy(t *testing.T, cfg string, listens ...string) *caddyProc {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBin(t), "run", "--config", cfgPath)
	// memprofilerate: one heap sample per 64 KiB instead of 512 KiB, so
	// that heapByOwner's estimates for small owners (tcpops' well under
	// 1 KiB per connection) rest on enough samples to be bounded.
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir, "HOME="+dir, "GODEBUG=memprofilerate=65536")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return runCaddy(t, dir, cmd, listens...)
}

// runCaddy starts cmd, a `caddy run` whose admin endpoint is on
// adminAddr, with its output in dir/caddy.log, and waits until it listens
// on every address in listens and its admin endpoint answers. It is
// killed when the test ends, and its log is checked for panics then.
func runCaddy(t *testing.T, dir string, cmd *exec.Cmd, listens ...string) *caddyProc {
	t.Helper()
	c := &caddyProc{
		cmd:     cmd,
		dir:     dir,
		logPath: filepath.Join(dir, "caddy.log"),
		http:    &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
		exited:  make(chan struct{}),
	}
	logf, err := os.Create(c.logPath)
	if err != nil {
		t.Fatal(err)
	}
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		c.waitErr = c.cmd.Wait()
		_ = logf.Close()
		close(c.exited)
	}()
	t.Cleanup(func() {
		_ = c.cmd.Process.Kill()
		<-c.exited
		if t.Failed() {
			t.Logf("caddy log (last 40 lines):\n%s", c.logTail(40))
		}
	})
	t.Cleanup(func() { c.checkNoPanic(t) })
	for _, l := range listens {
		_, port, _ := net.SplitHostPort(l)
		p, _ := strconv.Atoi(port)
		c.eventually(t, 15*time.Second, "caddy listening on "+l, func() bool { return listening(t, p) })
	}
	c.eventually(t, 15*time.Second, "caddy admin endpoint", func() bool {
		resp, err := c.http.Get("http://" + adminAddr + "/config/")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return c
}

// eventually is the package's eventually that also fails fast when Caddy
// has exited.
func (c *caddyProc) eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	eventually(t, within, what, func() bool {
		select {
		case <-c.exited:
			t.Fatalf("caddy exited (%v) while waiting for %s; log:\n%s", c.waitErr, what, c.logTail(40))
		default:
		}
		return cond()
	})
}

func (c *caddyProc) pid() int { return c.cmd.Process.Pid }

func (c *caddyProc) logTail(n int) string {
	b, _ := os.ReadFile(c.logPath)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// checkNoPanic fails the test if Caddy's output shows a panic or a data
// race report, or if it exited on its own.
func (c *caddyProc) checkNoPanic(t *testing.T) {
	t.Helper()
	select {
	case <-c.exited:
		if !c.stopped {
			t.Errorf("caddy exited during the test: %v\n%s", c.waitErr, c.logTail(40))
		}
	default:
	}
	b, _ := os.ReadFile(c.logPath)
	for _, bad := range []string{"panic: ", "fatal error: ", "WARNING: DATA RACE"} {
		if i := bytes.Index(b, []byte(bad)); i >= 0 {
			t.Errorf("caddy output has %q:\n%s", bad, b[i:min(len(b), i+3000)])
			return
		}
	}
}

// get returns the body of a GET to Caddy's admin endpoint.
func (c *caddyProc) get(t *testing.T, path string) []byte {
	t.Helper()
	resp, err := c.http.Get("http://" + adminAddr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", path, resp.Status, b)
	}
	return b
}

// load replaces Caddy's config through POST /load.
func (c *caddyProc) load(t *testing.T, cfg string) {
	t.Helper()
	resp, err := c.http.Post("http://"+adminAddr+"/load", "application/json", strings.NewReader(cfg))
	if err != nil {
		t.Fatalf("POST /load: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %s: %s", resp.Status, b)
	}
}

// reload replaces Caddy's config with `caddy reload`, as an operator does.
func (c *caddyProc) reload(t *testing.T, cfg string) {
	t.Helper()
	path := filepath.Join(c.dir, fmt.Sprintf("reload-%d.json", time.Now().UnixNano()))
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBin(t), "reload", "--config", path, "--address", adminAddr)
	cmd.Env = c.cmd.Env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy reload: %v\n%s", err, out)
	}
}

// goroutines returns Caddy's goroutine count from its pprof endpoint.
func (c *caddyProc) goroutines(t *testing.T) int {
	t.Helper()
	b := c.get(t, "/debug/pprof/goroutine?debug=1")
	first, _, _ := bytes.Cut(b, []byte("\n"))
	var n int
	if _, err := fmt.Sscanf(string(first), "goroutine profile: total %d", &n); err != nil {
		t.Fatalf("goroutine profile header %q: %v", first, err)
	}
	return n
}

// memStats returns Caddy's HeapAlloc and StackInuse right after a garbage
// collection (pprof's heap profile with gc=1 runs one first).
func (c *caddyProc) memStats(t *testing.T) (heap, stack uint64) {
	t.Helper()
	b := c.get(t, "/debug/pprof/heap?gc=1&debug=1")
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "# HeapAlloc = "); ok {
			heap, _ = strconv.ParseUint(v, 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "# Stack = "); ok { // "inuse / sys"
			inuse, _, _ := strings.Cut(v, " ")
			stack, _ = strconv.ParseUint(inuse, 10, 64)
		}
	}
	if heap == 0 || stack == 0 {
		t.Fatalf("no HeapAlloc or Stack line in the heap profile")
	}
	return heap, stack
}

// heapByOwner returns Caddy's live heap (as of its last GC) by who
// allocated it: the module of the innermost non-standard-library frame of
// each allocation ("tcpops", "caddy-l4", "caddy", "other"; "std" when no
// such frame). It reads the heap profile, whose samples it scales up the
// way pprof does, so each figure is an estimate (one sample per 64 KiB, as
// startCaddy sets it).
func (c *caddyProc) heapByOwner(t *testing.T) map[string]float64 {
	t.Helper()
	b := c.get(t, "/debug/pprof/heap?debug=1")
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	out := map[string]float64{}
	var rate float64
	var bytesIn, count float64 // the record being read
	owner := ""
	flush := func() {
		if count > 0 && rate > 0 {
			avg := bytesIn / count
			scaled := bytesIn / (1 - math.Exp(-avg/rate))
			if owner == "" {
				owner = "std"
			}
			out[owner] += scaled
		}
		count, bytesIn, owner = 0, 0, ""
	}
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "heap profile:"):
			_, r, _ := strings.Cut(line, "@ heap/")
			v, _ := strconv.ParseFloat(r, 64)
			rate = v / 2 // the header shows twice the sampling rate
		case strings.HasPrefix(line, "#\t") && count > 0:
			if owner != "" {
				continue
			}
			f := strings.Split(line, "\t")
			if len(f) < 3 {
				continue
			}
			fn := f[2]
			// The first element of the package path has a dot outside the
			// standard library: "github.com/...", not "io.copyBuffer".
			first := fn
			if i := strings.Index(fn, "/"); i >= 0 {
				first = fn[:i]
			} else if i := strings.Index(fn, "."); i >= 0 {
				first = fn[:i]
			}
			if !strings.Contains(first, ".") || strings.HasPrefix(fn, "golang.org/x/") {
				continue // the standard library (and its x/ extensions)
			}
			switch {
			case strings.Contains(fn, "github.com/tcpops/caddy-tcpops"):
				owner = "tcpops"
			case strings.Contains(fn, "github.com/mholt/caddy-l4"):
				owner = "caddy-l4"
			case strings.Contains(fn, "github.com/caddyserver/caddy"):
				owner = "caddy"
			default:
				owner = "other"
			}
		case strings.Contains(line, "] @ ") && !strings.HasPrefix(line, "#"):
			flush()
			// "inuse_objects: inuse_bytes [alloc_objects: alloc_bytes] @ ..."
			var n, sz, an, asz float64
			if _, err := fmt.Sscanf(line, "%g: %g [%g: %g]", &n, &sz, &an, &asz); err == nil {
				count, bytesIn = n, sz
			}
		case line == "":
			flush()
		}
	}
	flush()
	if rate == 0 {
		t.Fatal("heap profile without its header")
	}
	return out
}

// fds returns how many file descriptors Caddy has open.
func (c *caddyProc) fds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", c.pid()))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// tracked returns how many connections Caddy's tcpops registry holds, from
// the admin API.
func (c *caddyProc) tracked(t *testing.T) int {
	t.Helper()
	var list struct {
		Total int `json:"total"`
	}
	if err := json.Unmarshal(c.get(t, "/tcpops/connections?limit=1"), &list); err != nil {
		t.Fatal(err)
	}
	return list.Total
}

// connInfo is the part of the admin API's view of a connection the tests
// read.
type connInfo struct {
	ID     uint64 `json:"id"`
	Remote string `json:"remote"`
	IdleMs int64  `json:"idle_ms"`
	Socket struct {
		Keepalive         *bool `json:"keepalive"`
		KeepaliveIdle     *int  `json:"keepalive_idle_seconds"`
		KeepaliveCount    *int  `json:"keepalive_count"`
		KeepaliveInterval *int  `json:"keepalive_interval_seconds"`
		UserTimeoutMillis *int  `json:"user_timeout_ms"`
	} `json:"socket"`
}

// keepalive returns the socket's keepalive as "idle/count/interval".
func (ci connInfo) keepalive() string {
	s := ci.Socket
	if s.KeepaliveIdle == nil || s.KeepaliveCount == nil || s.KeepaliveInterval == nil {
		return "?"
	}
	return fmt.Sprintf("%d/%d/%d", *s.KeepaliveIdle, *s.KeepaliveCount, *s.KeepaliveInterval)
}

// conns returns the tracked connections by remote address.
func (c *caddyProc) conns(t *testing.T) map[string]connInfo {
	t.Helper()
	var list struct {
		Connections []connInfo `json:"connections"`
	}
	if err := json.Unmarshal(c.get(t, "/tcpops/connections?limit=10000"), &list); err != nil {
		t.Fatal(err)
	}
	m := make(map[string]connInfo, len(list.Connections))
	for _, ci := range list.Connections {
		m[ci.Remote] = ci
	}
	return m
}

// logEnd is tcpops' "connection ended" log line.
type logEnd struct {
	TS       float64 `json:"ts"`
	ConID    uint64  `json:"conid"`
	Remote   string  `json:"remote"`
	Reason   string  `json:"reason"`
	Cause    string  `json:"cause"`
	Duration float64 `json:"duration"`
	Idle     float64 `json:"idle"`
}

// ends returns the ends tcpops logged (at info level: all but closed/eof).
func (c *caddyProc) ends(t *testing.T) []logEnd {
	t.Helper()
	b, _ := os.ReadFile(c.logPath)
	var out []logEnd
	for _, line := range bytes.Split(b, []byte("\n")) {
		if !bytes.Contains(line, []byte(`"tcpops: connection ended"`)) {
			continue
		}
		var e logEnd
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		out = append(out, e)
	}
	return out
}

// countEnds waits until tcpops has logged want ends with reason/cause (the
// log line follows the close: tcpops closes the socket first) and returns
// how many it logged; more than want, or fewer by the deadline, fails.
func (c *caddyProc) countEnds(t *testing.T, reason, cause string, want int) int {
	t.Helper()
	n := 0
	deadline := time.Now().Add(10 * time.Second)
	for {
		n = 0
		for _, e := range c.ends(t) {
			if e.Reason == reason && e.Cause == cause {
				n++
			}
		}
		if n >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n != want {
		t.Errorf("tcpops logged %d %s/%s ends, want %d", n, reason, cause, want)
	}
	return n
}

// endOf waits for the logged end of the connection from remote.
func (c *caddyProc) endOf(t *testing.T, remote string, within time.Duration) logEnd {
	t.Helper()
	var found logEnd
	c.eventually(t, within, "tcpops end logged for "+remote, func() bool {
		for _, e := range c.ends(t) {
			if e.Remote == remote {
				found = e
				return true
			}
		}
		return false
	})
	return found
}

// The loopback helpers shared with the root package's tests.
var (
	dial       = testutil.Dial
	roundTrip  = testutil.RoundTrip
	eventually = testutil.Eventually
)

// TCP states as /proc/net/tcp numbers them.
const (
	tcpEstablished = 0x01
	tcpListen      = 0x0A
)

// tcpSocket is one line of /proc/net/tcp: the namespace's IPv4 sockets.
type tcpSocket struct {
	localPort, remotePort int
	state                 int
}

// sockets reads the namespace's IPv4 TCP sockets.
func sockets(t *testing.T) []tcpSocket {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var out []tcpSocket
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		port := func(hexAddr string) int {
			_, p, _ := strings.Cut(hexAddr, ":")
			n, _ := strconv.ParseInt(p, 16, 32)
			return int(n)
		}
		st, _ := strconv.ParseInt(f[3], 16, 32)
		out = append(out, tcpSocket{localPort: port(f[1]), remotePort: port(f[2]), state: int(st)})
	}
	return out
}

// socketState returns the state of the socket from localPort to
// remotePort, or 0 when there is none.
func socketState(t *testing.T, localPort, remotePort int) int {
	t.Helper()
	for _, s := range sockets(t) {
		if s.localPort == localPort && s.remotePort == remotePort {
			return s.state
		}
	}
	return 0
}

func listening(t *testing.T, port int) bool {
	t.Helper()
	for _, s := range sockets(t) {
		if s.localPort == port && s.state == tcpListen {
			return true
		}
	}
	return false
}

// ss returns `ss -tnoi` for the sockets matching filter, e.g.
// "( sport = :9001 )".
func ss(t *testing.T, filter string) string {
	t.Helper()
	args := append([]string{"-tnoiH", "state", "all"}, strings.Fields(filter)...)
	out, err := exec.Command("ss", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ss %v: %v: %s", args, err, out)
	}
	return string(out)
}

// port returns the port of a TCP address.
func port(a net.Addr) int { return a.(*net.TCPAddr).Port }

// echoServer is an upstream on loopback that echoes until EOF, then closes.
// It copies with a small buffer (not io.Copy between sockets, which would
// splice through a pipe: two more descriptors per connection). It records
// when each connection saw its EOF, by the connection's remote port (the
// port Caddy dialed from).
type echoServer struct {
	ln     net.Listener
	handle func(net.Conn)

	mu    sync.Mutex
	conns map[int]net.Conn
	eofAt map[int]time.Time
	wg    sync.WaitGroup
}

// startUpstream listens on addr and serves each connection with handle (nil:
// echo until EOF).
func startUpstream(t *testing.T, addr string, handle func(net.Conn)) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &echoServer{ln: ln, handle: handle, conns: map[int]net.Conn{}, eofAt: map[int]time.Time{}}
	if u.handle == nil {
		u.handle = echo
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p := port(c.RemoteAddr())
			u.mu.Lock()
			u.conns[p] = c
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.handle(c)
				u.mu.Lock()
				u.eofAt[p] = time.Now()
				delete(u.conns, p)
				u.mu.Unlock()
				_ = c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		u.mu.Lock()
		for _, c := range u.conns {
			_ = c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

// echo writes back what it reads until EOF or an error.
func echo(c net.Conn) {
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// open returns how many upstream connections are still open.
func (u *echoServer) open() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.conns)
}

// readUntilClosed reads from c until it is closed (EOF or error) or within
// passes, and returns when that happened; ok is false on the timeout.
func readUntilClosed(c net.Conn, within time.Duration) (at time.Time, ok bool) {
	_ = c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return time.Time{}, false
		}
		return time.Now(), true
	}
}

// dialPing dials addr with d, sends "ping" and reads the 4-byte echo, within
// 10 seconds, as the helper processes of TestScale and TestRegistrar open
// their connections. On an error after the dial, c is the connection to
// close.
func dialPing(d *net.Dialer, addr string) (c net.Conn, err error) {
	if c, err = d.Dial("tcp", addr); err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err = c.Write([]byte("ping")); err == nil {
		_, err = io.ReadFull(c, make([]byte, 4))
	}
	_ = c.SetDeadline(time.Time{})
	return c, err
}
