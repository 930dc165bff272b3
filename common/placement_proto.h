// A placement on the wire (ExplicitPlacement: each expert's servers, by
// name), for placement changes: Rebalance, the servers' PreparePlacement
// and Info. Every layer's experts.
#ifndef MOE_COMMON_PLACEMENT_PROTO_H_
#define MOE_COMMON_PLACEMENT_PROTO_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "proto/config.pb.h"

namespace moe {

v1::ExplicitPlacement PlacementToProto(const Placement& placement, const ClusterConfig& cluster);

// INVALID_ARGUMENT naming `field_name` when an expert is missing or listed
// twice, a server is unknown or listed twice for one expert.
absl::StatusOr<Placement> PlacementFromProto(const v1::ExplicitPlacement& proto,
                                             const ModelConfig& model, const ClusterConfig& cluster,
                                             absl::string_view field_name);

}  // namespace moe

#endif  // MOE_COMMON_PLACEMENT_PROTO_H_
