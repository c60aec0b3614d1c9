#!/usr/bin/env bash
# The go test benchmarks of the handler path (bench_test.go), interleaved:
# the test binary is built once, then each round runs every benchmark once,
# each one's mode=plain right before its mode=tcpops, so that a noisy,
# shared machine slows both alike. benchstat then gives medians, spreads
# and the tcpops/plain ratio of each (-col /mode).
#
#   bench/gobench.sh                                   # ~5 minutes
#   ROUNDS=10 BENCH='BenchmarkHandle' bench/gobench.sh
#
# Environment: ROUNDS (6), BENCH (the -bench pattern), BENCHTIME (1s),
# OUT (file for the raw output; a temporary one by default).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-6}
bench=${BENCH:-BenchmarkHandle|BenchmarkConnReadWrite|BenchmarkProxyThroughput|BenchmarkProxyConnRate}
dir=$(mktemp -d /tmp/tcpops-gobench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
out=${OUT:-$dir/raw.txt}
: >"$out"

benchstat=$(command -v benchstat || echo "$(go env GOPATH)/bin/benchstat")
if [[ ! -x $benchstat ]]; then
	echo "benchstat not found: go install golang.org/x/perf/cmd/benchstat@latest (or a version go list -m -versions golang.org/x/perf shows)" >&2
	exit 1
fi

go test -c -o "$dir/tcpops.test" .
for r in $(seq "$rounds"); do
	echo "round $r of $rounds" >&2
	(cd "$dir" && timeout 600 ./tcpops.test -test.run '^$' -test.bench "$bench" -test.benchmem \
		-test.count 1 -test.benchtime "${BENCHTIME:-1s}") | tee -a "$out" | grep -E '^Benchmark' >&2
done
"$benchstat" -col /mode "$out"
