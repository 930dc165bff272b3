#!/usr/bin/env bash
# The README's first command: installs what is missing, builds optimized, and
# runs a moe-serve cluster on this machine (router + expert servers as
# separate processes on loopback), puts a load through it and prints a
# summary. Extra arguments go to moe_local (--help; --serve keeps it up).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup_debian.sh
bazel build //deploy/local:moe_local
exec bazel-bin/deploy/local/moe_local "$@"
