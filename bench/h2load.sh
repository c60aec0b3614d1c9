#!/usr/bin/env bash
# End-to-end HTTP/2 through the listener wrapper (issue 26): one Caddy
# with two h2c servers that differ only in listener_wrappers, "plain" (no
# wrappers) and "tcpops" (the tcpops wrapper: keepalive, lifetime 1m,
# max_lifetime 1h, so that the frames are followed and nothing closes
# during a run), each answering a static body of SIZE bytes. h2load
# measures them in paired rounds: in each round one run on each, the order
# alternating, so that whatever else the machine does hits both alike; it
# prints each round's requests per second and the tcpops/plain ratio, then
# the median and the spread (min - max) of the ratios. The load average is
# printed at the start and the end.
#
#   bench/h2load.sh                     # 9 rounds of 10s, 16 clients x 10 streams, 100-byte body
#   ROUNDS=5 DURATION=5 SIZE=65536 bench/h2load.sh
#
# Environment: ROUNDS (9), DURATION (seconds, 10), CLIENTS (16), STREAMS
# (max concurrent streams per client, 10), SIZE (100), CADDY_BIN (built
# from this checkout when unset), BENCH_BASE_PORT (24700: +1 plain, +2
# tcpops, +9 admin), PIN=1 to run Caddy on the last CPU and h2load on the
# others (taskset).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

rounds=${ROUNDS:-9}
dur=${DURATION:-10}
clients=${CLIENTS:-16}
streams=${STREAMS:-10}
size=${SIZE:-100}
base=${BENCH_BASE_PORT:-24700}
plain=127.0.0.1:$((base + 1)) tcpops=127.0.0.1:$((base + 2)) admin=127.0.0.1:$((base + 9))

pinCaddy= pinLoad=
if [[ -n ${PIN:-} ]]; then
	last=$(($(nproc) - 1))
	pinCaddy="taskset -c $last" pinLoad="taskset -c 0-$((last - 1))"
fi

dir=$(mktemp -d /tmp/tcpops-h2load.XXXXXX)
pid=
cleanup() {
	if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$dir"
}
trap cleanup EXIT

caddy=${CADDY_BIN:-}
if [[ -z $caddy ]]; then
	echo "building Caddy with the plugin into $dir" >&2
	go build -o "$dir/caddy" ./cmd/caddy
	caddy=$dir/caddy
fi

body=$(head -c "$size" /dev/zero | tr '\0' x)
server() { # server LISTEN WRAPPERS
	cat <<JSON
"$1": {"listen": ["$2"], "protocols": ["h1", "h2c"], "listener_wrappers": [$3],
  "routes": [{"handle": [{"handler": "static_response", "body": "$body"}]}]}
JSON
}
cat >"$dir/caddy.json" <<JSON
{
  "admin": {"listen": "$admin"},
  "logging": {"logs": {"default": {"level": "ERROR"}}},
  "apps": {"http": {"servers": {
    $(server plain "$plain" ""),
    $(server tcpops "$tcpops" "{\"wrapper\": \"tcpops\", $tcpops_options, \"lifetime\": \"1m\"}")
  }}}
}
JSON
$pinCaddy "$caddy" run --config "$dir/caddy.json" >"$dir/caddy.log" 2>&1 &
pid=$!
wait_port "$plain"
wait_port "$tcpops"

# rps ADDR: one h2load run against ADDR, its requests per second; fails
# on any request that did not succeed.
rps() {
	local out
	out=$($pinLoad h2load -c "$clients" -m "$streams" -D "$dur" "http://$1/" 2>&1)
	if ! grep -qE 'requests: .* 0 failed, 0 errored' <<<"$out"; then
		echo "h2load against $1 had failures:" >&2
		echo "$out" >&2
		return 1
	fi
	sed -nE 's/^finished in .*, ([0-9.]+) req\/s.*/\1/p' <<<"$out"
}

# The setup is real: while h2load runs against "tcpops", the admin API
# lists its connections (tracked by the wrapper), and none of "plain"'s.
h2load -c 2 -m 1 -D 3 "http://$tcpops/" >/dev/null 2>&1 &
loader=$!
sleep 1
listed=$(curl -fsS "http://$admin/tcpops/connections")
wait "$loader"
if ! grep -q "$tcpops" <<<"$listed"; then
	echo "tcpops tracks no connection of $tcpops: $listed" >&2
	exit 1
fi

echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "round  plain_rps  tcpops_rps  ratio"
ratios=()
for i in $(seq "$rounds"); do
	if ((i % 2)); then
		p=$(rps "$plain")
		t=$(rps "$tcpops")
	else
		t=$(rps "$tcpops")
		p=$(rps "$plain")
	fi
	r=$(awk -v t="$t" -v p="$p" 'BEGIN { printf "%.3f", t / p }')
	ratios+=("$r")
	printf '%5d  %9.0f  %10.0f  %s\n' "$i" "$p" "$t" "$r"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END {
	printf "tcpops/plain: median %.3f, spread %.3f - %.3f over %d rounds\n", a[int((NR + 1) / 2)], a[1], a[NR], NR }'
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
