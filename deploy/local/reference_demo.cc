#include "deploy/local/reference_demo.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/expert_key.h"
#include "common/log.h"
#include "common/placement.h"
#include "common/reference_moe.h"
#include "common/status_macros.h"

namespace moe {
namespace {

FloatTensor UniformTokens(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  FloatTensor t({rows, cols});
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (float& v : t.mutable_values()) v = dist(rng);
  return t;
}

double SumOfSquares(absl::Span<const float> values) {
  double sum = 0;
  for (float v : values) sum += static_cast<double>(v) * v;
  return sum;
}

// "0-3 5 7" for a sorted id list.
// Expert indices of layer-0 keys (the strategies place one layer).
std::vector<int> Layer0Indices(absl::Span<const ExpertKey> keys) {
  std::vector<int> ids;
  for (ExpertKey key : keys) ids.push_back(key.expert);
  return ids;
}

std::string IdRanges(absl::Span<const int> ids) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    parts.push_back(j > i ? absl::StrCat(ids[i], "-", ids[j]) : absl::StrCat(ids[i]));
    i = j + 1;
  }
  return parts.empty() ? "-" : absl::StrJoin(parts, " ");
}

}  // namespace

absl::StatusOr<ReferenceDemoReport> RunReferenceDemo(
    const ReferenceDemoOptions& options) {
  if (options.tokens_per_batch < 0 || options.batches < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "need batches >= 1 and tokens >= 0, got ", options.batches, " x ",
        options.tokens_per_batch));
  }
  ReferenceDemoReport report;
  MOE_ASSIGN_OR_RETURN(report.config, LoadServingConfig(options.config_path));
  const ModelConfig& model = report.config.model;

  MoeWeights weights;
  if (options.checkpoint_path.empty()) {
    weights = InitAllWeights(model);
    report.weights_source = absl::StrCat("deterministic init, seed ", model.seed);
  } else {
    MOE_ASSIGN_OR_RETURN(weights, LoadCheckpoint(options.checkpoint_path, model));
    report.weights_source = absl::StrCat("checkpoint ", options.checkpoint_path);
  }
  if (!options.save_checkpoint_path.empty()) {
    MOE_RETURN_IF_ERROR(SaveCheckpoint(options.save_checkpoint_path, model,
                                       weights, options.save_dtype));
  }
  report.parameters =
      model.d_model * model.num_experts + model.num_experts * model.expert_parameters();
  MOE_ASSIGN_OR_RETURN(ReferenceMoe moe, ReferenceMoe::Create(model, std::move(weights)));

  std::mt19937_64 rng(options.input_seed);
  report.expert_tokens.assign(model.num_experts, 0);
  double output_squares = 0, grad_squares = 0;
  for (int b = 0; b < options.batches; ++b) {
    const FloatTensor x = UniformTokens(options.tokens_per_batch, model.d_model, rng);
    const absl::Time start = absl::Now();
    MOE_ASSIGN_OR_RETURN(ReferenceForward forward, moe.Forward(x));
    report.forward_seconds += absl::ToDoubleSeconds(absl::Now() - start);
    report.tokens += options.tokens_per_batch;
    for (int e = 0; e < model.num_experts; ++e) {
      report.expert_tokens[e] += forward.routing.expert_tokens[e];
    }
    report.dropped_pairs += forward.routing.dropped_pairs;
    output_squares += SumOfSquares(forward.y.values());
    if (b == 0 && forward.y.num_elements() > 0) {
      const auto row = forward.y.row(0);
      report.first_outputs.assign(row.begin(), row.begin() + std::min<int64_t>(4, row.size()));
    }
    if (options.backward) {
      const FloatTensor dy = UniformTokens(options.tokens_per_batch, model.d_model, rng);
      const absl::Time backward_start = absl::Now();
      MOE_ASSIGN_OR_RETURN(ReferenceGradients grads, moe.Backward(x, forward, dy));
      report.backward_seconds += absl::ToDoubleSeconds(absl::Now() - backward_start);
      grad_squares += SumOfSquares(grads.dx.values());
    }
  }
  const double elements = static_cast<double>(report.tokens) * model.d_model;
  if (elements > 0) {
    report.output_rms = std::sqrt(output_squares / elements);
    report.grad_input_rms = std::sqrt(grad_squares / elements);
  }
  return report;
}

