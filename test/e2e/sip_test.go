//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A real SIP client and server: sipp as UAC and UAS over TCP, with Caddy
// (tcpops, then caddy-l4's proxy) between them, as a SIP edge proxy would
// sit.

const (
	sipAddr     = "127.0.0.1:5060" // Caddy
	uasAddr     = "127.0.0.1:5070" // sipp UAS
	uacPort     = 5061             // sipp UAC placing the calls
	uacIdlePort = 5062             // sipp UAC that goes idle after its call
	sipCalls    = 200
	sipLifetime = 5 * time.Second
)

// startSipp runs sipp with args in dir; it is killed at the end of the
// test at the latest. The returned channel yields its exit error.
func startSipp(t *testing.T, dir string, args ...string) (*exec.Cmd, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	cmd := exec.CommandContext(ctx, "sipp", args...)
	cmd.Dir = dir
	out, err := os.Create(filepath.Join(dir, fmt.Sprintf("sipp-%d.out", time.Now().UnixNano())))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("sipp: %v", err)
	}
	done := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		done <- cmd.Wait()
		_ = out.Close()
		close(exited)
	}()
	t.Cleanup(func() {
		cancel() // kills it if still running
		<-exited
	})
	return cmd, done
}

// sippStats returns the cumulative successful and failed calls from the
// last line of a sipp -trace_stat file.
func sippStats(t *testing.T, path string) (ok, failed int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("sipp statistics: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) < 2 {
		t.Fatalf("sipp statistics %s: no data line:\n%s", path, b)
	}
	head, last := strings.Split(lines[0], ";"), strings.Split(lines[len(lines)-1], ";")
	col := func(name string) int {
		for i, h := range head {
			if h == name && i < len(last) {
				n, err := strconv.Atoi(strings.TrimSpace(last[i]))
				if err != nil {
					t.Fatalf("sipp statistics %s: %s = %q", path, name, last[i])
				}
				return n
			}
		}
		t.Fatalf("sipp statistics %s: no column %s", path, name)
		return 0
	}
	return col("SuccessfulCall(C)"), col("FailedCall(C)")
}

var keepaliveSecs = regexp.MustCompile(`timer:\(keepalive,(\d+)sec,\d+\)`)

