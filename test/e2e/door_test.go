//go:build linux

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tcpops/caddy-tcpops/internal/testutil"
)

// The registrar's door (issue 20, docs/registrar.md): Debian's Kamailio as
// the registrar behind Caddy, raising a phone's lifetime through the
// tcpops_api door over HTTPS with a client certificate, as the docs'
// Kamailio config does (exec and curl: Debian bookworm's Kamailio 5.6
// http_client sends GET and POST only).

const (
	doorSIPAddr    = "127.0.0.1:5060" // Caddy: SIP over TCP, tcpops, proxy_protocol v1
	doorKamAddr    = "127.0.0.1:5070" // Kamailio
	doorWebAddr    = "127.0.0.1:8443" // Caddy: https://localhost:8443, tcpops_api
	doorShort      = 2 * time.Second  // the edge's default lifetime
	doorRegistered = time.Hour        // what Kamailio raises it to
)

// doorCaddyfile is the registrar front of example/registrar.Caddyfile, on
// loopback, with the PKI's certificates and a short lifetime.
func doorCaddyfile(pki testutil.PKI) string {
	return fmt.Sprintf(`{
	admin %s
	persist_config off
	auto_https disable_redirects
	log {
		output stderr
		format json
		level INFO
	}
	layer4 {
		%s {
			route {
				tcpops {
					keepalive 60 5 5
					lifetime %dms
				}
				proxy {
					proxy_protocol v1
					upstream %s
				}
			}
		}
	}
}

https://localhost:8443 {
	bind 127.0.0.1
	tls %s %s {
		client_auth {
			mode require_and_verify
			trust_pool file %s
		}
	}
	tcpops_api
}
`, adminAddr, doorSIPAddr, doorShort.Milliseconds(), doorKamAddr, pki.ServerCert, pki.ServerKey, pki.CA)
}

// kamailioCfg is the registrar: docs/registrar.md's request_route with the
// PKI's files. After save("location"), it PATCHes the phone's lifetime by
// $si:$sp (the phone's address, from the PROXY header): 1h when a contact
// was added or refreshed (save returns 1 or 2), back to the edge's short
// lifetime when the phone unregistered (3).
func kamailioCfg(pki testutil.PKI) string {
	curl := fmt.Sprintf(`curl -gsS -o /dev/null -w '%%{http_code}' --max-time 2 --cacert %s --cert %s --key %s -X PATCH -H 'Content-Type: application/json'`,
		pki.CA, pki.ClientCert, pki.ClientKey)
	door := `'https://localhost:8443/tcpops/connections?remote=$si:$sp'`
	return fmt.Sprintf(`#!KAMAILIO
debug=2
log_stderror=yes
listen=tcp:%s
tcp_accept_haproxy=yes
children=1
tcp_children=2
auto_aliases=no

mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "exec.so"

modparam("registrar", "max_expires", 3600)

request_route {
	if (method != "REGISTER") {
		sl_send_reply("405", "Method Not Allowed");
		exit;
	}
	save("location");
	$var(saved) = $rc;
	switch ($var(saved)) {
	case 1:
	case 2:
		exec_avp("%s -d '{\"lifetime\":\"1h\"}' %s", "$avp(door)");
		xlog("L_INFO", "door: $si:$sp registered (save $var(saved)): PATCH lifetime 1h: $avp(door)\n");
		break;
	case 3:
		exec_avp("%s -d '{\"lifetime\":\"%dms\"}' %s", "$avp(door)");
		xlog("L_INFO", "door: $si:$sp unregistered: PATCH lifetime back to the short one: $avp(door)\n");
		break;
	default:
		xlog("L_WARN", "door: save from $si:$sp returned $var(saved)\n");
	}
}
`, doorKamAddr, curl, door, curl, doorShort.Milliseconds(), door)
}

