#include "router_service/rebalance.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/optimizer.h"

namespace moe::router {

std::vector<int> ServerSlots(const ModelConfig& model, const ClusterConfig& cluster,
                             const Placement& current) {
  const int n = current.num_servers();
  int slots = cluster.slots_per_server > 0
                  ? cluster.slots_per_server
                  : std::min(model.num_experts, (model.num_experts + n - 1) / n + 1);
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
  problem.load = {std::vector<double>(load.expert_tokens.begin(), load.expert_tokens.end())};
  if (std::accumulate(load.expert_tokens.begin(), load.expert_tokens.end(), int64_t{0}) == 0) {
    if (inputs.drain.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("no tokens were served in the last ",
                                                        absl::FormatDuration(load.window),
                                                        ": there is no load to balance"));
    }
    // Only emptying servers: every expert alike.
    problem.load[0].assign(problem.load[0].size(), 1.0);
  }
  problem.server_slots = ServerSlots(*inputs.model, *inputs.cluster, *inputs.current);
  for (int s : inputs.drain) {
    if (s < 0 || s >= problem.num_servers) {
      return absl::InvalidArgumentError(absl::StrCat("drain: no server ", s));
    }
    problem.server_slots[s] = 0;
  }
  problem.replica_bytes = ReplicaBytes(*inputs.model);
  problem.current = *inputs.current;
  problem.token_experts = inputs.tokens;
  return SolvePlacement(problem);
}

PlacementPlan PlanMoveTo(const RebalanceInputs& inputs, Placement target) {
  constexpr int kLayer = 0;  // one MoE layer (model_config.h)
  const Placement& current = *inputs.current;
  const std::vector<double> load(inputs.load.expert_tokens.begin(),
                                 inputs.load.expert_tokens.end());
  PlacementPlan plan{std::move(target)};
  plan.server_load_before = ServerLoads(current, kLayer, load);
  plan.server_load_after = ServerLoads(plan.placement, kLayer, load);
  plan.imbalance_before = Imbalance(plan.server_load_before);
  plan.imbalance_after = Imbalance(plan.server_load_after);
  for (int e = 0; e < plan.placement.num_experts(kLayer); ++e) {
    plan.replicas.push_back(
        static_cast<int>(plan.placement.ServersOf(ExpertKey(kLayer, e)).size()));
  }
  for (int s = 0; s < current.num_servers(); ++s) {
    for (ExpertKey e : plan.placement.ExpertsOn(s)) plan.replicas_added += !current.Holds(s, e);
    for (ExpertKey e : current.ExpertsOn(s)) plan.replicas_removed += !plan.placement.Holds(s, e);
  }
  plan.bytes_moved = plan.replicas_added * ReplicaBytes(*inputs.model);
  return plan;
}

}  // namespace moe::router
