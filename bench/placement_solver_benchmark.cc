// How long the placement solver takes (goal: < 10 ms for 256 experts on 64
// servers), and what it achieves, on Zipf-skewed load (s = 1.2) with and
// without sampled routing (4096 top-2 tokens) and a current placement to
// keep. Counters: imbalance (max/mean server load) after, replicas moved,
// servers per token before and after.
#include <cmath>
#include <random>

#include "benchmark/benchmark.h"
#include "common/placement_solver.h"

namespace moe {
namespace {

PlacementProblem Problem(int experts, int servers, bool with_tokens) {
  std::mt19937 random(1);
  std::vector<double> zipf(experts);
  for (int e = 0; e < experts; ++e) zipf[e] = 1e5 / std::pow(e + 1, 1.2);
  std::shuffle(zipf.begin(), zipf.end(), random);
  PlacementProblem problem;
  problem.num_servers = servers;
  problem.load = {zipf};
  const int slots = (experts + servers - 1) / servers + 1;
  problem.server_slots.assign(servers, slots);
  problem.replica_bytes = int64_t{32} << 20;
  // Serving now: the solve of a uniform load (experts spread evenly).
  PlacementProblem uniform = problem;
  uniform.load = {std::vector<double>(experts, 1.0)};
  problem.current = SolvePlacement(uniform)->placement;
  if (with_tokens) {
    std::discrete_distribution<int> pick(zipf.begin(), zipf.end());
    for (int t = 0; t < 4096; ++t) {
      const int a = pick(random);
      int b = pick(random);
      while (b == a) b = pick(random);
      problem.token_experts.push_back({ExpertKey(0, a), ExpertKey(0, b)});
    }
  }
  return problem;
}

void BM_SolvePlacement(benchmark::State& state) {
  const PlacementProblem problem = Problem(static_cast<int>(state.range(0)),
                                           static_cast<int>(state.range(1)), state.range(2) != 0);
  PlacementPlan plan = *SolvePlacement(problem);
  for (auto _ : state) {
    plan = *SolvePlacement(problem);
    benchmark::DoNotOptimize(plan);
  }
  state.counters["imbalance_before"] = plan.imbalance_before;
  state.counters["imbalance_after"] = plan.imbalance_after;
  state.counters["replicas_moved"] = plan.replicas_added;
  state.counters["servers_per_token_before"] = plan.servers_per_token_before;
  state.counters["servers_per_token_after"] = plan.servers_per_token_after;
}
BENCHMARK(BM_SolvePlacement)
    ->ArgNames({"experts", "servers", "tokens"})
    ->Args({16, 4, 0})
    ->Args({16, 4, 1})
    ->Args({64, 16, 1})
    ->Args({256, 64, 0})
    ->Args({256, 64, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace moe

BENCHMARK_MAIN();
