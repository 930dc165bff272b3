"""The Python client against a cluster serving several MoE layers (started by
tests/python_client_test.cc): example.py's layer-by-layer forward pass
equals a float64 numpy model built from the cluster's checkpoint (each layer
its own "layers.{l}." tensors) to 1e-5 with identical routing; one
ForwardStream carrying batches for every layer answers each from its own
layer; a layer the model does not have is INVALID_ARGUMENT.

Usage: layers_test.py ROUTER CHECKPOINT TOP_K
"""

import sys

import grpc
import numpy as np

from client_test import read_safetensors, reference_forward, relative_error
from example import run_layers
from moe_client import MoeClient


def prefix(layer):
    return "" if layer == 0 else f"layers.{layer}."


def main():
    router, checkpoint, top_k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = read_safetensors(checkpoint)
    client = MoeClient(router)
    client.wait_until_healthy()
    model = client.cluster_state().model
    layers, d_model = model.num_layers, model.d_model
    print(f"model: {layers} layers, d_model {d_model}")
    failures = []
    if layers < 2 or f"layers.{layers - 1}.gate.weight" not in params:
        failures.append(f"the cluster serves {layers} layer(s), the checkpoint does not match")
    rng = np.random.default_rng(3)

    # The residual stream through every layer, as example.py runs it.
    x = rng.uniform(-2, 2, (9, d_model)).astype(np.float32)
    h, results = run_layers(client, x, layers)
    expected = x.astype(np.float64)
    for layer in range(layers):
        # Each layer's input is what the cluster's previous layers made.
        layer_input = x if layer == 0 else (x + sum(r.y for r in results[:layer]))
        y, chosen = reference_forward(params, layer_input, top_k, prefix(layer))
        error = relative_error(results[layer].y, y)
        print(f"layer {layer}: relative error {error:.2e}")
        if error > 1e-5 or not np.array_equal(results[layer].expert_ids, chosen):
            failures.append(f"layer {layer}: relative error {error:.2e}, or routing differs")
        expected = expected + y
    error = relative_error(h, expected)
    print(f"whole model: relative error {error:.2e}")
    if error > 1e-5:
        failures.append(f"whole model: relative error {error:.2e}")

    # One stream, the layers interleaved: each batch its own layer's answer.
    batches = [rng.uniform(-2, 2, (n, d_model)).astype(np.float32) for n in (4, 11, 2, 7, 5, 3)]
    batch_layers = [b % layers for b in range(len(batches))]
    streamed = client.forward_stream(batches, return_routing=True, layers=batch_layers)
    for b, (x, layer, result) in enumerate(zip(batches, batch_layers, streamed)):
        y, chosen = reference_forward(params, x, top_k, prefix(layer))
        error = relative_error(result.y, y) if result.error is None else float("inf")
        print(f"stream batch {b} (layer {layer}): relative error {error:.2e}")
        if error > 1e-5 or not np.array_equal(result.expert_ids, chosen):
            failures.append(f"stream batch {b} (layer {layer}): {result.error}, error {error:.2e}")

    try:
        client.forward(np.zeros((1, d_model), dtype=np.float32), layer=layers)
        failures.append(f"layer {layers} was accepted")
    except grpc.RpcError as e:
        print(f"layer {layers}: {e.code().name}: {e.details()}")
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or f"layer {layers}" not in e.details():
            failures.append(f"layer {layers} gave {e.code().name}: {e.details()}")
    client.close()
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("python client, layers: all checks passed")


if __name__ == "__main__":
    main()