// startKamailio runs Kamailio in the foreground (-DD, logs on stderr: -E)
// with cfg, as the user as (root if nil), and waits until it listens on
// doorKamAddr. It is stopped when the test ends; its log is printed if the
// test failed.
func startKamailio(t *testing.T, dir, cfg string, as *syscall.Credential) (logPath string) {
	t.Helper()
	cfgPath := filepath.Join(dir, "kamailio.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath = filepath.Join(dir, "kamailio.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("kamailio", "-c", "-f", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("kamailio -c: the config does not check: %v\n%s", err, out)
	}
	cmd := exec.Command("kamailio", "-f", cfgPath, "-DD", "-E", "-m", "32", "-M", "8", "-w", dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: as}
	if err := cmd.Start(); err != nil {
		t.Fatalf("kamailio: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(exited)
	}()
	t.Cleanup(func() {
		// SIGTERM: the main process stops its children, then exits.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("kamailio log:\n%s", b)
		}
	})
	_, p, _ := net.SplitHostPort(doorKamAddr)
	port, _ := strconv.Atoi(p)
	eventually(t, 15*time.Second, "kamailio listening on "+doorKamAddr, func() bool {
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("kamailio exited:\n%s", b)
		default:
		}
		return listening(t, port)
	})
	return logPath
}

// phone is a SIP user agent over one TCP connection.
type phone struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	cseq int
}

func dialPhone(t *testing.T) *phone {
	c := dial(t, doorSIPAddr)
	return &phone{t: t, conn: c, r: bufio.NewReader(c)}
}

func (p *phone) addr() string { return p.conn.LocalAddr().String() }

// request sends a request of method with the Expires header (register
// only) and returns the status line of the answer.
func (p *phone) request(method string, expires int) string {
	p.t.Helper()
	p.cseq++
	me := p.addr()
	var msg strings.Builder
	fmt.Fprintf(&msg, "%s sip:registrar.test SIP/2.0\r\n", method)
	fmt.Fprintf(&msg, "Via: SIP/2.0/TCP %s;rport;branch=z9hG4bK-%d-%d\r\n", me, time.Now().UnixNano(), p.cseq)
	msg.WriteString("Max-Forwards: 70\r\n")
	fmt.Fprintf(&msg, "From: <sip:alice@registrar.test>;tag=%d\r\n", p.cseq)
	msg.WriteString("To: <sip:alice@registrar.test>\r\n")
	fmt.Fprintf(&msg, "Call-ID: door-%s\r\n", me)
	fmt.Fprintf(&msg, "CSeq: %d %s\r\n", p.cseq, method)
	if method == "REGISTER" {
		fmt.Fprintf(&msg, "Contact: <sip:alice@%s;transport=tcp>\r\n", me)
		fmt.Fprintf(&msg, "Expires: %d\r\n", expires)
	}
	msg.WriteString("Content-Length: 0\r\n\r\n")
	_ = p.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer func() { _ = p.conn.SetDeadline(time.Time{}) }()
	if _, err := p.conn.Write([]byte(msg.String())); err != nil {
		p.t.Fatalf("phone %s: sending %s: %v", me, method, err)
	}
	status := ""
	for {
		line, err := p.r.ReadString('\n')
		if err != nil {
			p.t.Fatalf("phone %s: reading the answer to %s: %v", me, method, err)
		}
		line = strings.TrimRight(line, "\r\n")
		if status == "" {
			status = line
		}
		if line == "" {
			return status // Content-Length: 0 in Kamailio's replies here
		}
	}
}

