#!/usr/bin/env bash
# The README's test command: installs what is missing, then builds and runs
# every test offline, first optimized, then under AddressSanitizer and
# UndefinedBehaviorSanitizer. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup_debian.sh

echo "== bazel test //... (optimized)"
bazel test //...

echo "== bazel test --config=asan //... (AddressSanitizer + UBSan)"
bazel test --config=asan //...

# Every parser of hostile input under libFuzzer (clang, its own output
# base), 30 s per target here; tests/fuzz/run_fuzzers.sh 600 fuzzes longer.
echo "== libFuzzer: tests/fuzz/run_fuzzers.sh 30"
tests/fuzz/run_fuzzers.sh 30

echo "all tests passed"
