#!/usr/bin/env bash
# The README's first command: installs what is missing, builds optimized, and
# runs the main job. Until the router and expert servers land, that is the
# in-process reference MoE layer on deploy/config/local.pbtxt, with a summary
# of routing, load and speed. Extra arguments go to moe_reference (--help).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup_debian.sh
bazel build //deploy/local:moe_reference
exec bazel-bin/deploy/local/moe_reference --config="$PWD/deploy/config/local.pbtxt" "$@"
