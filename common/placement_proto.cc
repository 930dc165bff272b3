#include "common/placement_proto.h"

#include <utility>
#include <vector>

#include "common/status_macros.h"

namespace moe {
namespace {

// One MoE layer on the wire (model_config.h).
constexpr int kLayer = 0;

}  // namespace

v1::ExplicitPlacement PlacementToProto(const Placement& placement, const ClusterConfig& cluster) {
  v1::ExplicitPlacement proto;
  for (int e = 0; e < placement.num_experts(kLayer); ++e) {
    v1::ExpertAssignment* expert = proto.add_experts();
    expert->set_expert_id(e);
    for (int s : placement.ServersOf(ExpertKey(kLayer, e))) {
      expert->add_servers(cluster.servers[s].name);
    }
  }
  return proto;
}

absl::StatusOr<Placement> PlacementFromProto(const v1::ExplicitPlacement& proto,
                                             const ModelConfig& model, const ClusterConfig& cluster,
                                             absl::string_view field_name) {
  MOE_ASSIGN_OR_RETURN(std::vector<std::vector<int>> servers_of_expert,
                       ExplicitPlacementFromProto(proto, cluster, model.num_experts, field_name));
  return Placement::Create(static_cast<int>(cluster.servers.size()), std::move(servers_of_expert));
}

}  // namespace moe
