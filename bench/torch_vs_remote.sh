#!/usr/bin/env bash
# The cluster against PyTorch's in-process layer of the same shape, side by
# side in one run: starts a local cluster of deploy/config/bench_1024.pbtxt
# (router + 2 expert servers) with moe_local --serve, then in each of
# ROUNDS rounds (default 5) runs bench/torch_moe.py for 2 s and moe_loadgen
# for 2 s with 1 and with 2 clients, and prints per client count the median
# of the rounds' remote/PyTorch ratios and their spread.
# Usage: bench/torch_vs_remote.sh [bf16|fp32] [batch]   (defaults: bf16 4096)
# Needs Debian's python3-torch (deploy/setup_debian.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
dtype="${1:-bf16}"
batch="${2:-4096}"
rounds="${ROUNDS:-5}"
config="$PWD/deploy/config/bench_1024.pbtxt"

bazel build //deploy/local:moe_local //clients/cpp:moe_loadgen
source bench/start_cluster.sh
start_cluster "$config" "$dtype"
echo "cluster at $address ($dtype), batch $batch, $rounds rounds of 2 s per point"
results="$(mktemp)"
trap 'kill -INT $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -f "$cluster_log" "$results"' EXIT
for round in $(seq "$rounds"); do
  torch_line="$(/usr/bin/python3 bench/torch_moe.py --dtype="$dtype" --batch="$batch" --seconds=2)"
  echo "{\"round\": $round, \"torch\": $torch_line}" >>"$results"
  for clients in 1 2; do
    bazel-bin/clients/cpp/moe_loadgen --router="$address" --config="$config" --dtype="$dtype" \
        --concurrency="$clients" --batch="$batch" --duration=2s --json="$results.load" >/dev/null
    remote_line="$(/usr/bin/python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$results.load")"
    echo "{\"round\": $round, \"clients\": $clients, \"remote\": $remote_line}" >>"$results"
  done
  rm -f "$results.load"
done
/usr/bin/python3 - "$results" <<'EOF'
import json, statistics, sys
torch_rate, remote = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "torch" in r:
        torch_rate[r["round"]] = r["torch"]["tokens_per_second"]
    else:
        remote.setdefault(r["clients"], {})[r["round"]] = r["remote"][0]["tokens_per_second"]
print(f"PyTorch tokens/s (median of rounds): {statistics.median(torch_rate.values()):.0f}")
print("clients  remote tok/s  remote/PyTorch (spread)")
for clients, rates in sorted(remote.items()):
    ratios = [rates[r] / torch_rate[r] for r in rates]
    print(f"{clients:7d} {statistics.median(rates.values()):13.0f}  "
          f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
EOF
