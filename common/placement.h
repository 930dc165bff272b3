// Which servers hold which experts, and the replica groups that sum their
// gradients together. The strategies are pure functions of the model, the
// number of servers and (for DYNAMIC) a load profile; see docs/placement.md.
// Servers are numbered by their index in ClusterConfig.servers; experts are
// ExpertKeys, so one placement covers every MoE layer of the model (the
// strategies place each layer as they would place one: expert e of every
// layer on the same servers).
// Placement is immutable and thread-safe.
#ifndef MOE_COMMON_PLACEMENT_H_
#define MOE_COMMON_PLACEMENT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/expert_key.h"
#include "common/model_config.h"

namespace moe {

class Placement {
 public:
  // Validates: num_servers >= 1, every layer has at least one expert, every
  // expert held by at least one server, server ids in range, no server
  // listed twice for one expert. servers_of_expert[layer][expert]; each
  // expert's servers are kept sorted by id.
  static absl::StatusOr<Placement> CreateLayers(
      int num_servers, std::vector<std::vector<std::vector<int>>> servers_of_expert);
  // One MoE layer, layer 0: servers_of_expert[expert].
  static absl::StatusOr<Placement> Create(
      int num_servers, std::vector<std::vector<int>> servers_of_expert);

  int num_servers() const { return static_cast<int>(experts_on_server_.size()); }
  int num_layers() const { return static_cast<int>(servers_of_expert_.size()); }
  // Experts of `layer`, 0 for a layer this placement does not have.
  int num_experts(int layer) const;
  // Whether `expert` is an expert of this placement's layers.
  bool Contains(ExpertKey expert) const;
  // Ascending server ids holding `expert`. REQUIRES: Contains(expert).
  absl::Span<const int> ServersOf(ExpertKey expert) const {
    return servers_of_expert_.at(expert.layer).at(expert.expert);
  }
  // Ascending experts held by `server` (possibly none).
  absl::Span<const ExpertKey> ExpertsOn(int server) const { return experts_on_server_.at(server); }
  bool Holds(int server, ExpertKey expert) const;
  // Total expert replicas across servers.
  int num_replicas() const;

  // The same servers holding the same experts.
  friend bool operator==(const Placement& a, const Placement& b) {
    return a.num_servers() == b.num_servers() && a.servers_of_expert_ == b.servers_of_expert_;
  }
  friend bool operator!=(const Placement& a, const Placement& b) { return !(a == b); }

 private:
  Placement(std::vector<std::vector<std::vector<int>>> servers_of_expert, int num_servers);

  std::vector<std::vector<std::vector<int>>> servers_of_expert_;
  std::vector<std::vector<ExpertKey>> experts_on_server_;
};

// The four strategies of DESIGN.md. Each returns a valid placement.
// REQUIRES: num_experts >= 1, num_servers >= 1.
Placement DataParallelPlacement(int num_experts, int num_servers);
// Contiguous blocks; sizes differ by at most one, larger blocks first.
Placement ModelParallelPlacement(int num_experts, int num_servers);
// Experts [0, E/2) everywhere, the rest as ModelParallelPlacement.
Placement HybridPlacement(int num_experts, int num_servers);
// EPLB-like: `slots_per_server` replicas per server (0 = ceil(E/N) + 1, and
// never more than E); extra replicas go one at a time to the expert with the
// highest load per replica; replicas are then packed, heaviest first, onto
// the least loaded server with a free slot that does not hold that expert.
// REQUIRES: load.size() == num_experts, loads finite and >= 0.
absl::StatusOr<Placement> DynamicPlacement(int num_experts, int num_servers,
                                           absl::Span<const double> load,
                                           int slots_per_server);

// `layer0`'s placement (one layer) for every layer of `model`: expert e of
// each layer on the servers of expert e of layer 0, so every layer's
// experts are spread over the servers as one layer's would be.
Placement EveryLayer(const ModelConfig& model, const Placement& layer0);

// The placement a configuration asks for, every layer of the model (as
// EveryLayer, or EXPLICIT's own).
absl::StatusOr<Placement> ComputePlacement(const ModelConfig& model,
                                           const ClusterConfig& cluster);

// Expected load per server when each expert's load is split evenly over its
// replicas (as the router's fewest-outstanding-tokens choice does), from
// the load of each expert of `layer`.
std::vector<double> ServerLoads(const Placement& placement, int layer,
                                absl::Span<const double> expert_load);
// max / mean of `loads` (1 when all are equal or all zero).
double Imbalance(absl::Span<const double> loads);
// The same over the servers that count: those with load, or with room for
// replicas (slots[s] > 0); a drained or absent server that carries nothing
// does not lower the mean. REQUIRES: slots.size() == loads.size().
double Imbalance(absl::Span<const double> loads, absl::Span<const int> slots);

// Servers that hold the same set of replicated experts and so sum those
// experts' gradients in one all-reduce.
struct ReplicaGroup {
  // Ascending server ids, at least two: the ring order.
  std::vector<int> servers;
  // Ascending experts held by exactly these servers.
  std::vector<ExpertKey> experts;
  // Stable identity for collectives: FNV-1a 64 over servers and experts
  // (layer, expert).
  uint64_t id = 0;
};

// One group per distinct server set of size >= 2, ordered by its first
// expert. Experts held once need no all-reduce and appear in no group.
std::vector<ReplicaGroup> ReplicaGroups(const Placement& placement);

}  // namespace moe

#endif  // MOE_COMMON_PLACEMENT_H_
