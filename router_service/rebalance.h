// The router's view of a rebalance: the placement problem from what it
// measured (each expert's load over the window, sampled co-activation), the
// placement serving now and the configured slot budget, solved by
// common/placement_solver.h. Domain code: no transport.
#ifndef MOE_ROUTER_SERVICE_REBALANCE_H_
#define MOE_ROUTER_SERVICE_REBALANCE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/placement_solver.h"
#include "router_service/load_stats.h"

namespace moe::router {

struct RebalanceInputs {
  const ModelConfig* model = nullptr;
  const ClusterConfig* cluster = nullptr;
  const Placement* current = nullptr;
  LoadStats::Snapshot load;
  std::vector<std::vector<ExpertKey>> tokens;
  // Servers the plan must leave empty (by index): drained, or absent (they
  // host nothing and are not running, absent_servers.h).
  std::vector<int> drain;
  std::vector<int> absent;
};

// Per layer, each expert's tokens (LoadStats' layer-major counts).
std::vector<std::vector<double>> LoadByLayer(const ModelConfig& model,
                                             absl::Span<const int64_t> expert_tokens);

// Replicas per server: the config's slots_per_server per layer, else
// ceil(L E / N) + 1, and never fewer than a server holds now (it has the
// memory for them).
std::vector<int> ServerSlots(const ModelConfig& model, const ClusterConfig& cluster,
                             const Placement& current);

// Bytes one new replica copies: its fp32 weights, and momentum when the
// optimizer keeps it.
int64_t ReplicaBytes(const ModelConfig& model);

// FAILED_PRECONDITION when nothing was served in the window (no load to
// balance), unless servers are drained (every expert then counts alike);
// INVALID_ARGUMENT when the servers left cannot hold every expert.
absl::StatusOr<PlacementPlan> PlanRebalance(const RebalanceInputs& inputs);

// The plan of moving to `target`, a placement an operator chose (of the
// current one's servers and experts): the window's load per server before
// and after, the replicas added and removed and the bytes they copy.
PlacementPlan PlanMoveTo(const RebalanceInputs& inputs, Placement target);

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_REBALANCE_H_