// TestRegistrarDoorKamailio: a phone registers through Caddy (tcpops with
// a 2s lifetime, proxy_protocol v1) with Kamailio; Kamailio raises its
// lifetime to 1h through the tcpops_api door over HTTPS with its client
// certificate, so the phone stays connected while idle past 2s; once it
// unregisters, Kamailio puts the short lifetime back and the phone is
// closed 2s after its last byte. A phone that never registers is closed
// at the short lifetime too.
func TestRegistrarDoorKamailio(t *testing.T) {
	if os.Getenv("CI") == "true" {
		// In CI this test must run: fail, not skip, without Kamailio.
		for _, tool := range []string{"kamailio", "curl"} {
			if _, err := exec.LookPath(tool); err != nil {
				t.Fatalf("CI: %s is missing (apt-get install -y kamailio curl): %v", tool, err)
			}
		}
	}
	if !inNetns(t, "kamailio", "curl") {
		return
	}
	dir := t.TempDir()
	pki := testutil.NewPKI(t, dir)
	kamLog := startKamailio(t, dir, kamailioCfg(pki), nil)
	cfPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfPath, []byte(doorCaddyfile(pki)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := exec.Command(caddyBin(t), "adapt", "--config", cfPath).Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v", err)
	}
	c := startCaddy(t, string(cfg), doorSIPAddr, doorWebAddr)

	// A phone that connects and never registers: Kamailio answers its
	// OPTIONS, and nobody raises its lifetime.
	stranger := dialPhone(t)
	if st := stranger.request("OPTIONS", 0); !strings.HasPrefix(st, "SIP/2.0 405") {
		t.Fatalf("OPTIONS: %q, want Kamailio's 405", st)
	}
	strangerLast := time.Now()

	alice := dialPhone(t)
	if st := alice.request("REGISTER", 600); st != "SIP/2.0 200 OK" {
		t.Fatalf("REGISTER: %q, want 200 OK", st)
	}
	registeredAt := time.Now()
	// Kamailio PATCHes after its reply: await the lifetime it sets.
	var lifetimeMs int64
	c.eventually(t, 10*time.Second, "the registered phone's lifetime raised to 1h through the door", func() bool {
		ci, ok := c.doorConns(t)[alice.addr()]
		lifetimeMs = ci.LifetimeMs
		return ok && time.Duration(ci.LifetimeMs)*time.Millisecond == doorRegistered
	})
	raisedAfter := time.Since(registeredAt)
	audit := c.logLine(t, `"tcpops_api: PATCH request"`, alice.addr())
	if !strings.Contains(audit, `"tls_client_subject":"CN=registrar"`) || !strings.Contains(audit, `"status":200`) {
		t.Errorf("the door's audit line of Kamailio's PATCH: %s; want the client certificate's subject and status 200", audit)
	}

	// The stranger is closed at the short lifetime; alice, idle as long, is not.
	strangerIdle := c.closedAtShortLifetime(t, stranger, strangerLast, "the phone that never registered")
	if idle := time.Since(registeredAt); idle < doorShort+time.Second {
		assertOpenFor(t, alice.conn, doorShort+time.Second-idle)
	}
	aliceIdle := time.Since(registeredAt)
	if _, ok := c.doorConns(t)[alice.addr()]; !ok {
		t.Fatalf("the registered phone's connection is gone after %v idle", aliceIdle)
	}

	// Unregister: the short lifetime again, from Kamailio's PATCH on (the
	// lifetime runs from the PATCH, which follows the 200 OK by as long as
	// curl takes to start: measure from the PATCH, as the door logged it).
	if st := alice.request("REGISTER", 0); st != "SIP/2.0 200 OK" {
		t.Fatalf("REGISTER with Expires: 0: %q, want 200 OK", st)
	}
	unregisteredAt := time.Now()
	patchAt := c.auditTime(t, alice.addr(), 2)
	closedAfter := c.closedAtShortLifetime(t, alice, patchAt, "the unregistered phone (from Kamailio's PATCH)")
	patchDelay := patchAt.Sub(unregisteredAt)
	kb, _ := os.ReadFile(kamLog)
	for _, want := range []string{"registered (save 1): PATCH lifetime 1h: 200", "unregistered: PATCH lifetime back to the short one: 200"} {
		if !strings.Contains(string(kb), want) {
			t.Errorf("kamailio's log has no %q", want)
		}
	}
	figure(t, "registrar-door", "Kamailio raised the registered phone's lifetime to %dms through the door %.0fms after its REGISTER; it stayed connected %.1fs idle (short lifetime %v); the phone that never registered was closed after %.2fs idle, the unregistered one %.2fs after Kamailio's PATCH (%.0fms after the 200 OK to its unregister)",
		lifetimeMs, raisedAfter.Seconds()*1000, aliceIdle.Seconds(), doorShort, strangerIdle.Seconds(), closedAfter.Seconds(), patchDelay.Seconds()*1000)
}

