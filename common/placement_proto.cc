#include "common/placement_proto.h"

#include <utility>
#include <vector>

#include "common/status_macros.h"

namespace moe {
v1::ExplicitPlacement PlacementToProto(const Placement& placement, const ClusterConfig& cluster) {
  v1::ExplicitPlacement proto;
  for (int l = 0; l < placement.num_layers(); ++l) {
    for (int e = 0; e < placement.num_experts(l); ++e) {
      v1::ExpertAssignment* expert = proto.add_experts();
      SetExpertKey(ExpertKey(l, e), expert);
      for (int s : placement.ServersOf(ExpertKey(l, e))) {
        expert->add_servers(cluster.servers[s].name);
      }
    }
  }
  return proto;
}

absl::StatusOr<Placement> PlacementFromProto(const v1::ExplicitPlacement& proto,
                                             const ModelConfig& model, const ClusterConfig& cluster,
                                             absl::string_view field_name) {
  MOE_ASSIGN_OR_RETURN(std::vector<std::vector<std::vector<int>>> servers_of_expert,
                       ExplicitPlacementFromProto(proto, cluster, model, field_name));
  return Placement::CreateLayers(static_cast<int>(cluster.servers.size()),
                                 std::move(servers_of_expert));
}

}  // namespace moe
