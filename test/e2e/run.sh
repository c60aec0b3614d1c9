#!/usr/bin/env bash
# Proof against real peers and real faults (docs/proof.md): runs the
# process-level tests of test/e2e against a Caddy built with xcaddy, then
# fuzzes the three ways options enter tcpops. Needs root, iproute2,
# iptables, sipp (Debian: sip-tester), kamailio, curl and openssl; each test runs in a private
# network namespace of its own, on loopback only.
#
#   CADDY_BIN=/path/to/caddy test/e2e/run.sh   # use an xcaddy build
#   test/e2e/run.sh                            # build one first (xcaddy v0.4.5)
#
# Environment: CADDY_BIN (a caddy with tcpops and caddy-l4), FUZZTIME (per
# fuzz target, default 20s), E2E_FUZZ=0 (no fuzzing), E2E_TESTS=0 (fuzzing
# only), E2E_RUN (a -run pattern for the process-level tests),
# E2E_FUZZ_TARGETS (the fuzz targets, space-separated; dir:Name for a
# package other than the root; default all ten), E2E_FUZZ_JOBS (targets
# fuzzed at once, default 2), E2E_FUZZ_PARALLEL (workers per target,
# default 1).
# A fuzz target that does not exist, or that ran no input, fails.
#
# Each part prints its figure on a line of its own (e.g. "deadpeer-idle:
# closed after 4.01s (bound 5.50s; ...)"); they are repeated at the end.
# Exits non-zero if any part fails or is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$(go env GOPATH)/bin:$PATH"
t0=$(date +%s)
since() { echo "$(( $(date +%s) - t0 ))s"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=0
: >"$work/e2e.log"
# Fuzzing needs none of this part.
if [ "${E2E_TESTS:-1}" != 0 ]; then
	missing=()
	[ "$(id -u)" = 0 ] || missing+=("root (network namespaces, iptables)")
	for tool in unshare ip ss iptables sipp kamailio curl openssl; do
		command -v "$tool" >/dev/null || missing+=("$tool")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "test/e2e/run.sh: missing: ${missing[*]}" >&2
		echo "  apt-get update && apt-get install -y iproute2 iptables sip-tester kamailio curl openssl, and run as root" >&2
		exit 1
	fi

	if [ -z "${CADDY_BIN:-}" ]; then
		echo "== building caddy with xcaddy (set CADDY_BIN to skip) (at $(since))"
		command -v xcaddy >/dev/null || go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
		# The @v0.0.0 keeps xcaddy from asking the module proxy for this
		# unpublished module.
		xcaddy build v2.11.9 --output "$work/caddy" \
			--with github.com/tcpops/caddy-tcpops@v0.0.0=. \
			--with github.com/mholt/caddy-l4@v0.1.2 >"$work/xcaddy.log" 2>&1 ||
			{ tail -30 "$work/xcaddy.log"; exit 1; }
		CADDY_BIN="$work/caddy"
	fi
	CADDY_BIN=$(realpath "$CADDY_BIN")
	export CADDY_BIN
	# Read whole, then searched: grep -q in a pipe under pipefail fails by
	# chance with caddy's SIGPIPE (issue 30).
	modules=$("$CADDY_BIN" list-modules)
	grep -qx 'layer4.handlers.tcpops' <<<"$modules" ||
		{ echo "$CADDY_BIN has no layer4.handlers.tcpops" >&2; exit 1; }
	"$CADDY_BIN" version

	echo "== process-level tests against $CADDY_BIN (at $(since))"
	go test -count=1 -v -timeout 10m -run "${E2E_RUN:-.}" ./test/e2e/ 2>&1 | tee "$work/e2e.log" || status=1
	if grep -q -- '--- SKIP' "$work/e2e.log"; then
		echo "test/e2e/run.sh: a process-level test was skipped:" >&2
		grep -- '--- SKIP' "$work/e2e.log" >&2
		status=1
	fi
fi

# fuzz_ran fails, saying why, unless the fuzzer's log $2 of target $1 shows
# that it fuzzed: go test -fuzz with a pattern that matches no target
# (renamed, removed) prints "no fuzz tests to fuzz" and exits 0.
fuzz_ran() {
	local execs
	if grep -q 'no fuzz tests to fuzz' "$2"; then
		cat "$2"
		echo "$1: FAILED: no such fuzz target in this package"
		return 1
	fi
	# Inputs run: the fuzzing's execs, or on a machine so busy that the
	# -fuzztime ran out first, the seeds of the baseline coverage run.
	execs=$(grep -oE 'execs: [0-9]+' "$2" | tail -1 | grep -oE '[0-9]+' || true)
	seeds=$(grep -oE 'baseline coverage: [0-9]+' "$2" | tail -1 | grep -oE '[0-9]+' || true)
	if [ "${execs:-0}" -eq 0 ] && [ "${seeds:-0}" -eq 0 ]; then
		cat "$2"
		echo "$1: FAILED: the fuzzer ran no input"
		return 1
	fi
	if [ "${execs:-0}" -eq 0 ]; then
		echo "$1: ran only ${seeds} seeds (baseline coverage): the machine is too busy for FUZZTIME=${FUZZTIME:-20s}"
	fi
}

# fuzz_one fuzzes one target, spec (a name in the root package, or dir:Name
# for another), and fails if it found a failing input or fuzzed nothing.
fuzz_one() {
	local pkg=. target=$1 before after
	case $1 in *:*) pkg=./${1%%:*} target=${1#*:} ;; esac
	echo "== $target ($pkg) for ${FUZZTIME:-20s} (at $(since))"
	before=$(ls $pkg/testdata/fuzz/$target 2>/dev/null | sort || true)
	if go test -run '^$' -fuzz "^$target\$" -fuzztime "${FUZZTIME:-20s}" -parallel "${E2E_FUZZ_PARALLEL:-1}" "$pkg" >"$work/$target.log" 2>&1; then
		fuzz_ran "$target" "$work/$target.log" || return 1
		tail -3 "$work/$target.log"
		return 0
	fi
	after=$(ls $pkg/testdata/fuzz/$target 2>/dev/null | sort || true)
	if [ "$before" = "$after" ] && grep -q 'context deadline exceeded' "$work/$target.log" &&
		fuzz_ran "$target" "$work/$target.log" &&
		! grep -q 'Failing input written' "$work/$target.log"; then
		# Go 1.26's fuzz coordinator can report its own -fuzztime
		# deadline as a failure (go.dev/issue/75804, fixed in Go 1.27);
		# no failing input was found: none was written, to the corpus
		# or anywhere the log names.
		tail -4 "$work/$target.log"
		echo "$target: ran its full time without a failing input (the deadline report is Go issue 75804)"
		return 0
	fi
	cat "$work/$target.log"
	echo "$target: FAILED; the failing input is in $pkg/testdata/fuzz/$target/"
	# And in this log, whole: a CI machine's testdata is gone with it, and
	# the input is what reproduces the defect (go test replays it as a
	# seed once it is saved under that directory). Go writes it as Go
	# literals, printable text.
	local f
	for f in $(comm -13 <(echo "$before") <(echo "$after")); do
		echo "-- $pkg/testdata/fuzz/$target/$f"
		cat "$pkg/testdata/fuzz/$target/$f"
	done
	return 1
}

fuzz_ok=0 fuzz_bad=0
if [ "${E2E_FUZZ:-1}" != 0 ]; then
	# E2E_FUZZ_JOBS targets at a time (default 2), each with
	# E2E_FUZZ_PARALLEL workers (default 1): on two cores, the same
	# fuzzing per second of CPU as one target with two workers, in half
	# the wall time; what is printed stays in the targets' order.
	targets=(${E2E_FUZZ_TARGETS:-FuzzCaddyfile FuzzHandlerJSON FuzzAdminPatchBody FuzzAdminRequests FuzzDeadlines FuzzRegistryIndex FuzzCommandAnswer internal/h2frame:FuzzTracker internal/proxyhdr:FuzzSkip internal/termsafe:FuzzJSON})
	jobs=${E2E_FUZZ_JOBS:-2}
	for ((i = 0; i < ${#targets[@]}; i += jobs)); do
		pids=()
		for spec in "${targets[@]:i:jobs}"; do
			fuzz_one "$spec" >"$work/fuzz-${#pids[@]}.out" 2>&1 &
			pids+=($!)
		done
		for j in "${!pids[@]}"; do
			if wait "${pids[j]}"; then
				fuzz_ok=$((fuzz_ok + 1))
			else
				fuzz_bad=$((fuzz_bad + 1))
				status=1
			fi
			cat "$work/fuzz-$j.out"
		done
	done
fi

echo
echo "== figures"
grep -E '^[a-z]+(-[a-z]+)*: ' "$work/e2e.log" | grep -v '^ok ' || true
grep -E '^(--- (PASS|FAIL|SKIP)|ok |FAIL)' "$work/e2e.log" || true
echo "fuzz targets: $fuzz_ok passed, $fuzz_bad failed"
echo "== test/e2e/run.sh done in $(since), status $status"
exit $status
