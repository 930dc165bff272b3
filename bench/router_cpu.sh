#!/usr/bin/env bash
# The router's CPU per token at each batch size, against what moving its
# bytes costs at gRPC's measured CPU per byte (STYLE.md 2.6: 1.76 CPU s/GB
# for both ends of a 4 MiB stream, completion-queue API; the router is one
# end of every transfer, taken as half: 0.88 s/GB): starts a local cluster
# of deploy/config/bench_1024.pbtxt (router + 2 expert servers) with
# moe_local --serve, then for each batch runs moe_loadgen (one client, a
# fixed number of requests, after as many unmeasured ones) and reads the
# router process's utime + stime from /proc before and after. Usage: bench/router_cpu.sh [fp32|bf16]
# Environment: CONFIG, ROUTER_FLAGS, CLIENT_DTYPE as bench/remote_vs_local.sh
# (with bf16 servers and fp32 clients the rows out go rounded to bf16 unless
# ROUTER_FLAGS turns --round_tokens_for_bf16_servers off).
set -euo pipefail
cd "$(dirname "$0")/.."
dtype="${1:-fp32}"
config="${CONFIG:-$PWD/deploy/config/bench_1024.pbtxt}"

bazel build //deploy/local:moe_local //clients/cpp:moe_loadgen
source bench/start_cluster.sh
start_cluster "$config" "$dtype" --router_flags="${ROUTER_FLAGS:-}"
router_pid=""
for pid in $(pgrep -P $cluster); do
  if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "router_service/router\b\|/router "; then
    router_pid=$pid
  fi
done
[[ -n "$router_pid" ]] || { echo "no router process under moe_local $cluster"; exit 1; }
d_model="$(grep -o 'd_model: *[0-9]*' "$config" | grep -o '[0-9]*$')"
top_k="$(grep -o 'top_k: *[0-9]*' "$config" | grep -o '[0-9]*$')"
client_dtype="${CLIENT_DTYPE:-$dtype}"
# Bytes per element: to and from the client, rows out, answers back.
client_e=4; [[ "$client_dtype" == bf16 ]] && client_e=2
answer_e=4; [[ "$dtype" == bf16 || "$client_dtype" == bf16 ]] && answer_e=2
rows_e=$client_e
[[ "$dtype" == bf16 && "${ROUTER_FLAGS:-}" != *round_tokens_for_bf16_servers=false* ]] && rows_e=2
ticks="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$router_pid/stat"; }

echo "router $address (pid $router_pid), $dtype servers, $client_dtype client, d_model $d_model, top_k $top_k, one client"
printf "%6s %9s %14s %12s %16s %12s\n" batch requests "router us/tok" "wire KB/tok" "its end us/tok" "wire share"
for pair in 1:3000 64:400 512:80 4096:12; do
  batch="${pair%%:*}"
  requests="${pair##*:}"
  # Unmeasured first: the router's heap grows to its high-water mark over
  # its first large requests (fresh pages, zero-filled by the kernel, were a
  # quarter of its cycles in a 12-request run at batch 4096).
  bazel-bin/clients/cpp/moe_loadgen --router="$address" --config="$config" --dtype="$client_dtype" \
      --concurrency=1 --batch="$batch" --requests="$requests" --rounds=1 >/dev/null
  before="$(cpu_ticks)"
  bazel-bin/clients/cpp/moe_loadgen --router="$address" --config="$config" --dtype="$client_dtype" \
      --concurrency=1 --batch="$batch" --requests="$requests" --rounds=1 >/dev/null
  after="$(cpu_ticks)"
  # Bytes through the router per token: the token in and out (client), and
  # top_k rows out and back (servers).
  awk -v t=$((after - before)) -v hz="$ticks" -v n=$((batch * requests)) -v d="$d_model" \
      -v k="$top_k" -v ce="$client_e" -v re="$rows_e" -v ae="$answer_e" -v b="$batch" \
      -v r="$requests" 'BEGIN {
    us = t / hz / n * 1e6; bytes = (2 * ce + k * re + k * ae) * d; wire = bytes * 0.88e-9 * 1e6;
    printf "%6d %9d %14.1f %12.1f %16.1f %11.0f%%\n", b, r, us, bytes / 1024, wire, 100 * wire / us }'
done
