"""Writes tiny Hugging Face checkpoints of MoE models, and what PyTorch says
their MoE block computes, for tests/hf_checkpoint_test.

For each model, DIR/<model>/ gets a sharded checkpoint (model.safetensors.index.json
and two shards) in the model's exact tensor names and nn.Linear shapes,
next to other tensors of the model that the cluster must skip (an
embedding, attention weights, an integer buffer), in the dtypes real
checkpoints use; and DIR/<model>/expected.safetensors: x, grad_output, the
block's output y, dL/dx, the gradient of every tensor of the block, and each
tensor after one SGD step (lr 0.1), all in float64 from the checkpoint's
values. The blocks are written here from the models' published
definitions (transformers' modeling_nllb_moe.py NllbMoeSparseMLP with
NllbMoeTop2Router, modeling_switch_transformers.py SwitchTransformersSparseMLP
with SwitchTransformersTop1Router, modeling_mixtral.py MixtralSparseMoeBlock
with MixtralBlockSparseTop2MLP, modeling_qwen2_moe.py Qwen2MoeSparseMoeBlock
with norm_topk_prob = False and its shared expert, whose routed experts
OLMoE's OlmoeSparseMoeBlock shares), in eval mode, with no token dropped.

Usage: hf_checkpoints.py DIR
"""

import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

D_MODEL, D_FF, EXPERTS, TOKENS = 16, 24, 4, 37
# Qwen2-MoE's shared_expert_intermediate_size: two slices of D_FF.
D_SHARED = 2 * D_FF
LR = 0.1

DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": (None, 2), "I64": ("<i8", 8)}


def encode(array, dtype):
    if dtype == "BF16":
        bits = np.asarray(array, dtype="<f4").view(np.uint32)
        # Round to nearest even, as torch does.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    return np.asarray(array).astype(DTYPES[dtype][0]).tobytes()


def decode(raw, dtype, shape):
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    return np.frombuffer(raw, dtype=DTYPES[dtype][0]).astype(np.float64).reshape(shape)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, numpy array)."""
    header, data = {}, b""
    for name, (dtype, array) in tensors.items():
        raw = encode(array, dtype)
        header[name] = {"dtype": dtype, "shape": list(np.shape(array)),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def write_sharded(directory, shards):
    """shards: list of {name: (dtype, array)}; writes them and the index."""
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, file_name), tensors)
        weight_map.update({name: file_name for name in tensors})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def stored(shards, name):
    """The value a tensor has once stored in its dtype, as float64."""
    for tensors in shards:
        if name in tensors:
            dtype, array = tensors[name]
            return torch.from_numpy(decode(encode(array, dtype), dtype, np.shape(array)).copy())
    raise KeyError(name)


def nllb_block(p, params, x):
    """NllbMoeSparseMLP (top-2 router, second_expert_policy "all",
    normalize_router_prob_before_dropping False, nothing dropped)."""
    router_logits = F.linear(x, params[f"{p}.router.classifier.weight"])
    router_probs = torch.softmax(router_logits, dim=-1)
    top_1 = torch.argmax(router_probs, dim=-1)
    top_1_mask = F.one_hot(top_1, EXPERTS)
    logits_except_top_1 = router_logits.masked_fill(top_1_mask.bool(), float("-inf"))
    top_2 = torch.argmax(logits_except_top_1, dim=-1)
    top_1_p = torch.gather(router_probs, 1, top_1[:, None])[:, 0]
    top_2_p = torch.gather(router_probs, 1, top_2[:, None])[:, 0]
    denom = torch.clamp(top_1_p + top_2_p, min=torch.finfo(router_probs.dtype).eps)
    top_1_p, top_2_p = top_1_p / denom, top_2_p / denom

    def expert(e, h):  # NllbMoeDenseActDense: fc1, ReLU, dropout (eval), fc2
        m = f"{p}.experts.expert_{e}"
        h = F.relu(F.linear(h, params[f"{m}.fc1.weight"], params[f"{m}.fc1.bias"]))
        return F.linear(h, params[f"{m}.fc2.weight"], params[f"{m}.fc2.bias"])

    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        y[t] = top_1_p[t] * expert(int(top_1[t]), x[t]) + top_2_p[t] * expert(int(top_2[t]), x[t])
    return y


def switch_block(p, params, x):
    """SwitchTransformersSparseMLP (top-1 router without bias, capacity
    above the batch: nothing dropped)."""
    router_logits = F.linear(x, params[f"{p}.router.classifier.weight"])
    router_probs = torch.softmax(router_logits, dim=-1)
    expert_index = torch.argmax(router_probs, dim=-1)
    router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)

    def expert(e, h):  # SwitchTransformersDenseActDense: wi, ReLU, dropout, wo
        m = f"{p}.experts.expert_{e}"
        return F.linear(F.relu(F.linear(h, params[f"{m}.wi.weight"])), params[f"{m}.wo.weight"])

    next_states = x.clone()
    for e in range(EXPERTS):
        idx = expert_index == e
        if idx.any():
            next_states[idx] = expert(e, x[idx])
    return router_probs * next_states


def gated_block(p, params, x, top_k, renormalize, names):
    """MixtralSparseMoeBlock (renormalize) and Qwen2MoeSparseMoeBlock's
    routed experts (norm_topk_prob = False): softmax over every expert,
    top-k, experts act(w1 x) * (w3 x) then w2, with act SiLU. `names`: the
    model's w1, w3, w2."""
    router_logits = F.linear(x, params[f"{p}.gate.weight"])
    routing_weights = torch.softmax(router_logits, dim=1)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if renormalize:
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)

    def expert(e, h):
        m = f"{p}.experts.{e}"
        w1, w3, w2 = (params[f"{m}.{n}.weight"] for n in names)
        return F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)

    y = torch.zeros_like(x)
    for e in range(EXPERTS):
        token, k = torch.where(selected_experts == e)
        if len(token):
            y = y.index_add(0, token, expert(e, x[token]) * routing_weights[token, k, None])
    return y


