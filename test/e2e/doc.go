// Package e2e holds the process-level proof of caddy-tcpops: tests that run
// a Caddy binary built with xcaddy (CADDY_BIN) against real peers (sipp, a
// dead client whose packets iptables drops, thousands of connections) in
// private network namespaces. test/e2e/run.sh runs them; docs/proof.md says
// what each shows and what it measured.
package e2e
