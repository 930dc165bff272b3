"""A scaling model of a moe-serve cluster (docs/performance.md).

No machine here has more than 2 cores, so what a cluster of 1-64 expert
servers and 1-8 routers does is predicted, not run. The model is analytic
with one queueing step:

  * An expert call on rows r of an expert whose fp32 (or bf16) weights are
    W bytes costs  t = flops(r) / F  +  W / BW  : the kernel computes, and
    streams the weights from DRAM, one after the other (at ~21 rows per
    expert a request reads every weight once; the measured S = 1 point fits
    this sum, not the max). F is the server's kernel rate on its cores, BW
    its share of the machine's DRAM bandwidth while every server streams
    (the measured aggregate read bandwidth of 2S cores, divided by S).
  * A server's demand per request is the sum over the experts it hosts;
    with MODEL_PARALLEL every request visits every server at once (a
    fork-join whose servers are equally loaded), so the servers act as one
    station of that demand.
  * The router is a station of its measured CPU per request (per token
    times tokens) on its cores (Seidmann's approximation of a multi-core
    station: a queue of demand D / m plus a delay of D (m - 1) / m); R
    routers split the requests.
  * Closed-loop clients (C in flight, no think time), solved by exact mean
    value analysis: throughput X(C) and latency C / X.
  * The ring all-reduce of R replicas moves 2 (R - 1) / R of the gradient
    bytes per replica over links of the gRPC stream bandwidth measured in
    STYLE.md 2.6, plus 2 (R - 1) hops of one round trip each.

Calibration (every figure below names where it was measured):
  16-core machine (../shared/measurements/scaling-16core.md): DRAM read
  bandwidth per thread count (a power law through its membw table); the
  router's CPU per 512-token request (33 ms); the kernel rate F, fitted from
  the S = 1 point (the only fitted number). This machine (2 cores, where
  every process shares the cores): the kernel's time per call and the
  router's CPU per token from bench/, gRPC's CPU per byte from STYLE.md 2.6;
  nothing fitted.

Usage: scaling_model.py            predictions for 1-64 servers, 1-8 routers
       scaling_model.py --validate against this machine's and the 16-core
                                   measurements; exits 1 when a prediction
                                   is off by more than 20%
       scaling_model.py --placement_before=... --placement_after=... --shares=...
                                   a Rebalance's two placements
                                   (bench:migration_benchmark prints them)
                                   with a server per 2 cores
"""

import argparse
import math
import sys

# ../shared/measurements/scaling-16core.md, "Machine": aggregate DRAM read
# GB/s by streaming threads, run 1 and run 2.
MEMBW_16CORE = {1: (13.7, 14.3), 2: (23.0, 24.2), 4: (42.6, 47.4), 8: (64.5, 56.9),
                12: (86.8, 114.5), 16: (104.4, 124.7)}

# Its "Scaling with S (fp32)" table: S -> (clients, measured tokens/s runs).
MEASURED_16CORE = {1: (4, [3496, 3613]), 2: (4, [6586, 6730]), 3: (6, [8995]),
                   4: (8, [10950, 13242]), 6: (12, [14671, 13961])}
# Its bf16 variant at S = 6 (weights and wire bf16), C = 12.
MEASURED_16CORE_BF16_S6 = [27218, 28388]
# The router's CPU per 512-token request, "router cores (CPU ms per
# request)": 31-35 ms at every S; bf16 at S = 6: 1.67-1.71 cores at
# ~54 requests/s, 31 ms.
ROUTER_CPU_MS_PER_REQUEST_16CORE = 33.0

# STYLE.md 2.6: one loopback gRPC stream, completion-queue API, 4 MiB
# messages: 946 MB/s; ping-pong p50 76 us.
LINK_BYTES_PER_S = 946e6
LINK_ROUND_TRIP_S = 76e-6


def power_law(table):
    """BW(n) = a n^b fitted (least squares in log-log) to every run of
    {threads: (GB/s, ...)}: the measured table is noisy (87 and 115 GB/s
    for 12 threads in two runs), so the model reads a smooth curve through
    it rather than its points."""
    points = [(math.log(n), math.log(v)) for n, runs in table.items() for v in runs]
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    b = (sum((x - mx) * (y - my) for x, y in points) /
         sum((x - mx) ** 2 for x, _ in points))
    a = math.exp(my - b * mx)
    return lambda n: a * n ** b


