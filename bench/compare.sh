#!/usr/bin/env bash
# Compares this checkout with an earlier revision, side by side in one run:
# builds Caddy with the plugin from both, starts both on loopback, each
# serving the same two layer4 routes (a proxy without tcpops, and the same
# proxy behind tcpops with the options bench/run.sh uses), and measures the
# four targets interleaved, so that whatever else the machine does hits all
# of them alike:
#
#   - the connection rate, as fast as 64 clients go, and the CPU time each
#     Caddy spends per connection;
#   - the same at a fixed offered rate (RATE_LIMIT), where the CPU per
#     connection compares the work and not how well a busy process batches;
#   - Caddy's resident memory per idle proxied connection (CONNS), each
#     measurement in a fresh process.
#
#   bench/compare.sh 9d5c7d8                     # issue 10's "before"
#   ROUNDS=11 DURATION=10s bench/compare.sh HEAD~3 rate
#
# Arguments: the revision to compare with, then some of: rate rss (both by
# default). Environment: ROUNDS (9), DURATION (10s), RATE_LIMIT (2000),
# CONNS (5000), RSS_ROUNDS (5), BENCH_BASE_PORT (24500: upstream; before
# +1 plain, +2 tcpops, +9 admin; after +11, +12, +19; rss +21 plain,
# +22 tcpops, +29 admin), KEEP=1 to keep the work directory, PIN=1 to run
# both Caddys on the last CPU and the load generator and upstream on the
# others (taskset; Go then gives each Caddy GOMAXPROCS 1), so that they do
# not take each other's CPU in the middle of a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

rev=${1:?usage: bench/compare.sh REVISION [rate] [rss]}
shift
what=${*:-rate rss}
base=${BENCH_BASE_PORT:-24500}
rounds=${ROUNDS:-9}
dur=${DURATION:-10s}
limit=${RATE_LIMIT:-2000}
conns=${CONNS:-5000}
rssRounds=${RSS_ROUNDS:-5}

pinCaddy= pinLoad=
if [[ -n ${PIN:-} ]]; then
	last=$(($(nproc) - 1))
	pinCaddy="taskset -c $last" pinLoad="taskset -c 0-$((last - 1))"
fi

dir=$(mktemp -d /tmp/tcpops-compare.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	git worktree remove --force "$dir/src" 2>/dev/null || true
	if [[ -z ${KEEP:-} ]]; then rm -rf "$dir"; else echo "kept $dir" >&2; fi
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" # Caddy holds two descriptors per proxied connection

echo "building $rev and this checkout into $dir" >&2
git worktree add --detach "$dir/src" "$rev" >/dev/null 2>&1
(cd "$dir/src" && go build -o "$dir/caddy-before" ./cmd/caddy)
go build -o "$dir/caddy-after" ./cmd/caddy
go build -o "$dir/loadgen" ./bench/loadgen

up=127.0.0.1:$base
config() { # name, port offset
	caddy_config "127.0.0.1:$((base + $2 + 9))" "$dir/$1.log" "$up" \
		"127.0.0.1:$((base + $2 + 1))" "127.0.0.1:$((base + $2 + 2))" >"$dir/$1.json"
}
config before 0
config after 10
config rss 20

$pinLoad "$dir/loadgen" upstream -listen "$up" &
pids+=($!)
wait_port "$up"

echo "# $rev (before) and $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+changes') (after), side by side${PIN:+; Caddys pinned to CPU $last, the load to the others}"
echo
echo "$(date -u +%FT%TZ), nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(go version | cut -d' ' -f3), load average $(cut -d' ' -f1-3 /proc/loadavg)"

lg() { timeout 1800 $pinLoad "$dir/loadgen" "$@"; }
for w in $what; do
	case $w in
	rate)
		$pinCaddy "$dir/caddy-before" run --config "$dir/before.json" >"$dir/before.out" 2>&1 &
		pb=$!
		pids+=($pb)
		$pinCaddy "$dir/caddy-after" run --config "$dir/after.json" >"$dir/after.out" 2>&1 &
		pa=$!
		pids+=($pa)
		for p in 1 2 11 12; do wait_port "127.0.0.1:$((base + p))"; done
		targets="before-plain=127.0.0.1:$((base + 1)),before-tcpops=127.0.0.1:$((base + 2)),after-plain=127.0.0.1:$((base + 11)),after-tcpops=127.0.0.1:$((base + 12))"
		cpu="before-plain=$pb,before-tcpops=$pb,after-plain=$pa,after-tcpops=$pa"
		lg rate -targets "$targets" -pids "$cpu" -clients 64 -duration "$dur" -rounds "$rounds"
		lg rate -targets "$targets" -pids "$cpu" -clients 64 -limit "$limit" -duration "$dur" -rounds "$rounds"
		kill $pb $pa
		wait $pb $pa 2>/dev/null || true
		;;
	rss)
		# One Caddy at a time, on the same ports, from the binary of each target.
		plain=127.0.0.1:$((base + 21)) tcpops=127.0.0.1:$((base + 22))
		lg rss -targets "before-plain=$plain,before-tcpops=$tcpops,after-plain=$plain,after-tcpops=$tcpops" \
			-caddy "before-plain=$dir/caddy-before,before-tcpops=$dir/caddy-before,after-plain=$dir/caddy-after,after-tcpops=$dir/caddy-after" \
			-admin "http://127.0.0.1:$((base + 29))" -config "$dir/rss.json" -n "$conns" -rounds "$rssRounds"
		;;
	*)
		echo "unknown measurement $w" >&2
		exit 2
		;;
	esac
done
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
