// Command loadgen is the load generator and upstream of the process-level
// benchmarks in bench/run.sh: it measures throughput, connection rate,
// memory per idle connection and lifetime lateness through proxies on
// loopback, interleaving the proxies it compares (ABAB) so that a noisy,
// shared machine slows them alike, and prints medians, spreads and ratios.
//
//	loadgen upstream -listen 127.0.0.1:24000
//	loadgen tput     -targets plain=127.0.0.1:24001,tcpops=127.0.0.1:24002 -dir up -streams 32
//	loadgen rate     -targets plain=...,tcpops=...,haproxy=... -clients 64
//	loadgen memory   -targets plain=...,tcpops=... -admin http://127.0.0.1:24009 -n 8000
//	loadgen rss      -targets plain=...,tcpops=... -admin http://127.0.0.1:24009 -n 5000 -caddy ./caddy -config caddy.json
//	loadgen expire   -addr 127.0.0.1:24003 -n 8000 -lifetime 10s -log caddy.log
//
// The upstream speaks a one-byte protocol: the client's first byte chooses
// echo ('e'), sink ('u': discard until EOF, then answer the byte count as 8
// bytes) or source ('d': read an 8-byte count, send that many bytes, close).
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	opEcho   = 'e'
	opSink   = 'u'
	opSource = 'd'

	chunk = 64 << 10 // bytes per write in the throughput runs
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen upstream|tput|rate|memory|rss|expire [flags]")
		os.Exit(2)
	}
	cmds := map[string]func([]string) error{
		"upstream": cmdUpstream,
		"tput":     cmdTput,
		"rate":     cmdRate,
		"memory":   cmdMemory,
		"rss":      cmdRSS,
		"expire":   cmdExpire,
	}
	cmd, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "loadgen: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err := cmd(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// cmdUpstream serves the upstream protocol until killed.
func cmdUpstream(args []string) error {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:24000", "address to listen on")
	_ = fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		if err != nil { // out of descriptors, say: the run will report the failed connections
			fmt.Fprintf(os.Stderr, "loadgen upstream: %v\n", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go serve(c)
	}
}

func serve(c net.Conn) {
	defer c.Close()
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
	case opEcho:
		// Not io.Copy(c, c): between two sockets it splices through a
		// pipe, two more descriptors per connection, which 8,000 idle
		// connections cannot afford under a 20,000 descriptor limit.
		_, _ = io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 512))
	case opSink:
		n, _ := io.Copy(io.Discard, c)
		_, _ = c.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
	case opSource:
		var cnt [8]byte
		if _, err := io.ReadFull(c, cnt[:]); err != nil {
			return
		}
		_, _ = io.CopyN(c, zeros{}, int64(binary.BigEndian.Uint64(cnt[:])))
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// target is one proxy under test.
type target struct{ name, addr string }

func parseTargets(s string) ([]target, error) {
	var ts []target
	for _, kv := range strings.Split(s, ",") {
		name, addr, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("target %q: want name=host:port", kv)
		}
		ts = append(ts, target{name, addr})
	}
	return ts, nil
}

// interleave runs measure once per target per round, the targets in a
// different order each round (ABAB, then BABA...), with a pause between
// runs for closed connections to drain, and returns the results by target.
// measure returns the figure and the units of work done (connections, MB);
// when the proxy's pid is known, cpu has the proxy's CPU time per unit of
// work, in microseconds: a cost a machine shared with other work disturbs
// far less than it does wall-clock rates.
func interleave(ts []target, rounds int, pause time.Duration, pids map[string]int,
	measure func(target) (v, units float64, err error)) (res, cpu map[string][]float64, err error) {
	res, cpu = map[string][]float64{}, map[string][]float64{}
	for r := range rounds {
		for i := range ts {
			t := ts[(i+r)%len(ts)]
			pid, hasPid := pids[t.name]
			var cpu0 time.Duration
			if hasPid {
				if cpu0, err = cpuTime(pid); err != nil {
					return nil, nil, err
				}
			}
			v, units, err := measure(t)
			if err != nil {
				return nil, nil, fmt.Errorf("round %d, %s: %w", r+1, t.name, err)
			}
			res[t.name] = append(res[t.name], v)
			msg := ""
			if hasPid {
				cpu1, err := cpuTime(pid)
				if err != nil {
					return nil, nil, err
				}
				per := float64(cpu1-cpu0) / float64(time.Microsecond) / units
				cpu[t.name] = append(cpu[t.name], per)
				msg = fmt.Sprintf(" (proxy CPU %.4g µs/unit)", per)
			}
			fmt.Fprintf(os.Stderr, "  round %d %-8s %.4g%s\n", r+1, t.name, v, msg)
			time.Sleep(pause)
		}
	}
	return res, cpu, nil
}