class Model:
    def __init__(self, d_model=1024, d_ff=4096, experts=48, top_k=2, dtype_bytes=4,
                 gated=False):
        self.d_model, self.d_ff, self.experts, self.top_k = d_model, d_ff, experts, top_k
        self.dtype_bytes, self.gated = dtype_bytes, gated

    def matrices(self):
        return 3 if self.gated else 2

    def expert_weight_bytes(self):
        return self.matrices() * self.d_model * self.d_ff * self.dtype_bytes

    def flops(self, rows):
        return 2 * self.matrices() * rows * self.d_model * self.d_ff


class Machine:
    """kernel_gflops: one server's kernel rate by dtype bytes (4: fp32,
    2: bf16) on its cores; membw(threads): aggregate DRAM GB/s."""

    def __init__(self, kernel_gflops, membw, router_cpu_s_per_token, cores_per_server=2,
                 router_cores=2, servers_per_machine=6):
        self.kernel_gflops, self.membw = kernel_gflops, membw
        self.router_cpu_s_per_token = router_cpu_s_per_token
        self.cores_per_server, self.router_cores = cores_per_server, router_cores
        # Beyond this, servers are on more machines of the same kind (the
        # measured layout: 6 servers, the router and the clients on 16
        # cores), each with its own DRAM.
        self.servers_per_machine = servers_per_machine


def server_demand(model, machine, servers, batch):
    """Seconds one server spends on one request (MODEL_PARALLEL)."""
    rows = batch * model.top_k / model.experts
    neighbours = min(servers, machine.servers_per_machine)
    per_server_bw = machine.membw(neighbours * machine.cores_per_server) / neighbours
    per_expert = (model.flops(rows) / (machine.kernel_gflops[model.dtype_bytes] * 1e9) +
                  model.expert_weight_bytes() / (per_server_bw * 1e9))
    return model.experts / servers * per_expert


def mva(stations, clients):
    """Exact MVA, closed network, no think time. stations: list of
    (demand seconds, is_queue). Returns (throughput/s, response s)."""
    queue = [0.0] * len(stations)
    x = r = 0.0
    for n in range(1, clients + 1):
        times = [d * (1 + q) if is_queue else d for (d, is_queue), q in zip(stations, queue)]
        r = sum(times)
        x = n / r
        queue = [x * t for t in times]
    return x, r


def predict(model, machine, servers, clients, batch=512, routers=1):
    """(tokens/s, latency s, which resource is the bottleneck)."""
    d_server = server_demand(model, machine, servers, batch)
    d_router = machine.router_cpu_s_per_token * batch / routers
    m = machine.router_cores
    stations = [(d_server, True), (d_router / m, True), (d_router * (m - 1) / m, False)]
    x, r = mva(stations, clients)
    bottleneck = "servers" if d_server >= d_router / m else "router"
    return x * batch, r, bottleneck


def allreduce_seconds(model, replicas, experts_in_group=1):
    """One ring all-reduce of fp32 gradients of a replica group."""
    if replicas < 2:
        return 0.0
    grad_bytes = experts_in_group * (model.matrices() * model.d_model * model.d_ff +
                                     model.d_model + model.d_ff) * 4
    return (2 * (replicas - 1) / replicas * grad_bytes / LINK_BYTES_PER_S +
            2 * (replicas - 1) * LINK_ROUND_TRIP_S)


def sixteen_core(kernel_gflops_fp32):
    # bf16 computes at twice fp32's rate (measured 2.01x at M = 4096 by
    # bench:expert_kernel_benchmark on this machine's native-bf16 cores).
    return Machine({4: kernel_gflops_fp32, 2: 2 * kernel_gflops_fp32}, power_law(MEMBW_16CORE),
                   ROUTER_CPU_MS_PER_REQUEST_16CORE / 1e3 / 512)


def fit_kernel_rate():
    """F from the S = 1 point: t_expert = flops / F + W / BW(2 threads)."""
    model = Model()
    clients, runs = MEASURED_16CORE[1]
    # Closed loop at C = 4 on one saturated server: X = 1 / D_server
    # (the router is far from saturated), so D_server = 512 / tokens/s.
    d_server = 512 / (sum(runs) / len(runs))
    per_expert = d_server / model.experts
    memory = model.expert_weight_bytes() / (power_law(MEMBW_16CORE)(2) * 1e9)
    return model.flops(512 * 2 / 48) / (per_expert - memory) / 1e9


