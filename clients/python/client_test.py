"""The Python client against a running cluster (started by
tests/python_client_test.cc): outputs equal a float64 numpy MoE layer built
from the cluster's checkpoint to 1e-5, training backward equals it too, and
bad input raises INVALID_ARGUMENT naming the problem; with SAVE (the
cluster has a --checkpoint_dir), a Step and a SaveCheckpoint of it.

Usage: client_test.py ROUTER CHECKPOINT TOP_K [SAVE]
"""

import json
import os
import struct
import sys

import grpc
import numpy as np

from moe_client import MoeClient


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = np.frombuffer(body[begin:end], dtype="<f4").astype(np.float64).reshape(
            entry["shape"])
    return out


def reference_forward(params, x, top_k, prefix=""):
    """y, and what backward needs (DROPLESS, ties to the lower id), of the
    layer whose tensors are named `prefix` + "gate.weight" and so on."""
    x = x.astype(np.float64)
    logits = x @ params[prefix + "gate.weight"].T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        p = probs[t, chosen[t]]
        w = p / p.sum()
        for j, e in enumerate(chosen[t]):
            expert = f"{prefix}experts.{e}"
            h = np.maximum(params[f"{expert}.w1.weight"] @ x[t] + params[f"{expert}.w1.bias"], 0)
            y[t] += w[j] * (params[f"{expert}.w2.weight"] @ h + params[f"{expert}.w2.bias"])
    return y, chosen


def relative_error(actual, expected):
    norm = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return diff / norm if norm > 0 else diff


def main():
    router, checkpoint, top_k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = read_safetensors(checkpoint)
    d_model = params["gate.weight"].shape[1]
    client = MoeClient(router)
    client.wait_until_healthy()
    rng = np.random.default_rng(1)
    failures = []
    for tokens in (0, 1, 7, 100):
        x = rng.uniform(-2, 2, (tokens, d_model)).astype(np.float32)
        result = client.forward(x, return_routing=True)
        expected, chosen = reference_forward(params, x, top_k)
        error = relative_error(result.y, expected)
        print(f"forward {tokens:4d} tokens: relative error {error:.2e}")
        if error > 1e-5:
            failures.append(f"forward {tokens} tokens: relative error {error:.2e}")
        if tokens and not np.array_equal(result.expert_ids, chosen):
            failures.append(f"forward {tokens} tokens: routing differs")

    # bf16 on the wire: bf16 answers, within bf16 rounding of the inputs.
    x = rng.uniform(-2, 2, (16, d_model)).astype(np.float32)
    y16 = client.forward(x, dtype="bf16").y
    error = relative_error(y16, reference_forward(params, x, top_k)[0])
    print(f"forward bf16: relative error {error:.2e}")
    if error > 2e-2:
        failures.append(f"bf16 forward: relative error {error:.2e}")

    # Several batches on one stream, one of them bad: each answered in its
    # place, the bad one with its error.
    batches = [rng.uniform(-2, 2, (n, d_model)).astype(np.float32) for n in (3, 40, 1)]
    batches.insert(2, np.zeros((2, d_model + 1), dtype=np.float32))
    streamed = client.forward_stream(batches, return_routing=True)
    for i, (x, result) in enumerate(zip(batches, streamed)):
        if i == 2:
            print(f"stream batch {i}: {result.error}")
            if result.error is None or result.error[0] != grpc.StatusCode.INVALID_ARGUMENT:
                failures.append(f"stream: the bad batch answered {result.error}")
            continue
        expected, chosen = reference_forward(params, x, top_k)
        error = relative_error(result.y, expected)
        print(f"stream batch {i} ({x.shape[0]} tokens): relative error {error:.2e}")
        if result.error is not None or error > 1e-5 or not np.array_equal(result.expert_ids,
                                                                          chosen):
            failures.append(f"stream batch {i}: {result.error}, relative error {error:.2e}")

    # The cluster as the router sees it.
    state = client.cluster_state()
    print(f"cluster: {len(state.servers)} servers, placement epoch {state.placement_epoch}, "
          f"step {state.step}, d_model {state.model.d_model}, top_k {state.model.top_k}")
    if state.model.d_model != d_model or state.model.top_k != top_k or not state.servers:
        failures.append(f"cluster_state: {state}")

    # Bad input is named, and the router keeps serving.
    try:
        client.forward(np.zeros((2, d_model + 1), dtype=np.float32))
        failures.append("a wrong d_model was accepted")
    except grpc.RpcError as e:
        print(f"bad input: {e.code().name}: {e.details()}")
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "d_model" not in e.details():
            failures.append(f"wrong d_model gave {e.code().name}: {e.details()}")
    client.forward(np.zeros((1, d_model), dtype=np.float32))

    # Training: backward returns dL/dx of the same layer (checked by central
    # differences of the numpy reference on a few coordinates).
    x = rng.uniform(-2, 2, (5, d_model)).astype(np.float32)
    dy = rng.uniform(-1, 1, (5, d_model)).astype(np.float32)
    result = client.forward(x, training=True)
    dx = client.backward(result.request_id, dy)
    step = 1e-4
    for t, i in ((0, 0), (2, 3), (4, d_model - 1)):
        plus, minus = x.astype(np.float64), x.astype(np.float64)
        plus[t, i] += step
        minus[t, i] -= step
        numeric = (np.sum(reference_forward(params, plus, top_k)[0] * dy) -
                   np.sum(reference_forward(params, minus, top_k)[0] * dy)) / (2 * step)
        print(f"backward dx[{t},{i}] = {dx[t, i]:.6f}, numeric {numeric:.6f}")
        if abs(dx[t, i] - numeric) > 1e-3 * max(1.0, abs(numeric)):
            failures.append(f"dx[{t},{i}] = {dx[t, i]} vs numeric {numeric}")

    # A training step, then a checkpoint of it (when the cluster has a
    # checkpoint directory): a Hugging Face sharded checkpoint of step 1
    # holding every tensor once, the gate moved by the step.
    if len(sys.argv) > 4:
        stepped = client.step(0.05)
        print(f"step {stepped.step}")
        if stepped.step != 1:
            failures.append(f"step answered {stepped.step}, expected 1")
        saved = client.save_checkpoint()
        print(f"checkpoint of step {saved.step}: {saved.directory} {list(saved.files)}")
        with open(os.path.join(saved.directory, "model.safetensors.index.json")) as f:
            index = json.load(f)
        if saved.step != 1 or index["metadata"]["step"] != "1":
            failures.append(f"checkpoint of step {saved.step} / {index['metadata']['step']}")
        if set(index["weight_map"]) != set(params):
            failures.append("the checkpoint's tensors differ from the model's")
        saved_params = {}
        for shard in saved.files:
            saved_params.update(read_safetensors(os.path.join(saved.directory, shard)))
        if set(saved_params) != set(params):
            failures.append("the shards do not hold every tensor once")
        elif np.array_equal(saved_params["gate.weight"], params["gate.weight"]):
            failures.append("the saved gate is the initial one")
    client.close()
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("python client: all checks passed")


if __name__ == "__main__":
    main()
