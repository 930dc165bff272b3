// The router's own work per token, without a transport: the gate
// (RouteTokens: logits, softmax, top-k, capacity, losses) and the combine
// of the experts' answers, at d_model 1024, top-2, 512-token requests, for
// 8 and 48 experts (the 16-core measurements' model). Prints microseconds
// per token of each, for the goal (gate, plan and combine <= 8 us
// per token at 48 experts).
#include <cstdio>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/ratio_reporter.h"
#include "benchmark/benchmark.h"
#include "common/gating.h"
#include "common/model_config.h"
#include "common/testing/random_tensor.h"
#include "router_service/dispatch_plan.h"

namespace moe::bench {
namespace {

constexpr int64_t kDModel = 1024;
constexpr int64_t kTokens = 512;

ModelConfig Model(int experts) {
  ModelConfig model;
  model.d_model = kDModel;
  model.d_ff = 4096;
  model.num_experts = experts;
  model.top_k = 2;
  return model;
}

void BM_Gate(benchmark::State& state) {
  const ModelConfig model = Model(static_cast<int>(state.range(0)));
  const FloatTensor x = testing::RandomTensor({kTokens, kDModel}, 1);
  const FloatTensor gate = testing::RandomTensor({kDModel, model.num_experts}, 2, 0.05f);
  for (auto _ : state) {
    Routing routing = RouteTokens(x.values(), kTokens, gate.values(), model);
    benchmark::DoNotOptimize(routing.weights.data());
  }
  state.counters["us_per_token"] = benchmark::Counter(
      static_cast<double>(kTokens),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_Gate)->Arg(8)->Arg(48)->Unit(benchmark::kMicrosecond);

// The answers of every (expert) group added into y in group order.
void BM_Combine(benchmark::State& state) {
  const ModelConfig model = Model(static_cast<int>(state.range(0)));
  const FloatTensor x = testing::RandomTensor({kTokens, kDModel}, 1);
  const FloatTensor gate = testing::RandomTensor({kDModel, model.num_experts}, 2, 0.05f);
  const Routing routing = RouteTokens(x.values(), kTokens, gate.values(), model);
  std::vector<router::ExpertGroup> groups;
  std::vector<FloatTensor> answers;
  const std::vector<std::vector<int64_t>> pairs = KeptPairsByExpert(routing);
  for (int e = 0; e < model.num_experts; ++e) {
    router::ExpertGroup& group = groups.emplace_back();
    group.expert = ExpertKey(0, e);
    group.pairs = pairs[e];
    answers.push_back(
        testing::RandomTensor({static_cast<int64_t>(pairs[e].size()), kDModel}, 10 + e));
  }
  FloatTensor y({kTokens, kDModel});
  for (auto _ : state) {
    std::vector<router::RowReader> outputs;
    for (const FloatTensor& a : answers) {
      const absl::string_view bytes(reinterpret_cast<const char*>(a.values().data()),
                                    a.values().size() * sizeof(float));
      outputs.emplace_back(std::vector<absl::string_view>{bytes}, DType::kFloat32, kDModel);
    }
    std::fill(y.mutable_values().begin(), y.mutable_values().end(), 0.0f);
    benchmark::DoNotOptimize(
        router::Combine(routing, groups, outputs, kDModel, y.mutable_values()));
    benchmark::DoNotOptimize(y.mutable_values().data());
  }
  state.counters["us_per_token"] = benchmark::Counter(
      static_cast<double>(kTokens),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_Combine)->Arg(8)->Arg(48)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  moe::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  for (int experts : {8, 48}) {
    const auto* gate = reporter.Find(absl::StrCat("BM_Gate/", experts));
    const auto* combine = reporter.Find(absl::StrCat("BM_Combine/", experts));
    if (gate == nullptr || combine == nullptr) continue;
    const double tokens = static_cast<double>(moe::bench::kTokens);
    std::printf("%d experts: gate %.2f us/token, combine %.2f us/token, together %.2f\n", experts,
                gate->seconds_per_iteration * 1e6 / tokens,
                combine->seconds_per_iteration * 1e6 / tokens,
                (gate->seconds_per_iteration + combine->seconds_per_iteration) * 1e6 / tokens);
  }
  return 0;
}
