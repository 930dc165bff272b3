#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (--config=fuzz, in its own output
# base so the gcc build's cache stays warm) and runs each for SECONDS
# (default 30) on a copy of its seed corpus, printing executions and
# coverage. A crash stops the run and leaves the input in $WORK.
# The mutation seed is FUZZ_SEED (default 1, so CI explores the same inputs
# a developer can replay; 0 picks a random one for exploratory runs).
#   tests/fuzz/run_fuzzers.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-30}"
seed="${FUZZ_SEED:-1}"
targets=(tensor_codec ring_segment weight_chunks config safetensors checkpoint_index dispatch
  dispatch_answer)
output_base="${FUZZ_OUTPUT_BASE:-$HOME/.cache/moe-serve-fuzz}"

bazel --output_base="$output_base" build --config=fuzz \
  $(printf '//tests/fuzz:%s_fuzzer ' "${targets[@]}")
bin="$(bazel --output_base="$output_base" info --config=fuzz bazel-bin)/tests/fuzz"
work="$(mktemp -d /tmp/moe-fuzz.XXXXXX)"
echo "fuzzing ${#targets[@]} targets for ${seconds}s each; corpora and crashes in $work"
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  cp tests/fuzz/corpus/"$target"/* "$work/$target/"
  log="$work/$target.log"
  if ! "$bin/${target}_fuzzer" -max_total_time="$seconds" -seed="$seed" -rss_limit_mb=2048 \
      -artifact_prefix="$work/$target-" "$work/$target" >"$log" 2>&1; then
    tail -40 "$log"
    echo "FUZZ FAILURE in $target (input saved under $work/$target-*)"
    exit 1
  fi
  # libFuzzer's last status line: total runs, coverage, features, corpus.
  summary="$(grep -E '^#[0-9]+' "$log" | tail -1)"
  echo "$target: $summary"
done
echo "fuzzing passed"
