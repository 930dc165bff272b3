"""Sends random tokens to a moe-serve router and prints what came back.

  bazel build //proto:py_protos
  PYTHONPATH=bazel-bin:clients/python /usr/bin/python3 clients/python/example.py \
      --router=127.0.0.1:50051 --d_model=256
"""

import argparse

import numpy as np

from moe_client import MoeClient


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="127.0.0.1:50051", help="router host:port")
    parser.add_argument("--d_model", type=int, default=256, help="the model's width")
    parser.add_argument("--tokens", type=int, default=8, help="tokens to send")
    args = parser.parse_args()

    client = MoeClient(args.router)
    client.wait_until_healthy()
    x = np.random.default_rng(0).uniform(-1, 1, (args.tokens, args.d_model)).astype(np.float32)
    result = client.forward(x, return_routing=True)
    print(f"y: shape {result.y.shape}, rms {np.sqrt(np.mean(result.y ** 2)):.6f}")
    for t in range(min(args.tokens, 4)):
        chosen = ", ".join(f"expert {e} ({w:.3f})"
                           for e, w in zip(result.expert_ids[t], result.weights[t]))
        print(f"token {t}: {chosen}")
    print(f"dropped pairs: {result.dropped_pairs}")


if __name__ == "__main__":
    main()