# This machine (2 cores, AMD EPYC, 32 MiB L3), 2026-11-30:
#   moe_local --strategy=MODEL_PARALLEL --experts=8 --d_model=1024 --d_ff=4096
#     --capacity_factor=0 --batch=512 --concurrency=4 --duration=8s
#     --train_steps=0 --servers=S
# (every server: 1 compute thread, 1 oneDNN thread; all processes share the
# 2 cores). S -> tokens/s.
MEASURED_HERE = {1: 3041, 2: 5338, 3: 5288}
# Inputs measured separately on this machine: one expert call of 128 rows
# (512 tokens x top-2 / 8 experts), fp32, on one core:
#   taskset -c 0 expert_kernel_benchmark --benchmark_filter=ExpertKernelForward/fp32/128
HERE_KERNEL_CALL_S = 22.8e-3
# The router's gate and combine, 8 experts (bench:router_cpu_benchmark).
HERE_ROUTER_S_PER_TOKEN = (0.46 + 0.24) * 1e-6
# gRPC's CPU per byte moved (STYLE.md 2.6, completion-queue API, 4 MiB).
WIRE_CPU_S_PER_BYTE = 1.76e-9


def predict_shared_cores(servers, clients=4, cores=2, experts=8, batch=512, d_model=1024,
                         top_k=2):
    """Every process on the same `cores`: each server's kernels run on one
    thread (a station of its experts' calls), and all the CPU the cluster
    spends per request (kernels, router, the wire's bytes at gRPC's CPU per
    byte) shares the cores; the lower bound wins."""
    d_server = experts / servers * HERE_KERNEL_CALL_S
    # Client -> router -> servers and back: the tokens twice, the pairs twice.
    wire_bytes = (2 * batch + 2 * batch * top_k) * d_model * 4
    d_router = HERE_ROUTER_S_PER_TOKEN * batch + WIRE_CPU_S_PER_BYTE * wire_bytes
    x_servers, _ = mva([(d_server, True), (d_router, True)], clients)
    x_cores = cores / (experts * HERE_KERNEL_CALL_S + d_router)
    return min(x_servers, x_cores) * batch, ("servers" if x_servers < x_cores else "cores")


def validate():
    worst = 0.0
    print("this machine (2 cores), 8 experts, d_model 1024, d_ff 4096, 512-token requests, C = 4")
    print(f"{'S':>2} {'measured':>9} {'predicted':>10} {'error':>7}  bottleneck")
    for servers, measured in sorted(MEASURED_HERE.items()):
        tokens, bottleneck = predict_shared_cores(servers)
        error = tokens / measured - 1
        worst = max(worst, abs(error))
        print(f"{servers:>2} {measured:>9.0f} {tokens:>10.0f} {100 * error:>+6.1f}%  {bottleneck}")
    print()
    rate = fit_kernel_rate()
    machine = sixteen_core(rate)
    print("16-core machine (../shared/measurements/scaling-16core.md), 48 experts; fitted: kernel "
          f"{rate:.0f} GFLOP/s fp32 per 2-core server (from S = 1)")
    print(f"{'S':>2} {'C':>3} {'measured':>16} {'predicted':>10} {'error':>7}  bottleneck")
    rows = [(s, c, runs, Model()) for s, (c, runs) in sorted(MEASURED_16CORE.items())]
    rows.append((6, 12, MEASURED_16CORE_BF16_S6, Model(dtype_bytes=2)))
    for servers, clients, runs, model in rows:
        measured = sum(runs) / len(runs)
        tokens, _, bottleneck = predict(model, machine, servers, clients)
        error = tokens / measured - 1
        worst = max(worst, abs(error))
        label = "bf16" if model.dtype_bytes == 2 else ""
        print(f"{servers:>2} {clients:>3} {measured:>11.0f} {label:>4} {tokens:>10.0f} "
              f"{100 * error:>+6.1f}%  {bottleneck}")
    print(f"worst error {100 * worst:.1f}% (limit 20%)")
    return worst <= 0.20


def report(router_us_per_token):
    machine = sixteen_core(fit_kernel_rate())
    if router_us_per_token > 0:
        machine.router_cpu_s_per_token = router_us_per_token * 1e-6
    print("16-core machine kind, 48 experts, d_model 1024, d_ff 4096, top-2, 512-token requests,")
    print("2 cores per server (6 per machine), 2 per router, C = max(4, 2 S) clients in all "
          "(MODEL_PARALLEL; the network between machines not modelled)")
    print(f"{'servers':>7} {'routers':>7} {'fp32 tok/s':>11} {'p50 ms':>7} {'bf16 tok/s':>11} "
          f"{'p50 ms':>7}  bottleneck (fp32 / bf16)")
    for servers in (1, 2, 4, 8, 16, 32, 64):
        for routers in (1, 2, 4, 8):
            if routers > 1 and servers < 8:
                continue
            clients = max(4, 2 * servers)
            fp32 = predict(Model(), machine, servers, clients, routers=routers)
            bf16 = predict(Model(dtype_bytes=2), machine, servers, clients, routers=routers)
            print(f"{servers:>7} {routers:>7} {fp32[0]:>11.0f} {1e3 * fp32[1]:>7.0f} "
                  f"{bf16[0]:>11.0f} {1e3 * bf16[1]:>7.0f}  {fp32[2]} / {bf16[2]}")
    ceiling = machine.router_cores / machine.router_cpu_s_per_token
    print(f"one router saturates at {ceiling:.0f} tokens/s "
          f"({machine.router_cpu_s_per_token * 1e6:.0f} us of CPU per token on "
          f"{machine.router_cores} cores)")
    print("\nring all-reduce of one expert's fp32 gradients (d_model 1024, d_ff 4096)")
    for replicas in (2, 4, 8, 16):
        print(f"  {replicas:>2} replicas  {1e3 * allreduce_seconds(Model(), replicas):7.1f} ms")


