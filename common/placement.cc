#include "common/placement.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace moe {

Placement::Placement(std::vector<std::vector<std::vector<int>>> servers_of_expert, int num_servers)
    : servers_of_expert_(std::move(servers_of_expert)), experts_on_server_(num_servers) {
  for (int l = 0; l < num_layers(); ++l) {
    for (int e = 0; e < num_experts(l); ++e) {
      std::vector<int>& servers = servers_of_expert_[l][e];
      std::sort(servers.begin(), servers.end());
      for (int s : servers) experts_on_server_[s].push_back(ExpertKey(l, e));
    }
  }
}

absl::StatusOr<Placement> Placement::CreateLayers(
    int num_servers, std::vector<std::vector<std::vector<int>>> servers_of_expert) {
  if (num_servers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: needs at least one server, got ", num_servers));
  }
  if (servers_of_expert.empty()) {
    return absl::InvalidArgumentError("placement: no layers");
  }
  for (size_t l = 0; l < servers_of_expert.size(); ++l) {
    if (servers_of_expert[l].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " has no experts"));
    }
    for (size_t e = 0; e < servers_of_expert[l].size(); ++e) {
      const std::string expert =
          ExpertKey(static_cast<int32_t>(l), static_cast<int32_t>(e)).ToString();
      std::vector<int>& servers = servers_of_expert[l][e];
      if (servers.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: ", expert, " is held by no server"));
      }
      for (int s : servers) {
        if (s < 0 || s >= num_servers) {
          return absl::InvalidArgumentError(absl::StrCat(
              "placement: ", expert, " names unknown server ", s, " (have ", num_servers, ")"));
        }
      }
      std::vector<int> sorted = servers;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: ", expert, " lists a server more than once"));
      }
    }
  }
  return Placement(std::move(servers_of_expert), num_servers);
}

absl::StatusOr<Placement> Placement::Create(int num_servers,
                                            std::vector<std::vector<int>> servers_of_expert) {
  std::vector<std::vector<std::vector<int>>> layers;
  layers.push_back(std::move(servers_of_expert));
  return CreateLayers(num_servers, std::move(layers));
}

int Placement::num_experts(int layer) const {
  if (layer < 0 || layer >= num_layers()) return 0;
  return static_cast<int>(servers_of_expert_[layer].size());
}

bool Placement::Contains(ExpertKey expert) const {
  return expert.expert >= 0 && expert.expert < num_experts(expert.layer);
}

bool Placement::Holds(int server, ExpertKey expert) const {
  if (!Contains(expert)) return false;
  const absl::Span<const int> servers = ServersOf(expert);
  return std::binary_search(servers.begin(), servers.end(), server);
}

int Placement::num_replicas() const {
  int total = 0;
  for (const auto& layer : servers_of_expert_) {
    for (const auto& servers : layer) total += servers.size();
  }
  return total;
}

namespace {

Placement MustCreate(int num_servers, std::vector<std::vector<int>> placement) {
  absl::StatusOr<Placement> result =
      Placement::Create(num_servers, std::move(placement));
  MOE_CHECK(result.ok(), result.status().ToString());
  return *std::move(result);
}

// Assigns experts [first, first + count) to servers in contiguous blocks.
void SplitEvenly(int first, int count, int num_servers,
                 std::vector<std::vector<int>>& placement) {
  const int base = count / num_servers;
  const int larger = count % num_servers;  // the first `larger` get one more
  int expert = first;
  for (int s = 0; s < num_servers; ++s) {
    const int block = base + (s < larger ? 1 : 0);
    for (int i = 0; i < block; ++i) placement[expert++].push_back(s);
  }
}

}  // namespace

Placement DataParallelPlacement(int num_experts, int num_servers) {
  std::vector<int> all(num_servers);
  std::iota(all.begin(), all.end(), 0);
  return MustCreate(num_servers, std::vector<std::vector<int>>(num_experts, all));
}

Placement ModelParallelPlacement(int num_experts, int num_servers) {
  std::vector<std::vector<int>> placement(num_experts);
  SplitEvenly(0, num_experts, num_servers, placement);
  return MustCreate(num_servers, std::move(placement));
}

