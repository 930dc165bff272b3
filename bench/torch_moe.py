#!/usr/bin/python3
"""The same MoE layer in PyTorch, in this process: a yardstick for the cluster.

An MoE layer of the bench_1024 shape (d_model 1024, d_ff 4096, 8 ReLU experts
with biases, top-2, softmax gate renormalised over the chosen two, as
docs/reference.md), written as the Hugging Face models run their experts
(Mixtral's, NLLB-MoE's loop: per expert, index its tokens, run the expert,
index_add its weighted rows back). Its tokens, weights and outputs are in
`--dtype`; the gate runs in fp32 as the router's does. The weights are
random at the cluster's init scale: the time a layer takes depends on the
shape and on how evenly tokens spread over the experts, not on the values,
and random tokens through a random gate spread as evenly as the cluster's.

Runs the layer back to back for `--seconds` and prints one JSON line:
{"tokens_per_second": ..., "latency_p50_s": ..., "threads": ...}.
Needs Debian's python3-torch (run with /usr/bin/python3).
"""
import argparse
import json
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--d_ff", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads; 0: torch's default (every core)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    generator = torch.Generator().manual_seed(42)

    def uniform(shape, bound, out_dtype=dtype):
        return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(out_dtype)

    d, f, e = args.d_model, args.d_ff, args.experts
    gate = uniform((d, e), d ** -0.5, torch.float32)
    w1 = [uniform((d, f), d ** -0.5) for _ in range(e)]
    b1 = [uniform((f,), d ** -0.5) for _ in range(e)]
    w2 = [uniform((f, d), f ** -0.5) for _ in range(e)]
    b2 = [uniform((d,), f ** -0.5) for _ in range(e)]
    x = uniform((args.batch, d), 1.0)

    def layer(x):
        probs = torch.softmax(x.float() @ gate, dim=-1)
        weights, chosen = torch.topk(probs, args.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(dtype)
        out = torch.zeros_like(x)
        for expert in range(e):
            token, slot = torch.where(chosen == expert)
            if token.numel() == 0:
                continue
            h = torch.relu(torch.addmm(b1[expert], x[token], w1[expert]))
            y = torch.addmm(b2[expert], h, w2[expert])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    with torch.no_grad():
        layer(x)  # warm up: allocations, kernels' first calls
        latencies = []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or len(latencies) < 3:
            t = time.perf_counter()
            layer(x)
            latencies.append(time.perf_counter() - t)
        seconds = time.perf_counter() - start
    latencies.sort()
    print(json.dumps({
        "tokens_per_second": len(latencies) * args.batch / seconds,
        "latency_p50_s": latencies[(len(latencies) - 1) // 2],
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
    }))


if __name__ == "__main__":
    main()
