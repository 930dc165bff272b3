#!/usr/bin/env bash
# What mutual TLS costs on the hot path as it stands, side by side in one run:
# two local clusters of one config (router + expert servers, each its own
# process), one plaintext and one with mutual TLS (moe_local --tls: a CA
# made at run time, one certificate for every process), measured in
# alternation ROUNDS times by moe_loadgen: batch 1 with one client (p50
# latency) and batch 512 with two (throughput). Prints each round and the
# medians. Usage: bench/tls_overhead.sh [ROUNDS] (default 3)
# Environment: CONFIG (default deploy/config/bench_overhead.pbtxt: tiny
# experts, so batch 1 is RPC and router work; bench_1024.pbtxt for the
# real-size layer), DURATION per measurement (default 4s).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
config="${CONFIG:-$PWD/deploy/config/bench_overhead.pbtxt}"
duration="${DURATION:-4s}"

bazel build //deploy/local:moe_local //clients/cpp:moe_loadgen
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start() {  # NAME [moe_local flags]
  local name="$1"
  shift
  bazel-bin/deploy/local/moe_local --config="$config" --onednn_threads=1 --duration=1s \
      --concurrency=1 --batch=1 --serve "$@" > "$work/$name.log" 2>&1 &
  pids+=("$!")
  while ! grep -q "serving at" "$work/$name.log"; do
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$work/$name.log"; exit 1; fi
    sleep 0.2  # waiting for the cluster to start; not part of any measurement
  done
}
start plaintext
start mtls --tls
plaintext_router="$(grep -o 'serving at [0-9.:]*' "$work/plaintext.log" | awk '{print $3}')"
mtls_router="$(grep -o 'serving at [0-9.:]*' "$work/mtls.log" | awk '{print $3}')"
read -r -a mtls_flags <<< "$(sed -n 's/^client flags //p' "$work/mtls.log")"
echo "plaintext cluster at $plaintext_router, mutual TLS at $mtls_router (config $config)"

measure() {  # NAME ROUTER ROUND CONCURRENCY BATCH [client flags]
  local name="$1" router="$2" round="$3" clients="$4" batch="$5"
  shift 5
  bazel-bin/clients/cpp/moe_loadgen --router="$router" --config="$config" \
      --concurrency="$clients" --batch="$batch" --duration="$duration" \
      --json="$work/$name-$round-$batch.json" "$@" > /dev/null
}
for ((round = 1; round <= rounds; ++round)); do
  for batch in 1 512; do
    clients=$([ "$batch" = 1 ] && echo 1 || echo 2)
    measure plaintext "$plaintext_router" "$round" "$clients" "$batch"
    measure mtls "$mtls_router" "$round" "$clients" "$batch" "${mtls_flags[@]}"
  done
done

python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def row(name, r, batch):
    return json.load(open(f"{work}/{name}-{r}-{batch}.json"))[0]
p50 = {n: [] for n in ("plaintext", "mtls")}
tps = {n: [] for n in ("plaintext", "mtls")}
print(f"{'round':>5} {'B=1 p50 plain':>14} {'B=1 p50 mTLS':>13} {'added':>8} "
      f"{'B=512 plain tok/s':>18} {'B=512 mTLS tok/s':>17} {'mTLS/plain':>10}")
for r in range(1, rounds + 1):
    for n in p50:
        p50[n].append(row(n, r, 1)["latency_p50_s"] * 1e6)
        tps[n].append(row(n, r, 512)["tokens_per_second"])
    print(f"{r:>5} {p50['plaintext'][-1]:>11.0f} us {p50['mtls'][-1]:>10.0f} us "
          f"{p50['mtls'][-1] - p50['plaintext'][-1]:>5.0f} us {tps['plaintext'][-1]:>18.0f} "
          f"{tps['mtls'][-1]:>17.0f} {tps['mtls'][-1] / tps['plaintext'][-1]:>10.3f}")
mp = {n: statistics.median(v) for n, v in p50.items()}
mt = {n: statistics.median(v) for n, v in tps.items()}
print(f"median: batch 1 p50 {mp['plaintext']:.0f} -> {mp['mtls']:.0f} us "
      f"(+{mp['mtls'] - mp['plaintext']:.0f} us; goal <= 50); batch 512 "
      f"{mt['plaintext']:.0f} -> {mt['mtls']:.0f} tokens/s "
      f"({100 * (1 - mt['mtls'] / mt['plaintext']):.1f}% cost; goal <= 5%)")
PY