Placement HybridPlacement(int num_experts, int num_servers) {
  const int replicated = num_experts / 2;
  std::vector<std::vector<int>> placement(num_experts);
  for (int e = 0; e < replicated; ++e) {
    placement[e].resize(num_servers);
    std::iota(placement[e].begin(), placement[e].end(), 0);
  }
  SplitEvenly(replicated, num_experts - replicated, num_servers, placement);
  return MustCreate(num_servers, std::move(placement));
}

absl::StatusOr<Placement> DynamicPlacement(int num_experts, int num_servers,
                                           absl::Span<const double> load,
                                           int slots_per_server) {
  if (static_cast<int>(load.size()) != num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("dynamic placement: load profile has ", load.size(),
                     " values for ", num_experts, " experts"));
  }
  const int slots = slots_per_server > 0
                        ? slots_per_server
                        : std::min(num_experts,
                                   (num_experts + num_servers - 1) / num_servers + 1);
  if (static_cast<int64_t>(slots) * num_servers < num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dynamic placement: ", slots, " slots x ", num_servers,
        " servers cannot hold ", num_experts, " experts"));
  }
  // An expert has at most one replica per server.
  const int64_t total_replicas =
      std::min<int64_t>(static_cast<int64_t>(slots) * num_servers,
                        static_cast<int64_t>(num_experts) * num_servers);

  // 1. Replica counts: each extra replica to the hottest expert per replica.
  std::vector<int> replicas(num_experts, 1);
  for (int64_t extra = total_replicas - num_experts; extra > 0; --extra) {
    int best = -1;
    for (int e = 0; e < num_experts; ++e) {
      if (replicas[e] == num_servers) continue;
      if (best < 0 || load[e] / replicas[e] > load[best] / replicas[best]) best = e;
    }
    ++replicas[best];
  }

  // 2. Packing: heaviest replicas first onto the least loaded eligible server.
  std::vector<int> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return load[a] / replicas[a] > load[b] / replicas[b];
  });
  std::vector<double> server_load(num_servers, 0.0);
  std::vector<int> used_slots(num_servers, 0);
  std::vector<std::vector<int>> placement(num_experts);
  for (int e : order) {
    const double share = load[e] / replicas[e];
    for (int r = 0; r < replicas[e]; ++r) {
      // Prefer servers with a free slot; a server never holds e twice. When
      // every server with a free slot already holds e (rare, late in the
      // packing), the least filled other server takes it.
      int best = -1;
      bool best_has_slot = false;
      for (int s = 0; s < num_servers; ++s) {
        if (std::find(placement[e].begin(), placement[e].end(), s) !=
            placement[e].end()) {
          continue;
        }
        const bool has_slot = used_slots[s] < slots;
        if (best < 0 || (has_slot && !best_has_slot) ||
            (has_slot == best_has_slot &&
             (has_slot ? server_load[s] < server_load[best]
                       : used_slots[s] < used_slots[best]))) {
          best = s;
          best_has_slot = has_slot;
        }
      }
      MOE_CHECK(best >= 0);
      placement[e].push_back(best);
      server_load[best] += share;
      ++used_slots[best];
    }
  }
  return Placement::Create(num_servers, std::move(placement));
}

Placement EveryLayer(const ModelConfig& model, const Placement& layer0) {
  std::vector<std::vector<int>> servers_of_expert;
  for (int e = 0; e < layer0.num_experts(0); ++e) {
    const auto servers = layer0.ServersOf(ExpertKey(0, e));
    servers_of_expert.emplace_back(servers.begin(), servers.end());
  }
  absl::StatusOr<Placement> layers = Placement::CreateLayers(
      layer0.num_servers(),
      std::vector<std::vector<std::vector<int>>>(model.num_layers, servers_of_expert));
  MOE_CHECK(layers.ok(), layers.status().ToString());
  return *std::move(layers);
}

