#!/usr/bin/env bash
# The gRPC figures of issue 18 (BENCHMARKS.md, docs/listener.md): 50 gRPC-Go
# clients making unary health checks, each pausing the lifetime itself
# (±5ms) between calls, through Caddy with the tcpops listener wrapper
# (lifetime 1s; max_lifetime 3s, grace 5s) and against gRPC-Go's own
# keepalive server with the same policy; and (issue 26) the same under
# max_lifetime with three kinds of call per client (unary, a short server
# stream, a net/http POST whose body cannot be replayed), pausing the quiet
# window, against gRPC-Go's MaxConnectionAge in the same run. Without -race: Caddy's
# reverse_proxy races on streamed request bodies (grpc_test.go).
set -euo pipefail
cd "$(dirname "$0")/.."
TCPOPS_GRPC_FULL=1 go test -count=1 -v -timeout 10m -run '^TestGRPC' . | grep -E '^\s*(--- |grpc_test|ok|FAIL)'