// closedAtShortLifetime waits for Caddy to close p, whose lifetime last ran
// from last (its last byte, or the PATCH that set it), and checks that
// tcpops closed it for its lifetime, doorShort after last (+1.5s); it
// returns how long after last that was.
func (c *caddyProc) closedAtShortLifetime(t *testing.T, p *phone, last time.Time, who string) time.Duration {
	t.Helper()
	at, ok := readUntilClosed(p.conn, doorShort+5*time.Second)
	if !ok {
		t.Fatalf("%s is still connected %v after its last byte", who, time.Since(last))
	}
	took := at.Sub(last)
	// 50ms below: the door logs a PATCH just after it applied it.
	if took < doorShort-50*time.Millisecond || took > doorShort+1500*time.Millisecond {
		t.Errorf("%s was closed %v after its last byte, want the %v lifetime (+1.5s)", who, took, doorShort)
	}
	if e := c.endOf(t, p.addr(), 5*time.Second); e.Reason != "timeout" || e.Cause != "lifetime" {
		t.Errorf("tcpops logged %s/%s for %s, want timeout/lifetime", e.Reason, e.Cause, who)
	}
	return took
}

// auditTime waits for the door's n-th audit line of a PATCH by the remote
// address and returns when the door logged it.
func (c *caddyProc) auditTime(t *testing.T, remote string, n int) time.Time {
	t.Helper()
	var ts float64
	c.eventually(t, 10*time.Second, fmt.Sprintf("the door's audit line of PATCH number %d for %s", n, remote), func() bool {
		b, _ := os.ReadFile(c.logPath)
		seen := 0
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.Contains(line, `"tcpops_api: PATCH request"`) || !strings.Contains(line, "remote="+remote+`"`) {
				continue
			}
			if seen++; seen == n {
				var l struct {
					TS float64 `json:"ts"`
				}
				if err := json.Unmarshal([]byte(line), &l); err != nil {
					t.Fatalf("audit line %q: %v", line, err)
				}
				ts = l.TS
				return true
			}
		}
		return false
	})
	return time.Unix(0, int64(ts*1e9))
}

// doorConnInfo is the part of a connection the door test reads.
type doorConnInfo struct {
	ID         uint64 `json:"id"`
	LifetimeMs int64  `json:"lifetime_ms"`
}

// doorConns returns the tracked connections' lifetimes by remote address,
// from the admin API.
func (c *caddyProc) doorConns(t *testing.T) map[string]doorConnInfo {
	t.Helper()
	var list struct {
		Connections []struct {
			doorConnInfo
			Remote string `json:"remote"`
		} `json:"connections"`
	}
	if err := json.Unmarshal(c.get(t, "/tcpops/connections"), &list); err != nil {
		t.Fatal(err)
	}
	m := map[string]doorConnInfo{}
	for _, ci := range list.Connections {
		m[ci.Remote] = ci.doorConnInfo
	}
	return m
}

// logLine waits for a line of Caddy's log that has every one of parts.
func (c *caddyProc) logLine(t *testing.T, parts ...string) string {
	t.Helper()
	var found string
	c.eventually(t, 10*time.Second, fmt.Sprintf("a caddy log line with %q", parts), func() bool {
		b, _ := os.ReadFile(c.logPath)
		for _, line := range strings.Split(string(b), "\n") {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(line, p)
			}
			if ok {
				found = line
				return true
			}
		}
		return false
	})
	return found
}

// assertOpenFor checks that c stays open (nothing read, no EOF) for d.
func assertOpenFor(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	n, err := c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("the registered phone's connection did not stay open for %v: read %d, %v", d, n, err)
	}
}