// cpuTime returns the user and system CPU time process pid has used, from
// /proc/pid/stat (in clock ticks of 10ms).
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

func parsePids(s string) (map[string]int, error) {
	pids := map[string]int{}
	if s == "" {
		return pids, nil
	}
	for _, kv := range strings.Split(s, ",") {
		name, v, _ := strings.Cut(kv, "=")
		pid, err := strconv.Atoi(v)
		if err != nil {
			return nil, fmt.Errorf("pid %q: %w", kv, err)
		}
		pids[name] = pid
	}
	return pids, nil
}

// report prints one table row per target: median, min, max, and the ratio
// of its median to every other target's median; and the per-round ratios'
// median for the pairs that were measured side by side.
func report(title, unit string, ts []target, res map[string][]float64) {
	if len(res) == 0 {
		return
	}
	fmt.Printf("\n### %s\n\n", title)
	fmt.Printf("| target | median %s | min | max | runs |\n|---|---|---|---|---|\n", unit)
	for _, t := range ts {
		v := res[t.name]
		fmt.Printf("| %s | %s | %s | %s | %d |\n", t.name, num(median(v)), num(slices.Min(v)), num(slices.Max(v)), len(v))
	}
	fmt.Printf("\n| ratio | of medians | median of per-round ratios | min | max |\n|---|---|---|---|---|\n")
	for i, a := range ts {
		for _, b := range ts[:i] {
			var rs []float64
			for r := range min(len(res[a.name]), len(res[b.name])) {
				rs = append(rs, res[a.name][r]/res[b.name][r])
			}
			fmt.Printf("| %s / %s | %.3f | %.3f | %.3f | %.3f |\n", a.name, b.name,
				median(res[a.name])/median(res[b.name]), median(rs), slices.Min(rs), slices.Max(rs))
		}
	}
}

// scale returns every figure of res multiplied by f.
func scale(res map[string][]float64, f float64) map[string][]float64 {
	out := map[string][]float64{}
	for k, vs := range res {
		for _, v := range vs {
			out[k] = append(out[k], v*f)
		}
	}
	return out
}

func num(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return math.NaN()
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// cmdTput measures bulk transfer in MB/s.
func cmdTput(args []string) error {
	fs := flag.NewFlagSet("tput", flag.ExitOnError)
	targets := fs.String("targets", "", "name=addr,... of the proxies to compare")
	dir := fs.String("dir", "up", "up: client to upstream; down: upstream to client")
	streams := fs.Int("streams", 1, "concurrent connections")
	dur := fs.Duration("duration", 3*time.Second, "length of one run")
	rounds := fs.Int("rounds", 5, "runs per target, interleaved")
	pidList := fs.String("pids", "", "name=pid,... of the proxy processes, for their CPU time")
	_ = fs.Parse(args)
	ts, err := parseTargets(*targets)
	if err != nil {
		return err
	}
	pids, err := parsePids(*pidList)
	if err != nil {
		return err
	}
	res, cpu, err := interleave(ts, *rounds, 300*time.Millisecond, pids, func(t target) (float64, float64, error) {
		mbps, err := throughput(t.addr, *dir, *streams, *dur)
		return mbps, mbps * dur.Seconds() / 1000, err // units: GB
	})
	if err != nil {
		return err
	}
	title := fmt.Sprintf("Throughput, %s, %d stream(s), %v runs", *dir, *streams, *dur)
	report(title, "MB/s", ts, res)
	report(title+": proxy CPU time per GB moved (lower is better)", "ms/GB", ts, scale(cpu, 1e-3))
	return nil
}

// throughput moves data through addr on streams connections for about dur
// and returns the MB/s (10^6 bytes) that arrived.
func throughput(addr, dir string, streams int, dur time.Duration) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	start := time.Now()
	stop := start.Add(dur)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := stream(addr, dir, stop)
			total.Add(n)
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(total.Load()) / elapsed.Seconds() / 1e6, nil
}

