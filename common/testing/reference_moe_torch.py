"""Checks the reference MoE layer against PyTorch autograd.

Reads what reference_golden wrote (checkpoint, inputs, the reference's
outputs and gradients), recomputes forward and backward in float64 with
torch.autograd from the checkpoint alone, the PyTorch way (nn.Linear layout:
F.linear(x, W, b) = x W^T + b), and compares: routing exactly, every tensor
to a relative error ||a - b|| / ||b|| <= 1e-5.

With adamw.safetensors in DIR (reference_golden --adamw_steps=N), also
N steps of torch.optim.AdamW with clip_grad_norm_ against the shared
optimizer's.

The gate variant comes from DIR/gate.json and is computed as the Hugging
Face models do: Mixtral renormalises the top-k probabilities, Switch
Transformers' top-1 and Qwen2-MoE/OLMoE with norm_topk_prob = False take
them as they are, DeepSeek-V2's group_limited_greedy masks every group but
the topk_group ones with the best maximum score and scales the weights by
routed_scaling_factor.

Usage: reference_moe_torch.py DIR TOP_K CAPACITY_FACTOR [ADAMW_STEPS]
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 1e-5


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = body[begin:end]
        if entry["dtype"] == "F32":
            values = np.frombuffer(raw, dtype="<f4")
        elif entry["dtype"] == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{name}: unexpected dtype {entry['dtype']}")
        tensors[name] = torch.from_numpy(values.astype(np.float64).reshape(entry["shape"]))
    return tensors


def relative_error(actual, expected):
    diff = torch.linalg.norm((actual - expected).flatten()).item()
    norm = torch.linalg.norm(expected.flatten()).item()
    # A gradient that is zero in exact arithmetic (the gate's with top_k = 1)
    # is compared absolutely: its computed norm is rounding noise.
    return diff / norm if norm > 1e-12 else diff


def main():
    directory, top_k, capacity_factor = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    params = read_safetensors(f"{directory}/model.safetensors")
    io = read_safetensors(f"{directory}/io.safetensors")
    ours_grads = read_safetensors(f"{directory}/grads.safetensors")
    num_experts, d_model = params["gate.weight"].shape
    for p in params.values():
        p.requires_grad_(True)
    x = io["x"].clone().requires_grad_(True)
    tokens = x.shape[0]

    gate = {"renormalize": True, "num_groups": 0, "top_groups": 0, "scaling_factor": 1.0,
            "aux_loss_coef": 0.0, "z_loss_coef": 0.0}
    if os.path.exists(f"{directory}/gate.json"):
        with open(f"{directory}/gate.json") as f:
            gate.update(json.load(f))

    logits = F.linear(x, params["gate.weight"])
    probs = torch.softmax(logits, dim=-1)
    scores = probs.detach()
    if gate["num_groups"] > 0:
        # modeling_deepseek.py, topk_method == "group_limited_greedy".
        group_scores = scores.view(tokens, gate["num_groups"], -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=gate["top_groups"], dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(
            tokens, gate["num_groups"], num_experts // gate["num_groups"]).reshape(tokens, -1)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    # Top-k, largest first (the stable sort keeps the lower expert id first
    # on ties, as ours does).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    chosen = order[:, :top_k]
    chosen_probs = torch.gather(probs, 1, chosen)
    if gate["renormalize"]:
        weights = chosen_probs / chosen_probs.sum(dim=-1, keepdim=True)
    else:
        weights = chosen_probs
    weights = weights * gate["scaling_factor"]

    # Capacity: rank by rank, tokens in order within a rank.
    dropped = torch.zeros(tokens, top_k, dtype=torch.bool)
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * tokens * top_k / num_experts)
        counts = [0] * num_experts
        for j in range(top_k):
            for t in range(tokens):
                e = int(chosen[t, j])
                if counts[e] >= capacity:
                    dropped[t, j] = True
                else:
                    counts[e] += 1

    failures = []
    if not torch.equal(chosen.double(), io["expert_ids"]):
        failures.append("routing: chosen experts differ")
    if not torch.equal(dropped.double(), io["dropped"]):
        failures.append("routing: dropped pairs differ")

    y = torch.zeros(tokens, d_model, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            if dropped[t, j]:
                continue
            e = int(chosen[t, j])
            hidden = F.relu(F.linear(x[t], params[f"experts.{e}.w1.weight"],
                                     params[f"experts.{e}.w1.bias"]))
            out = F.linear(hidden, params[f"experts.{e}.w2.weight"], params[f"experts.{e}.w2.bias"])
            y[t] = y[t] + weights[t, j] * out
    # The losses real models train their gates with: Mixtral's
    # load_balancing_loss_func (its top_k over the probabilities; Switch's
    # for top_k 1) and Switch's router_z_loss_func, weighted in the loss.
    expert_mask = F.one_hot(chosen, num_experts).double()
    tokens_per_expert = torch.mean(expert_mask, dim=0)
    router_prob_per_expert = torch.mean(probs, dim=0)
    aux_loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts
    z_loss = torch.sum(torch.logsumexp(logits, dim=-1) ** 2) / tokens
    loss = (torch.sum(y * io["grad_output"]) + gate["aux_loss_coef"] * aux_loss +
            gate["z_loss_coef"] * z_loss)
    loss.backward()

    checks = [("y", y.detach(), io["y"]), ("grad_input", x.grad, io["grad_input"]),
              ("routing weights", weights.detach(), io["weights"])]
    if "losses" in io:
        checks.append(("aux_loss, z_loss",
                       torch.stack([aux_loss.detach(), z_loss.detach()]), io["losses"]))
    checks += [(f"grad {name}", p.grad if p.grad is not None else torch.zeros_like(p),
                ours_grads[name]) for name, p in params.items()]
    # The optimizer: torch.optim.AdamW (lr 0.01) with clip_grad_norm_ (1.0),
    # N steps in float32 (as a float32 model trains) with our gradients each
    # step (checked against torch's above; AdamW's normalisation would turn
    # a tiny gradient's rounding into a sign), against ours; compared by the
    # change of each tensor (the weights themselves would hide it).
    if os.path.exists(f"{directory}/adamw.safetensors"):
        ours_stepped = read_safetensors(f"{directory}/adamw.safetensors")
        steps = int(sys.argv[4])
        start = {name: p.detach().float() for name, p in params.items()}
        moved = {name: p.detach().float().requires_grad_(True) for name, p in params.items()}
        grad_of = {name: ours_grads[name].float() for name in params}
        optimizer = torch.optim.AdamW(list(moved.values()), lr=0.01)
        for _ in range(steps):
            for name, p in moved.items():
                p.grad = grad_of[name].clone()
            torch.nn.utils.clip_grad_norm_(list(moved.values()), 1.0)
            optimizer.step()
        checks += [(f"adamw x{steps} change {name}", (moved[name].detach() - start[name]).double(),
                    (ours_stepped[name].float() - start[name]).double()) for name in params]
    for name, torch_value, ours in checks:
        error = relative_error(ours, torch_value)
        status = "ok" if error <= TOLERANCE else "FAIL"
        print(f"{status:4} {name:28} relative error {error:.3e}")
        if error > TOLERANCE:
            failures.append(f"{name}: relative error {error:.3e} > {TOLERANCE}")
    print(f"tokens {tokens}, experts {num_experts}, top_k {top_k}, "
          f"dropped {int(dropped.sum())}, gate {gate}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