def placement_demands(model, machine, shares, placement, batch):
    """Seconds each server spends per request of `batch` tokens when expert
    e takes shares[e] of the pairs, split evenly over its replicas (the
    router splits by outstanding tokens); a replica streams its weights only
    when it gets a row (Poisson). placement: each server's experts."""
    replicas = {}
    for experts in placement:
        for e in experts:
            replicas[e] = replicas.get(e, 0) + 1
    neighbours = min(len(placement), machine.servers_per_machine)
    bandwidth = machine.membw(neighbours * machine.cores_per_server) / neighbours * 1e9
    rate = machine.kernel_gflops[model.dtype_bytes] * 1e9
    demands = []
    for experts in placement:
        demand = 0.0
        for e in experts:
            rows = batch * model.top_k * shares[e] / replicas[e]
            demand += (model.flops(rows) / rate +
                       (1 - math.exp(-rows)) * model.expert_weight_bytes() / bandwidth)
        demands.append(demand)
    return demands


def predict_placement(model, machine, shares, placement, batch, clients):
    """(tokens/s, latency s, each server's seconds per request) of a
    placement: a request visits every server that holds its experts at once
    and waits for the slowest, so the most loaded server is the station
    (request merging on the servers not modelled)."""
    demands = placement_demands(model, machine, shares, placement, batch)
    d_router = machine.router_cpu_s_per_token * batch
    m = machine.router_cores
    stations = [(max(demands), True), (d_router / m, True), (d_router * (m - 1) / m, False)]
    x, r = mva(stations, clients)
    return x * batch, r, demands


def report_placements(args):
    """bench:migration_benchmark's placements before and after Rebalance,
    on a machine of the 16-core kind with a server per 2 cores."""
    shares = [float(v) for v in args.shares.split(",")]
    total = sum(shares)
    shares = [v / total for v in shares]
    model = Model(experts=len(shares), dtype_bytes=2 if args.dtype == "bf16" else 4)
    machine = sixteen_core(fit_kernel_rate())
    if args.router_us_per_token > 0:
        machine.router_cpu_s_per_token = args.router_us_per_token * 1e-6
    print(f"{len(shares)} experts, d_model 1024, d_ff 4096, top-2, {args.dtype}, {args.clients} "
          f"clients x {args.batch} tokens, a server per 2 cores of a 16-core machine, the router "
          f"at {machine.router_cpu_s_per_token * 1e6:.0f} us of CPU per token on 2 cores")
    print(f"{'placement':>9} {'tokens/s':>9} {'p50 ms':>7} {'server ms per request':>24}  "
          f"time max/mean")
    results = []
    for name, text in (("before", args.placement_before), ("after", args.placement_after)):
        placement = [[int(e) for e in server.split(",") if e] for server in text.split("|")]
        tokens, latency, demands = predict_placement(model, machine, shares, placement,
                                                     args.batch, args.clients)
        imbalance = max(demands) / (sum(demands) / len(demands))
        print(f"{name:>9} {tokens:>9.0f} {1e3 * latency:>7.1f} "
              f"{' '.join(f'{1e3 * d:.1f}' for d in demands):>24}  {imbalance:.2f}")
        results.append(tokens)
    print(f"after / before: {results[1] / results[0]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--router_us_per_token", type=float, default=0,
                        help="the router's CPU per token; 0: the 16-core measurement's 64 us")
    parser.add_argument("--placement_before", default="",
                        help="with --placement_after and --shares: predict the two placements "
                        "bench:migration_benchmark prints (servers' experts, '|' between servers)")
    parser.add_argument("--placement_after", default="")
    parser.add_argument("--shares", default="", help="each expert's share of the routed pairs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if args.validate:
        sys.exit(0 if validate() else 1)
    if args.placement_before:
        report_placements(args)
        return
    report(args.router_us_per_token)


if __name__ == "__main__":
    main()