def mixtral_block(p, params, x):
    return gated_block(p, params, x, 2, True, ("w1", "w3", "w2"))


def qwen2_moe_block(p, params, x):
    """Qwen2MoeSparseMoeBlock: the routed experts, plus the shared expert (a
    Qwen2MoeMLP) times sigmoid(shared_expert_gate(x))."""
    routed = gated_block(p, params, x, 2, False, ("gate_proj", "up_proj", "down_proj"))
    s = f"{p}.shared_expert"
    shared = F.linear(F.silu(F.linear(x, params[f"{s}.gate_proj.weight"])) *
                      F.linear(x, params[f"{s}.up_proj.weight"]), params[f"{s}.down_proj.weight"])
    return routed + torch.sigmoid(F.linear(x, params[f"{p}.shared_expert_gate.weight"])) * shared


def make(directory, name, prefix, block, expert_tensors, dtypes, seed, router="router.classifier",
         expert_module="experts.expert_", shared_tensors=()):
    rng = np.random.default_rng(seed)
    block_tensors = {f"{prefix}.{router}.weight": rng.normal(0, 0.5, (EXPERTS, D_MODEL))}
    for e in range(EXPERTS):
        for suffix, shape in expert_tensors.items():
            block_tensors[f"{prefix}.{expert_module}{e}.{suffix}"] = rng.normal(0, 0.3, shape)
    for suffix, shape in shared_tensors:  # in the second shard
        block_tensors[f"{prefix}.{suffix}"] = rng.normal(0, 0.3, shape)
    names = list(block_tensors)
    # Two shards: the router and the first experts, the rest with the
    # model's other tensors; each tensor in the dtype its model stores.
    half = 1 + 2 * len(expert_tensors)
    shards = [
        {n: (dtypes[0], block_tensors[n]) for n in names[:half]},
        {n: (dtypes[1], block_tensors[n]) for n in names[half:]},
    ]
    shards[0]["shared.weight"] = ("BF16", rng.normal(0, 1, (11, D_MODEL)))
    shards[1][f"{prefix}.self_attn.k_proj.weight"] = ("F32", rng.normal(0, 1, (D_MODEL, D_MODEL)))
    shards[1]["encoder.position_ids"] = ("I64", np.arange(8)[None, :])
    out = os.path.join(directory, name)
    write_sharded(out, shards)

    params = {n: stored(shards, n).requires_grad_(True) for n in names}
    x = torch.from_numpy(rng.normal(0, 1, (TOKENS, D_MODEL))).requires_grad_(True)
    dy = torch.from_numpy(rng.normal(0, 1, (TOKENS, D_MODEL)))
    y = block(prefix, params, x)
    y.backward(dy)
    expected = {"x": x.detach(), "grad_output": dy, "y": y.detach(), "grad_input": x.grad}
    for n, p in params.items():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        expected[f"grad {n}"] = grad
        expected[f"stepped {n}"] = p.detach() - LR * grad  # torch.optim.SGD, one step
    write_safetensors(os.path.join(out, "expected.safetensors"),
                      {n: ("F32", v.numpy()) for n, v in expected.items()})


def main():
    directory = sys.argv[1]
    torch.manual_seed(0)
    make(directory, "nllb_moe", "model.encoder.layers.3.ffn", nllb_block,
         {"fc1.weight": (D_FF, D_MODEL), "fc1.bias": (D_FF,), "fc2.weight": (D_MODEL, D_FF),
          "fc2.bias": (D_MODEL,)}, ("F32", "F16"), 1)
    make(directory, "switch_transformers", "encoder.block.1.layer.1.mlp", switch_block,
         {"wi.weight": (D_FF, D_MODEL), "wo.weight": (D_MODEL, D_FF)}, ("BF16", "F32"), 2)
    make(directory, "mixtral", "model.layers.1.block_sparse_moe", mixtral_block,
         {"w1.weight": (D_FF, D_MODEL), "w2.weight": (D_MODEL, D_FF), "w3.weight": (D_FF, D_MODEL)},
         ("BF16", "BF16"), 3, router="gate", expert_module="experts.")
    make(directory, "qwen2_moe", "model.layers.0.mlp", qwen2_moe_block,
         {"gate_proj.weight": (D_FF, D_MODEL), "up_proj.weight": (D_FF, D_MODEL),
          "down_proj.weight": (D_MODEL, D_FF)},
         ("F32", "BF16"), 4, router="gate", expert_module="experts.",
         shared_tensors=[("shared_expert.gate_proj.weight", (D_SHARED, D_MODEL)),
                         ("shared_expert.up_proj.weight", (D_SHARED, D_MODEL)),
                         ("shared_expert.down_proj.weight", (D_MODEL, D_SHARED)),
                         ("shared_expert_gate.weight", (1, D_MODEL))])
    print(f"wrote nllb_moe, switch_transformers, mixtral and qwen2_moe in {directory}")


if __name__ == "__main__":
    main()