// stream is one connection of a throughput run: it returns the bytes the
// far end received (up: as the upstream counted them).
func stream(addr, dir string, stop time.Time) (int64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, chunk)
	if dir == "down" {
		if _, err := c.Write(binary.BigEndian.AppendUint64([]byte{opSource}, 1<<62)); err != nil {
			return 0, err
		}
		_ = c.SetReadDeadline(stop)
		n, err := io.CopyBuffer(io.Discard, c, buf)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			err = nil
		}
		return n, err
	}
	if _, err := c.Write([]byte{opSink}); err != nil {
		return 0, err
	}
	for time.Now().Before(stop) {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var cnt [8]byte
	if _, err := io.ReadFull(c, cnt[:]); err != nil {
		return 0, fmt.Errorf("reading the upstream's byte count: %w", err)
	}
	return int64(binary.BigEndian.Uint64(cnt[:])), nil
}

// cmdRate measures connections per second.
func cmdRate(args []string) error {
	fs := flag.NewFlagSet("rate", flag.ExitOnError)
	targets := fs.String("targets", "", "name=addr,... of the proxies to compare")
	clients := fs.Int("clients", 64, "concurrent clients")
	limit := fs.Int("limit", 0, "connections per second to offer (0: as many as the proxy takes); at a fixed rate, CPU per connection compares the work done, not how well it batches")
	dur := fs.Duration("duration", 3*time.Second, "length of one run")
	rounds := fs.Int("rounds", 5, "runs per target, interleaved")
	pidList := fs.String("pids", "", "name=pid,... of the proxy processes, for their CPU time")
	_ = fs.Parse(args)
	ts, err := parseTargets(*targets)
	if err != nil {
		return err
	}
	pids, err := parsePids(*pidList)
	if err != nil {
		return err
	}
	res, cpu, err := interleave(ts, *rounds, time.Second, pids, func(t target) (float64, float64, error) {
		rate, err := connRate(t.addr, *clients, *limit, *dur)
		return rate, rate * dur.Seconds(), err
	})
	if err != nil {
		return err
	}
	title := fmt.Sprintf("Connection rate, %d clients, connect + 16-byte echo + close, %v runs", *clients, *dur)
	if *limit > 0 {
		title += fmt.Sprintf(", offered %d/s", *limit)
	}
	report(title, "conn/s", ts, res)
	report(title+": proxy CPU time per connection (lower is better)", "µs", ts, cpu)
	return nil
}