// TestSIPCallsThroughCaddy: 200 sipp calls over one TCP connection through
// Caddy with tcpops (keepalive 30/3/10, lifetime 5s) and caddy-l4's proxy,
// none failing, with ss showing tcpops' keepalive on Caddy's socket while
// they run; then a UAC that stays connected and silent after its call has
// its connection closed by the lifetime.
func TestSIPCallsThroughCaddy(t *testing.T) {
	if !inNetns(t, "sipp") {
		return
	}
	dir := t.TempDir()
	scenario, err := filepath.Abs("testdata/uac_then_idle.xml")
	if err != nil {
		t.Fatal(err)
	}
	_, uasDone := startSipp(t, dir, "-sn", "uas", "-t", "t1", "-i", "127.0.0.1", "-p", "5070", "-nostdin")
	eventually(t, 10*time.Second, "sipp UAS listening", func() bool { return listening(t, 5070) })
	c := startCaddy(t, config(l4server{"sip", sipAddr, []string{
		fmt.Sprintf(`{"handler":"tcpops","keepalive":{"idle":"30s","count":3,"interval":"10s"},"lifetime":"%dms"}`, sipLifetime.Milliseconds()),
		proxyTo(uasAddr)}}), sipAddr)

	// 200 calls, 50 per second, each 1s long, all on one TCP connection.
	stats := filepath.Join(dir, "uac.csv")
	start := time.Now()
	_, uacDone := startSipp(t, dir, "-sn", "uac", "-t", "t1", "-i", "127.0.0.1", "-p", strconv.Itoa(uacPort), sipAddr,
		"-m", strconv.Itoa(sipCalls), "-r", "50", "-d", "1000", "-nostdin",
		"-trace_stat", "-stf", stats, "-fd", "1")
	// While the calls run, Caddy's socket to the UAC must show tcpops'
	// keepalive (idle 30s: a timer above Go's default 15s), and the admin
	// API the values read back from the socket.
	var clientTimer, upstreamTimer, adminKA string
	var uacErr error
	running := true
	for running {
		select {
		case uacErr = <-uacDone:
			running = false
			continue
		case <-time.After(100 * time.Millisecond):
		}
		if clientTimer == "" {
			out := ss(t, fmt.Sprintf("( sport = :5060 and dport = :%d )", uacPort))
			if m := keepaliveSecs.FindStringSubmatch(out); m != nil {
				if n, _ := strconv.Atoi(m[1]); n > 15 {
					clientTimer = m[0]
					if ci, ok := c.conns(t)[fmt.Sprintf("127.0.0.1:%d", uacPort)]; ok {
						adminKA = ci.keepalive()
					}
				}
			}
		}
		if upstreamTimer == "" {
			upstreamTimer = keepaliveSecs.FindString(ss(t, "( dport = :5070 )"))
		}
	}
	took := time.Since(start)
	ok, failed := sippStats(t, stats)
	if uacErr != nil || ok != sipCalls || failed != 0 {
		b, _ := os.ReadFile(stats)
		t.Fatalf("sipp UAC: exit %v, %d successful, %d failed calls; want %d and 0\n%s", uacErr, ok, failed, sipCalls, b)
	}
	if clientTimer == "" {
		t.Fatal("ss never showed tcpops' keepalive (idle 30s) on Caddy's socket to the UAC while the calls ran")
	}
	if adminKA != "30/3/10" {
		t.Errorf("admin API: Caddy's socket to the UAC has keepalive %s, want 30/3/10", adminKA)
	}
	// tcpops applies to the client side only: the proxy's socket to the
	// UAS keeps Go's default keepalive (idle 15s).
	if m := keepaliveSecs.FindStringSubmatch(upstreamTimer); m == nil {
		t.Errorf("ss never showed a keepalive timer of 10s or more on Caddy's socket to the UAS while the calls ran")
	} else if n, _ := strconv.Atoi(m[1]); n > 15 {
		t.Errorf("Caddy's socket to the UAS showed %s, want Go's default keepalive (idle 15s), not tcpops' 30s", upstreamTimer)
	}
	figure(t, "sip-calls", "%d calls through Caddy over one TCP connection in %.1fs, %d failed; Caddy's socket to the UAC showed %s (tcpops keepalive %s, read back by the admin API); its socket to the UAS %s (Go's default, tcpops applies to the client side)",
		ok, took.Seconds(), failed, clientTimer, adminKA, upstreamTimer)

	// One call, then the UAC keeps its connection silent for lifetime + 2s.
	// Told to reconnect when it finds the connection closed (as a phone
	// does), sipp does not count the call failed for the close.
	idleStats := filepath.Join(dir, "uac_idle.csv")
	_, idleDone := startSipp(t, dir, "-sf", scenario, "-t", "t1", "-i", "127.0.0.1", "-p", strconv.Itoa(uacIdlePort), sipAddr,
		"-m", "1", "-d", strconv.FormatInt((sipLifetime+2*time.Second).Milliseconds(), 10),
		"-max_reconnect", "1", "-reconnect_close", "false", "-nostdin",
		"-trace_stat", "-stf", idleStats, "-fd", "1")
	remote := fmt.Sprintf("127.0.0.1:%d", uacIdlePort)
	var id uint64
	c.eventually(t, 10*time.Second, "the idle UAC's connection tracked", func() bool {
		ci, ok := c.conns(t)[remote]
		id = ci.ID
		return ok
	})
	// The last traffic is the 200 to the UAC's BYE: from then on the
	// connection is idle. Estimate when that was from idle_ms as long as
	// the connection lives, and note when tcpops dropped it.
	var lastActive, closedAt time.Time
	c.eventually(t, sipLifetime+10*time.Second, "the idle SIP connection closed", func() bool {
		resp, err := c.http.Get(fmt.Sprintf("http://%s/tcpops/connections/%d", adminAddr, id))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode == 404 {
			closedAt = time.Now()
			return true
		}
		var ci connInfo
		if err := json.NewDecoder(resp.Body).Decode(&ci); err != nil {
			t.Fatal(err)
		}
		if la := time.Now().Add(-time.Duration(ci.IdleMs) * time.Millisecond); la.After(lastActive) {
			lastActive = la
		}
		return false
	})
	idleFor := closedAt.Sub(lastActive)
	end := c.endOf(t, remote, 5*time.Second)
	if end.Reason != "timeout" || end.Cause != "lifetime" {
		t.Errorf("tcpops logged %s/%s for the idle UAC, want timeout/lifetime", end.Reason, end.Cause)
	}
	// The estimate of the last traffic errs late when an admin answer is
	// slow, so the lower bound is loose here and exact on tcpops' own idle.
	if idleFor < sipLifetime-time.Second || idleFor > sipLifetime+1500*time.Millisecond || end.Idle < sipLifetime.Seconds() {
		t.Errorf("idle SIP connection closed after %v idle (tcpops: %.3fs), want the lifetime %v (+1.5s)", idleFor, end.Idle, sipLifetime)
	}
	if err := <-idleDone; err != nil {
		b, _ := os.ReadFile(idleStats)
		t.Fatalf("sipp idle UAC: %v\n%s", err, b)
	}
	ok, failed = sippStats(t, idleStats)
	if ok != 1 || failed != 0 {
		t.Errorf("sipp idle UAC: %d successful, %d failed; want 1 and 0", ok, failed)
	}
	figure(t, "sip-idle", "the SIP connection idle after its call was closed after %.2fs idle (lifetime %v; tcpops logged %s/%s with idle %.3fs); sipp (-max_reconnect 1) completed its call",
		idleFor.Seconds(), sipLifetime, end.Reason, end.Cause, end.Idle)

	select {
	case err := <-uasDone:
		t.Fatalf("sipp UAS exited during the test: %v", err)
	default:
	}
}
