#!/usr/bin/env bash
# Process-level benchmarks of caddy-tcpops, as published in BENCHMARKS.md.
#
# Builds Caddy with the plugin and the load generator, starts on loopback an
# upstream (bench/loadgen), one Caddy with three layer4 servers (the same
# proxy route without tcpops, with tcpops, and with a short lifetime) and,
# when installed, HAProxy with client keepalive and a client timeout; runs
# the measurements, interleaving the proxies (ABAB); prints the tables;
# stops everything. Loopback only; each measurement is bounded in time.
#
#   bench/run.sh                     # everything, ~10 minutes
#   bench/run.sh tput rate           # some of: tput rate memory rss expire
#   ROUNDS=7 DURATION=5s bench/run.sh rate
#
# Environment: BENCH_BASE_PORT (24000: upstream; +1 plain, +2 tcpops,
# +3 lifetime route, +4 HAProxy, +9 Caddy admin; rss's own Caddy: +5 plain,
# +6 tcpops, +7 admin), ROUNDS (5), DURATION (3s),
# CONNS (8000, for memory, rss and expire), LIFETIME (10s, for expire),
# RATE_LIMIT (1000: the fixed offered connection rate of the second rate run),
# KEEP=1 to keep the work directory (binaries, configs, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

base=${BENCH_BASE_PORT:-24000}
rounds=${ROUNDS:-5}
dur=${DURATION:-3s}
conns=${CONNS:-8000}
lifetime=${LIFETIME:-10s}
limit=${RATE_LIMIT:-1000}
what=${*:-tput rate memory rss expire}

up=127.0.0.1:$base
plain=127.0.0.1:$((base + 1))
tcpops=127.0.0.1:$((base + 2))
expire=127.0.0.1:$((base + 3))
haproxy=127.0.0.1:$((base + 4))
admin=127.0.0.1:$((base + 9))

dir=$(mktemp -d /tmp/tcpops-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	if [[ -z ${KEEP:-} ]]; then rm -rf "$dir"; else echo "kept $dir" >&2; fi
}
trap cleanup EXIT

ulimit -n "$(ulimit -Hn)" # Caddy holds two descriptors per proxied connection

echo "building into $dir" >&2
go build -o "$dir/caddy" ./cmd/caddy
go build -o "$dir/loadgen" ./bench/loadgen

caddy_config "$admin" "$dir/caddy.log" "$up" "$plain" "$tcpops" "$expire" "$lifetime" >"$dir/caddy.json"
# For rss, which starts a Caddy of its own for each measurement: the plain
# and tcpops routes again, on ports of their own.
caddy_config "127.0.0.1:$((base + 7))" "$dir/rss.log" "$up" "127.0.0.1:$((base + 5))" "127.0.0.1:$((base + 6))" >"$dir/rss.json"

# HAProxy with the nearest equivalent: client keepalive with the same idle,
# count and interval, and a client inactivity timeout (60s, as the tcpops
# lifetime). Two threads, as Caddy has GOMAXPROCS 2 here.
cat >"$dir/haproxy.cfg" <<CFG
global
    maxconn 9000
    nbthread $(nproc)
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option clitcpka
    clitcpka-idle 30s
    clitcpka-cnt 3
    clitcpka-intvl 10s
frontend fe
    bind $haproxy
    default_backend be
backend be
    server up $up
CFG

"$dir/loadgen" upstream -listen "$up" &
pids+=($!)
"$dir/caddy" run --config "$dir/caddy.json" >"$dir/caddy.out" 2>&1 &
pids+=($!)
targets="plain=$plain,tcpops=$tcpops"
cpu="plain=$!,tcpops=$!" # whose CPU time each target costs
if command -v haproxy >/dev/null; then
	haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.out" 2>&1 &
	pids+=($!)
	cpu="$cpu,haproxy=$!"
	wait_port "$haproxy"
	targets="haproxy=$haproxy,$targets"
else
	echo "haproxy not installed: no peer comparison" >&2
fi
wait_port "$up"
wait_port "$plain"
wait_port "$tcpops"
wait_port "$admin"

echo "# caddy-tcpops process-level benchmarks"
echo
echo "$(date -u +%FT%TZ), nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(go version | cut -d' ' -f3), load average $(cut -d' ' -f1-3 /proc/loadavg)"

lg() { timeout 900 "$dir/loadgen" "$@"; }
for w in $what; do
	case $w in
	tput)
		for d in up down; do
			for s in 1 32; do
				lg tput -targets "$targets" -pids "$cpu" -dir $d -streams $s -duration "$dur" -rounds "$rounds"
			done
		done
		;;
	rate)
		lg rate -targets "$targets" -pids "$cpu" -clients 64 -duration "$dur" -rounds "$rounds"
		# The same at a fixed offered rate well under the maximum: CPU per
		# connection then compares the work, not the batching.
		lg rate -targets "$targets" -pids "$cpu" -clients 64 -limit "$limit" -duration "$dur" -rounds "$rounds"
		;;
	memory)
		lg memory -targets "plain=$plain,tcpops=$tcpops" -admin "http://$admin" -n "$conns" -rounds 3
		;;
	rss)
		lg rss -targets "plain=127.0.0.1:$((base + 5)),tcpops=127.0.0.1:$((base + 6))" \
			-admin "http://127.0.0.1:$((base + 7))" -caddy "$dir/caddy" -config "$dir/rss.json" -n "$conns" -rounds 3
		;;
	expire)
		lg expire -addr "$expire" -n "$conns" -lifetime "$lifetime" -log "$dir/caddy.log"
		;;
	*)
		echo "unknown measurement $w" >&2
		exit 2
		;;
	esac
done
