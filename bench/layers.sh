#!/usr/bin/env bash
# Several MoE layers: one cluster serving every layer against one cluster per
# layer, on the same cores, side by side in one run (docs/models.md,
# "Several layers"). The model: 4 layers of deploy/config/bench_1024.pbtxt
# (d_model 1024, d_ff 4096, 8 experts, top-2, MODEL_PARALLEL over 2 servers).
#   one cluster:  a router and 2 servers holding all 4 layers; 4 clients,
#                 each cycling through the layers (moe_loadgen --layer).
#   per layer:    4 clusters (4 routers, 8 servers), one per layer; one
#                 client each.
# Both offer 4 requests of --batch tokens in flight. Prints tokens/s in all
# and per layer, p50, and the resident memory (RSS) of the serving processes
# (routers and expert servers), and the in-process layer's tokens/s on the
# same kernels as the reference (moe_loadgen --compare_local, one layer).
# Usage: bench/layers.sh [relu|silu_gated ...] ; environment DTYPES (default
# "fp32 bf16"), BATCH (512), DURATION (5s).
set -euo pipefail
cd "$(dirname "$0")/.."
activations=("${@:-relu silu_gated}")
read -r -a activations <<<"${activations[*]}"
read -r -a dtypes <<<"${DTYPES:-fp32 bf16}"
batch="${BATCH:-512}"
duration="${DURATION:-5s}"
layers=4

bazel build //deploy/local:moe_local //clients/cpp:moe_loadgen
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'cleanup; rm -rf "$work"' EXIT

# start CONFIG DTYPE LOG: a moe_local --serve cluster in the background;
# sets `pid` (moe_local's; its children are the router and the servers).
start() {
  bazel-bin/deploy/local/moe_local --config="$1" --dtype="$2" --onednn_threads=0 \
      --duration=1s --concurrency=1 --batch=64 --train_steps=0 --serve >"$3" 2>&1 &
  pid=$!
  pids+=("$pid")
}
# wait_serving LOG PID: until the cluster serves; prints the router's address.
wait_serving() {
  while ! grep -q "serving at" "$1"; do
    if ! kill -0 "$2" 2>/dev/null; then cat "$1" >&2; exit 1; fi
    sleep 0.2  # waiting for start-up; not part of any measurement
  done
  grep -o 'serving at [0-9.:]*' "$1" | awk '{print $3}'
}
# rss_mib PID...: the resident memory of these clusters' serving processes.
rss_mib() {
  local total=0 kib
  for p in "$@"; do
    for kib in $(ps -o rss= --ppid "$p"); do total=$((total + kib)); done
  done
  echo $((total / 1024))
}
calc() { awk "BEGIN { print $1 }"; }
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])" "$1" "$2"; }

printf "%-10s %-5s %-12s %10s %10s %9s %9s %12s\n" activation dtype setup "tokens/s" \
    "per layer" "p50 ms" "RSS MiB" "local tok/s"
for activation in "${activations[@]}"; do
  for dtype in "${dtypes[@]}"; do
    one="$work/one_$activation.pbtxt"
    all="$work/all_$activation.pbtxt"
    extra=""
    [[ "$activation" == silu_gated ]] && extra="activation: EXPERT_ACTIVATION_SILU_GATED"
    sed "s/seed: 42/seed: 42 $extra/" deploy/config/bench_1024.pbtxt >"$one"
    sed "s/seed: 42/seed: 42 num_layers: $layers $extra/" deploy/config/bench_1024.pbtxt >"$all"

    # One cluster, every layer.
    start "$all" "$dtype" "$work/all.log"
    address="$(wait_serving "$work/all.log" "$pid")"
    rss="$(rss_mib "$pid")"
    bazel-bin/clients/cpp/moe_loadgen --router="$address" --config="$all" --dtype="$dtype" \
        --layer=0,1,2,3 --concurrency=4 --batch="$batch" --duration="$duration" \
        --compare_local --rounds=1 --json="$work/all.json" >/dev/null
    rate="$(field "$work/all.json" tokens_per_second)"
    printf "%-10s %-5s %-12s %10.0f %10.0f %9.1f %9d %12.0f\n" "$activation" "$dtype" \
        "one cluster" "$rate" "$(calc "$rate / $layers")" \
        "$(calc "1000 * $(field "$work/all.json" latency_p50_s)")" "$rss" \
        "$(field "$work/all.json" local_tokens_per_second)"
    cleanup

    # One cluster per layer, all at once on the same cores.
    cluster_pids=()
    addresses=()
    for l in $(seq 0 $((layers - 1))); do
      start "$one" "$dtype" "$work/layer$l.log"
      cluster_pids+=("$pid")
    done
    for l in $(seq 0 $((layers - 1))); do
      addresses+=("$(wait_serving "$work/layer$l.log" "${cluster_pids[$l]}")")
    done
    rss="$(rss_mib "${cluster_pids[@]}")"
    loads=()
    for l in $(seq 0 $((layers - 1))); do
      bazel-bin/clients/cpp/moe_loadgen --router="${addresses[$l]}" --config="$one" \
          --dtype="$dtype" --concurrency=1 --batch="$batch" --duration="$duration" \
          --json="$work/layer$l.json" >/dev/null &
      loads+=($!)
    done
    for p in "${loads[@]}"; do wait "$p"; done
    total=0
    p50=0
    for l in $(seq 0 $((layers - 1))); do
      total="$(calc "$total + $(field "$work/layer$l.json" tokens_per_second)")"
      p50="$(calc "$p50 + $(field "$work/layer$l.json" latency_p50_s) / $layers")"
    done
    printf "%-10s %-5s %-12s %10.0f %10.0f %9.1f %9d %12s\n" "$activation" "$dtype" \
        "per layer" "$total" "$(calc "$total / $layers")" "$(calc "1000 * $p50")" \
        "$rss" "-"
    cleanup
  done
done
