#!/usr/bin/env bash
# The cluster against the same layer in one process, side by side in one run:
# starts a local cluster of deploy/config/bench_1024.pbtxt (router + 2 expert
# servers) with moe_local --serve, then runs moe_loadgen --compare_local on
# it (5 rounds per point, local then remote, the median ratio and its
# spread), then prints the router's overlap (moe_router_dispatch_wait_seconds_total).
# Usage: bench/remote_vs_local.sh [fp32|bf16] [extra moe_loadgen flags]
# Environment: CONFIG (default deploy/config/bench_1024.pbtxt; the
# deploy/config/bench_overhead.pbtxt one has tiny experts, so batch-1 numbers
# are RPC and router work), ONEDNN_THREADS per server (default 0: all cores),
# ROUTER_FLAGS and SERVER_FLAGS (comma-separated, e.g.
# ROUTER_FLAGS=--micro_batch_bytes=262144), CLUSTER_FLAGS (more moe_local
# flags, space-separated, e.g. "--pin_cpus --router_cpus=2 --server_cpus=1"),
# CLIENT_DTYPE (default: the servers' dtype; CLIENT_DTYPE=fp32 with bf16 servers measures fp32 clients
# of bf16 kernels, whose rows the router rounds to bf16 unless
# ROUTER_FLAGS=--round_tokens_for_bf16_servers=false).
set -euo pipefail
cd "$(dirname "$0")/.."
dtype="${1:-fp32}"
shift || true
config="${CONFIG:-$PWD/deploy/config/bench_1024.pbtxt}"

bazel build //deploy/local:moe_local //clients/cpp:moe_loadgen
source bench/start_cluster.sh
# shellcheck disable=SC2086  # CLUSTER_FLAGS: one word per flag
start_cluster "$config" "$dtype" --onednn_threads="${ONEDNN_THREADS:-0}" \
    --router_flags="${ROUTER_FLAGS:-}" --server_flags="${SERVER_FLAGS:-}" ${CLUSTER_FLAGS:-}
router="$address"
echo "cluster at $router ($dtype)"
bazel-bin/clients/cpp/moe_loadgen --router="$router" --config="$config" --dtype="${CLIENT_DTYPE:-$dtype}" \
    --local_dtype="$dtype" --compare_local --rounds=5 --concurrency=1,2 --batch=1,64,512,4096 --duration=2s "$@"
# The router's overlap over the whole run (docs/metrics.md): of the expert
# calls' time outside the kernels, the part hidden under compute, and what
# stayed exposed against the time the router waited for the servers.
curl -s "$router_metrics" | awk '
  /^moe_router_dispatch_wait_seconds_total/ { if ($0 ~ /hidden/) hidden = $NF; else all = $NF }
  /^moe_router_phase_seconds_sum/ && /fan_out/ { fan_out = $NF }
  END { if (all > 0 && fan_out > 0)
    printf "overlap: %.1f%% of the calls\x27 %.1f s outside the kernels hidden under compute; " \
           "%.1f s exposed, %.1f%% of the %.1f s waiting for the servers\n",
           100 * hidden / all, all, all - hidden, 100 * (all - hidden) / fan_out, fan_out }'
