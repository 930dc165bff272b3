// Chooses a placement from measured load, for Rebalance and DYNAMIC: how
// many replicas each expert gets and which servers hold them, within a slot
// budget, so that the most loaded server carries as little as possible;
// then, against the placement serving now, so that as few expert weights as
// possible move; and, from sampled routing, so that experts often chosen by
// the same token share a server (a token's top-k reaches fewer servers).
// Domain code: no transport, no clock. See docs/placement.md.
#ifndef MOE_COMMON_PLACEMENT_SOLVER_H_
#define MOE_COMMON_PLACEMENT_SOLVER_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_key.h"
#include "common/placement.h"

namespace moe {

struct PlacementProblem {
  int num_servers = 0;
  // Tokens each expert served in the window: load[layer][expert], finite and
  // >= 0. An expert's load is split evenly over its replicas.
  std::vector<std::vector<double>> load;
  // Replicas each server can hold (from its slots and its memory); one
  // entry per server.
  std::vector<int> server_slots;
  // Replicas in all, at most; 0: the sum of server_slots.
  int total_slots = 0;
  // Bytes one new replica copies (weights and optimizer state).
  int64_t replica_bytes = 0;
  // The placement serving now, if any (same layers and experts): replicas it
  // already has cost nothing to keep.
  std::optional<Placement> current;
  // Sampled tokens, each the experts (of one layer) it chose: co-activation
  // for the packing, and servers contacted per token before and after.
  std::vector<std::vector<ExpertKey>> token_experts;
  // Extra max server load accepted, as a share of the mean server load, to
  // keep a replica where it is or to put co-chosen experts together.
  double tolerance = 0.02;
  // Small instances are searched exhaustively (at most this many candidate
  // placements); 0: never (the heuristic alone, for tests).
  int64_t exhaustive_limit = 200000;
};

struct PlacementPlan {
  Placement placement;
  std::vector<int> replicas;  // per expert, layers in order
  // Expected load per server (each expert's load split over its replicas);
  // "before" only with a current placement.
  std::vector<double> server_load_before;
  std::vector<double> server_load_after;
  double imbalance_before = 0;  // max / mean
  double imbalance_after = 0;
  // Against the current placement: replicas to create (each copies
  // replica_bytes) and to drop.
  int replicas_added = 0;
  int replicas_removed = 0;
  int64_t bytes_moved = 0;
  // Mean servers a sampled token's experts need at least (0 without
  // samples).
  double servers_per_token_before = 0;
  double servers_per_token_after = 0;
  // Found by exhaustive search (optimal max load), not the heuristic.
  bool exhaustive = false;
};

// INVALID_ARGUMENT naming the problem when the budget cannot hold every
// expert once, a load is negative or not finite, or the current placement
// has other layers or experts.
absl::StatusOr<PlacementPlan> SolvePlacement(const PlacementProblem& problem);

}  // namespace moe

#endif  // MOE_COMMON_PLACEMENT_SOLVER_H_