std::string FormatReferenceDemoReport(const ReferenceDemoReport& r) {
  const ModelConfig& model = r.config.model;
  const ClusterConfig& cluster = r.config.cluster;
  std::string out = "moe-serve: the reference MoE layer, in process\n\n";
  absl::StrAppendFormat(&out, "model       d_model %d, d_ff %d, %d %s experts, top_k %d, %s\n",
                        model.d_model, model.d_ff, model.num_experts,
                        model.gated() ? "gated SiLU" : "ReLU", model.top_k,
                        model.overflow == OverflowPolicy::kDrop
                            ? absl::StrFormat("DROP at capacity factor %.2f", model.capacity_factor)
                            : std::string("DROPLESS"));
  absl::StrAppendFormat(&out, "weights     %s (%.2f M parameters)\n",
                        r.weights_source, r.parameters / 1e6);

  absl::StatusOr<Placement> placement = ComputePlacement(model, cluster);
  absl::StrAppendFormat(&out, "placement   %s over %d servers\n",
                        PlacementStrategyName(cluster.strategy),
                        cluster.servers.size());
  if (placement.ok()) {
    for (int s = 0; s < placement->num_servers(); ++s) {
      absl::StrAppendFormat(&out, "            %-12s %-22s experts %s\n", cluster.servers[s].name,
                            cluster.servers[s].address,
                            IdRanges(Layer0Indices(placement->ExpertsOn(s))));
    }
    for (const ReplicaGroup& group : ReplicaGroups(*placement)) {
      absl::StrAppendFormat(&out, "            replica group: servers %s share experts %s\n",
                            IdRanges(group.servers), IdRanges(Layer0Indices(group.experts)));
    }
  } else {
    absl::StrAppend(&out, "            ", placement.status().message(), "\n");
  }

  const int64_t pairs = r.tokens * model.top_k;
  absl::StrAppendFormat(&out, "\nran         %d tokens: forward %.3f s (%.0f tokens/s)",
                        r.tokens, r.forward_seconds,
                        r.forward_seconds > 0 ? r.tokens / r.forward_seconds : 0.0);
  if (r.backward_seconds > 0) {
    absl::StrAppendFormat(&out, ", backward %.3f s", r.backward_seconds);
  }
  absl::StrAppendFormat(&out, "\noutput      rms %.6f, y[0][0:%d] = [%s]\n", r.output_rms,
                        r.first_outputs.size(),
                        absl::StrJoin(r.first_outputs, ", ", [](std::string* s, float v) {
                          absl::StrAppendFormat(s, "%.6f", v);
                        }));
  if (r.backward_seconds > 0) {
    absl::StrAppendFormat(&out, "grad input  rms %.6f\n", r.grad_input_rms);
  }
  absl::StrAppendFormat(&out, "dropped     %d of %d pairs (%.2f%%)\n", r.dropped_pairs,
                        pairs, pairs > 0 ? 100.0 * r.dropped_pairs / pairs : 0.0);

  absl::StrAppend(&out, "\nexpert load (pairs served)\n");
  const int64_t served = pairs - r.dropped_pairs;
  int64_t max_tokens = 1;
  for (int64_t t : r.expert_tokens) max_tokens = std::max(max_tokens, t);
  for (int e = 0; e < model.num_experts; ++e) {
    const int64_t t = r.expert_tokens[e];
    absl::StrAppendFormat(&out, "  expert %3d %9d  %5.1f%%  %s\n", e, t,
                          served > 0 ? 100.0 * t / served : 0.0,
                          std::string(40 * t / max_tokens, '#'));
  }
  std::vector<double> load(r.expert_tokens.begin(), r.expert_tokens.end());
  absl::StrAppendFormat(&out, "expert imbalance (max/mean) %.3f\n", Imbalance(load));

  absl::StrAppend(&out, "\nserver imbalance this load would give, by strategy\n");
  const int num_servers = cluster.servers.size();
  const std::pair<PlacementStrategy, Placement> strategies[] = {
      {PlacementStrategy::kDataParallel, DataParallelPlacement(model.num_experts, num_servers)},
      {PlacementStrategy::kModelParallel, ModelParallelPlacement(model.num_experts, num_servers)},
      {PlacementStrategy::kHybrid, HybridPlacement(model.num_experts, num_servers)},
  };
  for (const auto& [strategy, p] : strategies) {
    absl::StrAppendFormat(&out, "  %-15s %.3f  (%d replicas)\n", PlacementStrategyName(strategy),
                          Imbalance(ServerLoads(p, 0, load)), p.num_replicas());
  }
  absl::StatusOr<Placement> dynamic =
      DynamicPlacement(model.num_experts, num_servers, load, cluster.slots_per_server);
  if (dynamic.ok()) {
    absl::StrAppendFormat(&out, "  %-15s %.3f  (%d replicas, from this load)\n", "DYNAMIC",
                          Imbalance(ServerLoads(*dynamic, 0, load)), dynamic->num_replicas());
  }
  return out;
}

}  // namespace moe
