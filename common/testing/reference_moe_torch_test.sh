#!/usr/bin/env bash
# The reference MoE layer against PyTorch autograd (Debian's python3-torch),
# over several routing configurations. See reference_moe_torch.py.
set -euo pipefail

golden="$1"
script="$2"
out="${TEST_TMPDIR:-$(mktemp -d)}"

run_case() {  # name top_k capacity_factor extra-flags...
  local name="$1" top_k="$2" capacity="$3"
  shift 3
  local dir="$out/$name"
  mkdir -p "$dir"
  # AdamW from top_k 2 on: with top_k 1 the gate's gradient is zero in exact
  # arithmetic, and AdamW's normalisation turns its rounding noise into a
  # full step in either implementation.
  local steps=3
  [ "$top_k" -gt 1 ] || steps=0
  echo "== $name"
  "$golden" --out_dir="$dir" --top_k="$top_k" --capacity_factor="$capacity" \
    --adamw_steps="$steps" "$@"
  /usr/bin/python3 "$script" "$dir" "$top_k" "$capacity" "$steps"
}

run_case top1 1 0 --num_experts=4 --tokens=33
run_case top2 2 0 --num_experts=8 --tokens=64 --seed=3
run_case top2_drop 2 0.75 --num_experts=4 --tokens=40 --seed=5
run_case top3_wide 3 0 --num_experts=6 --tokens=17 --d_model=64 --d_ff=96 --seed=7
run_case one_token 2 0 --num_experts=4 --tokens=1 --seed=9
# Gates as the models define them: Switch's top-1 and Qwen2-MoE / OLMoE
# (norm_topk_prob = false) take the probabilities as they are; DeepSeek-V2
# chooses among its best groups and scales.
run_case switch_top1 1 0 --num_experts=4 --tokens=33 --seed=11 --renormalize=false
run_case qwen2_moe_top4 4 0 --num_experts=8 --tokens=40 --seed=13 --renormalize=false
run_case deepseek_groups 2 0 --num_experts=8 --tokens=48 --seed=15 --renormalize=false \
  --num_groups=4 --top_groups=2 --scaling_factor=16
run_case groups_renormalised 3 0.75 --num_experts=8 --tokens=40 --seed=17 --num_groups=2 \
  --top_groups=1
# Trained with the load-balancing and z losses (Mixtral's 0.02 and Switch's
# 0.001 are small: larger weights make their gradients show).
run_case mixtral_aux_z 2 0 --num_experts=8 --tokens=64 --seed=19 --aux_loss_coef=0.5 \
  --z_loss_coef=0.1
run_case switch_aux_z 1 0 --num_experts=4 --tokens=33 --seed=21 --renormalize=false \
  --aux_loss_coef=0.5 --z_loss_coef=0.1
run_case bf16_checkpoint 2 1.0 --num_experts=4 --tokens=50 --bf16_checkpoint --seed=13
echo "all cases agree with PyTorch"
