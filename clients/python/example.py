"""Runs a tiny model through a moe-serve router: random tokens go through
each of the cluster's MoE layers in turn, as a transformer's residual stream
would (h = h + MoE_l(h)), and what came back is printed.

  bazel build //proto:py_protos
  PYTHONPATH=bazel-bin:clients/python /usr/bin/python3 clients/python/example.py \\
      --router=127.0.0.1:50051

(`moe_local --layers=4 --serve` starts a cluster of four layers to run it
against.)
"""

import argparse

import numpy as np

from moe_client import MoeClient


def run_layers(client, x, num_layers):
    """The residual stream through layers 0 .. num_layers - 1 of the cluster:
    h = h + MoE_l(h). Returns h and each layer's ForwardResult."""
    h = x.astype(np.float32)
    results = []
    for layer in range(num_layers):
        result = client.forward(h, return_routing=True, layer=layer)
        h = h + result.y
        results.append(result)
    return h, results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="127.0.0.1:50051", help="router host:port")
    parser.add_argument("--tokens", type=int, default=8, help="tokens to send")
    args = parser.parse_args()

    client = MoeClient(args.router)
    client.wait_until_healthy()
    model = client.cluster_state().model
    num_layers = max(1, model.num_layers)
    print(f"model: {num_layers} MoE layer(s) of {model.num_experts} experts, "
          f"d_model {model.d_model}, top_k {model.top_k}")
    x = np.random.default_rng(0).uniform(-1, 1, (args.tokens, model.d_model)).astype(np.float32)
    h, results = run_layers(client, x, num_layers)
    for layer, result in enumerate(results):
        chosen = ", ".join(f"expert {e} ({w:.3f})"
                           for e, w in zip(result.expert_ids[0], result.weights[0]))
        print(f"layer {layer}: rms of its output {np.sqrt(np.mean(result.y ** 2)):.6f}; "
              f"token 0 went to {chosen}")
    print(f"h: shape {h.shape}, rms {np.sqrt(np.mean(h ** 2)):.6f}")
    client.close()


if __name__ == "__main__":
    main()
