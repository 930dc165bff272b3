#include "router_service/rebalance.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/optimizer.h"

namespace moe::router {

std::vector<std::vector<double>> LoadByLayer(const ModelConfig& model,
                                             absl::Span<const int64_t> expert_tokens) {
  std::vector<std::vector<double>> load(model.num_layers);
  for (int l = 0; l < model.num_layers; ++l) {
    const auto layer =
        expert_tokens.subspan(int64_t{l} * model.experts_per_layer(), model.experts_per_layer());
    load[l].assign(layer.begin(), layer.end());
  }
  return load;
}

std::vector<int> ServerSlots(const ModelConfig& model, const ClusterConfig& cluster,
                             const Placement& current) {
  const int n = current.num_servers();
  const int experts = static_cast<int>(model.total_experts());
  int slots = cluster.slots_per_server > 0 ? cluster.slots_per_server * model.num_layers
                                           : std::min(experts, (experts + n - 1) / n + 1);
  for (int s = 0; s < n; ++s) {
    slots = std::max(slots, static_cast<int>(current.ExpertsOn(s).size()));
  }
  return std::vector<int>(n, slots);
}

int64_t ReplicaBytes(const ModelConfig& model) {
  const int64_t weights = model.expert_parameters() * static_cast<int64_t>(sizeof(float));
  // The optimizer's state moves with the weights.
  return (1 + OptimizerStateTensors(model.optimizer.type)) * weights;
}

absl::StatusOr<PlacementPlan> PlanRebalance(const RebalanceInputs& inputs) {
  const LoadStats::Snapshot& load = inputs.load;
  PlacementProblem problem;
  problem.num_servers = inputs.current->num_servers();
  problem.load = LoadByLayer(*inputs.model, load.expert_tokens);
  if (std::accumulate(load.expert_tokens.begin(), load.expert_tokens.end(), int64_t{0}) == 0) {
    if (inputs.drain.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("no tokens were served in the last ",
                                                        absl::FormatDuration(load.window),
                                                        ": there is no load to balance"));
    }
    // Only emptying servers: every expert alike.
    for (std::vector<double>& layer : problem.load) layer.assign(layer.size(), 1.0);
  }
  problem.server_slots = ServerSlots(*inputs.model, *inputs.cluster, *inputs.current);
  for (int s : inputs.drain) {
    if (s < 0 || s >= problem.num_servers) {
      return absl::InvalidArgumentError(absl::StrCat("drain: no server ", s));
    }
    problem.server_slots[s] = 0;
  }
  for (int s : inputs.absent) problem.server_slots.at(s) = 0;
  problem.replica_bytes = ReplicaBytes(*inputs.model);
  problem.current = *inputs.current;
  problem.token_experts = inputs.tokens;
  return SolvePlacement(problem);
}

PlacementPlan PlanMoveTo(const RebalanceInputs& inputs, Placement target) {
  const Placement& current = *inputs.current;
  const std::vector<std::vector<double>> load =
      LoadByLayer(*inputs.model, inputs.load.expert_tokens);
  PlacementPlan plan{std::move(target)};
  plan.server_load_before.assign(current.num_servers(), 0.0);
  plan.server_load_after.assign(current.num_servers(), 0.0);
  for (int l = 0; l < plan.placement.num_layers(); ++l) {
    const std::vector<double> before = ServerLoads(current, l, load[l]);
    const std::vector<double> after = ServerLoads(plan.placement, l, load[l]);
    for (int s = 0; s < current.num_servers(); ++s) {
      plan.server_load_before[s] += before[s];
      plan.server_load_after[s] += after[s];
    }
    for (int e = 0; e < plan.placement.num_experts(l); ++e) {
      plan.replicas.push_back(static_cast<int>(plan.placement.ServersOf(ExpertKey(l, e)).size()));
    }
  }
  plan.imbalance_before = Imbalance(plan.server_load_before);
  plan.imbalance_after = Imbalance(plan.server_load_after);
  for (int s = 0; s < current.num_servers(); ++s) {
    for (ExpertKey e : plan.placement.ExpertsOn(s)) plan.replicas_added += !current.Holds(s, e);
    for (ExpertKey e : current.ExpertsOn(s)) plan.replicas_removed += !plan.placement.Holds(s, e);
  }
  plan.bytes_moved = plan.replicas_added * ReplicaBytes(*inputs.model);
  return plan;
}

}  // namespace moe::router