// connRate runs clients loops of connect, echo 16 bytes, close against addr
// for dur and returns the completed connections per second; with limit > 0
// the clients start limit connections a second between them, no more. A
// run with failed connections is an error: a rate that drops them is not a
// rate.
func connRate(addr string, clients, limit int, dur time.Duration) (float64, error) {
	var done, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(dur)
	var tokens chan struct{}
	if limit > 0 {
		tokens = make(chan struct{}, clients)
		go func() {
			defer close(tokens)
			for sent := 0; time.Now().Before(stop); {
				due := int(time.Since(start).Seconds() * float64(limit))
				for ; sent < due; sent++ {
					tokens <- struct{}{}
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte("e0123456789abcdef")
			buf := make([]byte, len(msg)-1)
			for time.Now().Before(stop) {
				if tokens != nil {
					if _, ok := <-tokens; !ok {
						break
					}
				}
				if err := exchange(addr, msg, buf); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		return 0, fmt.Errorf("%d of %d connections failed, first: %w", n, n+done.Load(), *firstErr.Load())
	}
	return float64(done.Load()) / elapsed.Seconds(), nil
}

func exchange(addr string, msg, buf []byte) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(msg[1:]) {
		return errors.New("echo mismatch")
	}
	return nil
}

// cmdMemory measures the Go heap and goroutines Caddy spends per idle
// proxied connection, through each target in turn, from Caddy's admin
// endpoint (/debug/pprof, with a forced GC before the heap is read).
func cmdMemory(args []string) error {
	fs := flag.NewFlagSet("memory", flag.ExitOnError)
	targets := fs.String("targets", "", "name=addr,... (all served by the Caddy at -admin)")
	admin := fs.String("admin", "http://127.0.0.1:24009", "Caddy's admin endpoint")
	n := fs.Int("n", 8000, "idle connections to hold")
	rounds := fs.Int("rounds", 3, "runs per target, interleaved")
	_ = fs.Parse(args)
	ts, err := parseTargets(*targets)
	if err != nil {
		return err
	}
	goroutines := map[string][]float64{}
	heap, _, err := interleave(ts, *rounds, time.Second, nil, func(t target) (float64, float64, error) {
		perConn, g, err := idleCost(t.addr, *admin, *n)
		goroutines[t.name] = append(goroutines[t.name], g)
		return perConn, float64(*n), err
	})
	if err != nil {
		return err
	}
	report(fmt.Sprintf("Caddy heap per idle proxied connection, %d connections", *n), "bytes", ts, heap)
	fmt.Printf("\n| target | goroutines per connection (median) |\n|---|---|\n")
	for _, t := range ts {
		fmt.Printf("| %s | %.3f |\n", t.name, median(goroutines[t.name]))
	}
	if len(ts) == 2 {
		fmt.Printf("\nextra heap per connection, %s over %s: %.0f bytes (median of per-round differences)\n",
			ts[1].name, ts[0].name, medianDiff(heap[ts[1].name], heap[ts[0].name]))
	}
	return nil
}

// cmdRSS measures the resident memory (VmRSS) that each idle proxied
// connection costs Caddy, each measurement in a Caddy process of its own,
// started for it from -caddy and -config and stopped after it: a process
// that has held connections keeps the freed pages for minutes, so in a
// shared process only the first measurement would see the growth. RSS
// counts what the heap figure of memory does not: goroutine stacks, the
// heap's free space and fragmentation, the runtime's own structures.
func cmdRSS(args []string) error {
	fs := flag.NewFlagSet("rss", flag.ExitOnError)
	targets := fs.String("targets", "", "name=addr,... (all served by -config)")
	admin := fs.String("admin", "http://127.0.0.1:24009", "the admin endpoint of -config")
	caddyBin := fs.String("caddy", "", "the Caddy binary to start for each measurement, or name=path,... to give each target its own")
	config := fs.String("config", "", "its JSON config")
	n := fs.Int("n", 5000, "idle connections to hold")
	rounds := fs.Int("rounds", 3, "runs per target, interleaved, each in a fresh process")
	_ = fs.Parse(args)
	ts, err := parseTargets(*targets)
	if err != nil {
		return err
	}
	if *caddyBin == "" || *config == "" {
		return errors.New("-caddy and -config are required")
	}
	bins := map[string]string{}
	for _, t := range ts {
		bins[t.name] = *caddyBin
	}
	if strings.Contains(*caddyBin, "=") {
		clear(bins)
		for kv := range strings.SplitSeq(*caddyBin, ",") {
			name, path, _ := strings.Cut(kv, "=")
			bins[name] = path
		}
		for _, t := range ts {
			if bins[t.name] == "" {
				return fmt.Errorf("-caddy %s: no binary for target %q", *caddyBin, t.name)
			}
		}
	}
	rss, _, err := interleave(ts, *rounds, time.Second, nil, func(t target) (float64, float64, error) {
		perConn, err := freshRSSCost(bins[t.name], *config, t.addr, *admin, *n)
		return perConn, float64(*n), err
	})
	if err != nil {
		return err
	}
	report(fmt.Sprintf("Caddy resident memory (VmRSS) per idle proxied connection, %d connections, a fresh process each", *n), "bytes", ts, rss)
	// Each "…tcpops" target against its "…plain" one: rounds run the
	// targets one after another, so the round's pair is the comparison.
	fmt.Println()
	for _, t := range ts {
		if prefix, ok := strings.CutSuffix(t.name, "tcpops"); ok && rss[prefix+"plain"] != nil {
			fmt.Printf("extra RSS per connection, %s over %splain: %.0f bytes (median of per-round differences)\n",
				t.name, prefix, medianDiff(rss[t.name], rss[prefix+"plain"]))
		}
	}
	return nil
}

// freshRSSCost starts Caddy, reads its VmRSS after a garbage collection,
// opens n idle proxied connections through addr, reads VmRSS again after
// another collection, and stops Caddy. It returns the difference per
// connection, in bytes.
func freshRSSCost(bin, config, addr, admin string, n int) (float64, error) {
	cmd := exec.Command(bin, "run", "--config", config)
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	pid := cmd.Process.Pid
	if err := awaitReady(addr, admin); err != nil {
		return 0, err
	}
	if _, err := heapAlloc(admin); err != nil { // ?gc=1: collect first
		return 0, err
	}
	rss0, err := vmRSS(pid)
	if err != nil {
		return 0, err
	}
	conns, err := openIdle(addr, n)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	if err != nil {
		return 0, err
	}
	time.Sleep(500 * time.Millisecond) // let the last sessions settle
	if _, err := heapAlloc(admin); err != nil {
		return 0, err
	}
	rss1, err := vmRSS(pid)
	if err != nil {
		return 0, err
	}
	return float64(rss1-rss0) / float64(n), nil
}

// awaitReady waits up to 10 seconds for Caddy's admin endpoint and addr to
// accept connections.
func awaitReady(addr, admin string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := heapAlloc(admin)
		if err == nil {
			var c net.Conn
			if c, err = net.Dial("tcp", addr); err == nil {
				return c.Close()
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("caddy not ready: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// vmRSS returns process pid's resident set size, from /proc/pid/status.
func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

func medianDiff(a, b []float64) float64 {
	var d []float64
	for i := range min(len(a), len(b)) {
		d = append(d, a[i]-b[i])
	}
	return median(d)
}

// idleCost opens n connections through addr, each with one echo so that it
// is routed and proxied, and returns Caddy's extra heap per connection and
// extra goroutines per connection while they are held, against the same
// figures read just before. It closes them before it returns, and waits
// for Caddy's goroutines to return to where they were.
func idleCost(addr, admin string, n int) (heapPerConn, goroutinesPerConn float64, err error) {
	heap0, err := heapAlloc(admin)
	if err != nil {
		return 0, 0, err
	}
	g0, err := goroutineCount(admin)
	if err != nil {
		return 0, 0, err
	}
	conns, err := openIdle(addr, n)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if g, gerr := goroutineCount(admin); gerr == nil && g <= g0+10 {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	if err != nil {
		return 0, 0, err
	}
	time.Sleep(500 * time.Millisecond) // let the last sessions settle
	heap1, err := heapAlloc(admin)
	if err != nil {
		return 0, 0, err
	}
	g1, err := goroutineCount(admin)
	if err != nil {
		return 0, 0, err
	}
	return float64(heap1-heap0) / float64(n), float64(g1-g0) / float64(n), nil
}

// openIdle opens n connections to addr, 64 at a time, and echoes a few
// bytes on each.
func openIdle(addr string, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Pointer[error]
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte("e0123456789abcdef")
			buf := make([]byte, len(msg)-1)
			for i := next.Add(1) - 1; i < int64(n); i = next.Add(1) - 1 {
				c, err := dialEcho(addr, msg, buf)
				if err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	conns = slices.DeleteFunc(conns, func(c net.Conn) bool { return c == nil })
	if e := firstErr.Load(); e != nil {
		return conns, fmt.Errorf("opened %d of %d: %w", len(conns), n, *e)
	}
	return conns, nil
}

func dialEcho(addr string, msg, buf []byte) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

var heapAllocLine = regexp.MustCompile(`(?m)^# HeapAlloc = (\d+)`)

// heapAlloc forces a GC in Caddy and returns its live heap in bytes.
func heapAlloc(admin string) (int64, error) {
	body, err := get(admin + "/debug/pprof/heap?gc=1&debug=1")
	if err != nil {
		return 0, err
	}
	m := heapAllocLine.FindSubmatch(body)
	if m == nil {
		return 0, errors.New("no HeapAlloc in the heap profile")
	}
	return strconv.ParseInt(string(m[1]), 10, 64)
}

var goroutineLine = regexp.MustCompile(`goroutine profile: total (\d+)`)

func goroutineCount(admin string) (int64, error) {
	body, err := get(admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	m := goroutineLine.FindSubmatch(body)
	if m == nil {
		return 0, errors.New("no total in the goroutine profile")
	}
	return strconv.ParseInt(string(m[1]), 10, 64)
}

func get(url string) ([]byte, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// cmdExpire opens n connections through a route with an inactivity
// lifetime, one echo each, leaves them idle and measures how late after its
// deadline each is closed: on the client (EOF seen, against the echo's
// arrival plus the lifetime) and, with -log, in Caddy (the idle time its
// end was logged with, minus the lifetime).
func cmdExpire(args []string) error {
	fs := flag.NewFlagSet("expire", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:24003", "proxy whose route has the lifetime")
	n := fs.Int("n", 8000, "connections")
	lifetime := fs.Duration("lifetime", 10*time.Second, "the route's lifetime")
	logFile := fs.String("log", "", "Caddy's JSON log, for the server-side lateness")
	_ = fs.Parse(args)

	var logStart int64
	if *logFile != "" {
		if fi, err := os.Stat(*logFile); err == nil {
			logStart = fi.Size()
		}
	}
	type result struct {
		late time.Duration
		err  error
	}
	results := make([]result, *n)
	var opened sync.WaitGroup
	var closed sync.WaitGroup
	var next atomic.Int64
	var openErr atomic.Pointer[error]
	start := time.Now()
	for range 64 {
		opened.Add(1)
		go func() {
			defer opened.Done()
			msg := []byte("e0123456789abcdef")
			for i := next.Add(1) - 1; i < int64(*n); i = next.Add(1) - 1 {
				buf := make([]byte, len(msg)-1)
				c, err := dialEcho(*addr, msg, buf)
				if err != nil {
					openErr.CompareAndSwap(nil, &err)
					return
				}
				deadline := time.Now().Add(*lifetime)
				closed.Add(1)
				go func() {
					defer closed.Done()
					defer c.Close()
					_ = c.SetReadDeadline(deadline.Add(*lifetime + 30*time.Second))
					_, err := c.Read(buf[:1])
					switch {
					case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), isReset(err):
						results[i] = result{late: time.Since(deadline)}
					case err == nil:
						results[i] = result{err: errors.New("data instead of a close")}
					default:
						results[i] = result{err: err}
					}
				}()
			}
		}()
	}
	opened.Wait()
	if e := openErr.Load(); e != nil {
		return fmt.Errorf("opening: %w", *e)
	}
	openedIn := time.Since(start)
	closed.Wait()
	var late []float64
	failed := 0
	for _, r := range results {
		if r.err != nil {
			failed++
			continue
		}
		late = append(late, float64(r.late)/float64(time.Millisecond))
	}
	fmt.Printf("\n### Lifetime lateness, %d connections, lifetime %v (opened in %v)\n\n", *n, *lifetime, openedIn.Round(time.Millisecond))
	fmt.Printf("| measured at | closed | p50 ms | p90 ms | p99 ms | max ms | min ms |\n|---|---|---|---|---|---|---|\n")
	printLate("client (EOF after echo + lifetime)", late, failed)
	if *logFile != "" {
		srv, err := serverLateness(*logFile, logStart, *lifetime)
		if err != nil {
			return err
		}
		printLate("Caddy (logged idle - lifetime)", srv, 0)
	}
	if failed > 0 {
		return fmt.Errorf("%d connections not closed by the proxy", failed)
	}
	return nil
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && strings.Contains(oe.Err.Error(), "reset")
}

func printLate(where string, ms []float64, failed int) {
	slices.Sort(ms)
	q := func(p float64) float64 {
		if len(ms) == 0 {
			return math.NaN()
		}
		return ms[min(len(ms)-1, int(math.Ceil(p*float64(len(ms))))-1)]
	}
	fmt.Printf("| %s | %d (%d failed) | %.1f | %.1f | %.1f | %.1f | %.1f |\n",
		where, len(ms), failed, q(0.50), q(0.90), q(0.99), q(1), ms[0])
}

// serverLateness reads the "tcpops: connection ended" lines with cause
// lifetime that Caddy logged after offset, and returns idle - lifetime of
// each in milliseconds.
func serverLateness(path string, offset int64, lifetime time.Duration) ([]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return nil, err
	}
	var out []float64
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var line struct {
			Msg   string `json:"msg"`
			Cause string `json:"cause"`
			Idle  any    `json:"idle"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Msg != "tcpops: connection ended" || line.Cause != "lifetime" {
			continue
		}
		idle, ok := seconds(line.Idle)
		if !ok {
			continue
		}
		out = append(out, (idle-lifetime.Seconds())*1000)
	}
	return out, sc.Err()
}

// seconds reads a zap duration, a number of seconds (Caddy's encoder) or a
// Go duration string.
func seconds(v any) (float64, bool) {
	switch v := v.(type) {
	case float64:
		return v, true
	case string:
		d, err := time.ParseDuration(v)
		return d.Seconds(), err == nil
	}
	return 0, false
}
