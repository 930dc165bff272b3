#!/usr/bin/env bash
# Hugging Face checkpoints against PyTorch (Debian's python3-torch): the
# script writes tiny NLLB-MoE, Switch Transformers, Mixtral and Qwen2-MoE
# checkpoints and what
# their MoE blocks compute; the check loads them into a cluster and compares.
set -euo pipefail
script="$1"
check="$2"
out="${TEST_TMPDIR:-$(mktemp -d)}/hf"
/usr/bin/python3 "$script" "$out"
HF_CHECKPOINTS_DIR="$out" exec "$check"