namespace {

absl::StatusOr<Placement> EveryLayer(const ModelConfig& model, absl::StatusOr<Placement> layer0) {
  if (!layer0.ok() || model.num_layers == 1) return layer0;
  return EveryLayer(model, *layer0);
}

// The strategies' placement for the cluster's active servers; spare ones
// (the last) host nothing.
absl::StatusOr<Placement> PlaceOnActive(const ModelConfig& model, const ClusterConfig& cluster) {
  const int num_servers = cluster.active_servers();
  switch (cluster.strategy) {
    case PlacementStrategy::kDataParallel:
      return EveryLayer(model, DataParallelPlacement(model.experts_per_layer(), num_servers));
    case PlacementStrategy::kModelParallel:
      return EveryLayer(model, ModelParallelPlacement(model.experts_per_layer(), num_servers));
    case PlacementStrategy::kHybrid:
      return EveryLayer(model, HybridPlacement(model.experts_per_layer(), num_servers));
    case PlacementStrategy::kDynamic:
      return EveryLayer(model, DynamicPlacement(model.experts_per_layer(), num_servers,
                                                cluster.load_profile, cluster.slots_per_server));
    case PlacementStrategy::kExplicit:
      if (static_cast<int>(cluster.explicit_placement.size()) != model.num_layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: explicit placement lists ", cluster.explicit_placement.size(),
                         " layers, the model has ", model.num_layers));
      }
      // Spare servers host nothing (checked when the config was read).
      return Placement::CreateLayers(static_cast<int>(cluster.servers.size()),
                                     cluster.explicit_placement);
  }
  return absl::InvalidArgumentError("placement: unknown strategy");
}

}  // namespace

absl::StatusOr<Placement> ComputePlacement(const ModelConfig& model, const ClusterConfig& cluster) {
  const int num_servers = static_cast<int>(cluster.servers.size());
  if (num_servers < 1 || cluster.active_servers() < 1) {
    return absl::InvalidArgumentError("placement: the cluster has no servers to place on");
  }
  MOE_ASSIGN_OR_RETURN(const Placement active, PlaceOnActive(model, cluster));
  if (active.num_servers() == num_servers) return active;
  std::vector<std::vector<std::vector<int>>> servers_of(active.num_layers());
  for (int l = 0; l < active.num_layers(); ++l) {
    for (int e = 0; e < active.num_experts(l); ++e) {
      const auto servers = active.ServersOf(ExpertKey(l, e));
      servers_of[l].emplace_back(servers.begin(), servers.end());
    }
  }
  return Placement::CreateLayers(num_servers, std::move(servers_of));
}

std::vector<double> ServerLoads(const Placement& placement, int layer,
                                absl::Span<const double> expert_load) {
  MOE_CHECK(static_cast<int>(expert_load.size()) == placement.num_experts(layer));
  std::vector<double> loads(placement.num_servers(), 0.0);
  for (int e = 0; e < placement.num_experts(layer); ++e) {
    const auto servers = placement.ServersOf(ExpertKey(layer, e));
    for (int s : servers) loads[s] += expert_load[e] / servers.size();
  }
  return loads;
}

double Imbalance(absl::Span<const double> loads) {
  if (loads.empty()) return 1.0;
  const double total = std::accumulate(loads.begin(), loads.end(), 0.0);
  if (total <= 0) return 1.0;
  const double max = *std::max_element(loads.begin(), loads.end());
  return max / (total / loads.size());
}

double Imbalance(absl::Span<const double> loads, absl::Span<const int> slots) {
  MOE_CHECK(slots.size() == loads.size());
  std::vector<double> counted;
  for (size_t s = 0; s < loads.size(); ++s) {
    if (loads[s] > 0 || slots[s] > 0) counted.push_back(loads[s]);
  }
  return Imbalance(counted);
}

std::vector<ReplicaGroup> ReplicaGroups(const Placement& placement) {
  // std::map keyed by the server set keeps groups in a deterministic order;
  // they are re-sorted by first expert below.
  std::map<std::vector<int>, std::vector<ExpertKey>> experts_by_servers;
  for (int l = 0; l < placement.num_layers(); ++l) {
    for (int e = 0; e < placement.num_experts(l); ++e) {
      const ExpertKey expert(l, e);
      const auto servers = placement.ServersOf(expert);
      if (servers.size() < 2) continue;
      experts_by_servers[std::vector<int>(servers.begin(), servers.end())].push_back(expert);
    }
  }
  std::vector<ReplicaGroup> groups;
  for (auto& [servers, experts] : experts_by_servers) {
    ReplicaGroup group{servers, experts, 0};
    Fnv1a64 digest;
    digest.AddInts(group.servers);
    for (ExpertKey expert : group.experts) digest.AddInts({expert.layer, expert.expert});
    group.id = digest.value();
    groups.push_back(std::move(group));
  }
  std::sort(groups.begin(), groups.end(), [](const ReplicaGroup& a, const ReplicaGroup& b) {
    return a.experts.front() < b.experts.front();
  });
  return groups;
}

}  // namespace moe
