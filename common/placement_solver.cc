#include "common/placement_solver.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <queue>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"

namespace moe {
namespace {

// Servers of each expert (experts of every layer flattened, layers in order).
using Assignment = std::vector<std::vector<int>>;
// For each expert, the experts chosen by the same tokens and how often.
using Affinity = std::vector<absl::flat_hash_map<int, double>>;

constexpr double kInfinity = std::numeric_limits<double>::infinity();

std::vector<double> LoadsOf(const Assignment& a, const std::vector<double>& load, int n) {
  std::vector<double> loads(n, 0.0);
  for (size_t i = 0; i < a.size(); ++i) {
    for (int s : a[i]) loads[s] += load[i] / a[i].size();
  }
  return loads;
}

double MaxLoad(const Assignment& a, const std::vector<double>& load, int n) {
  const std::vector<double> loads = LoadsOf(a, load, n);
  return *std::max_element(loads.begin(), loads.end());
}

// Whether `a` keeps within the servers' slots and `budget` replicas.
bool Fits(const Assignment& a, const std::vector<int>& slots, int64_t budget) {
  std::vector<int> used(slots.size(), 0);
  int64_t replicas = 0;
  for (const auto& servers : a) {
    for (int s : servers) ++used[s];
    replicas += static_cast<int64_t>(servers.size());
  }
  for (size_t s = 0; s < slots.size(); ++s) {
    if (used[s] > slots[s]) return false;
  }
  return replicas <= budget;
}

// Replicas of `a` that `reference` lacks.
int Added(const Assignment& a, const Assignment& reference) {
  int added = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    for (int s : a[i]) {
      added += std::find(reference[i].begin(), reference[i].end(), s) == reference[i].end();
    }
  }
  return added;
}

// The fewest servers that hold every expert of each token (greedy cover,
// exact for top-2), averaged over the tokens.
double ServersPerToken(const Assignment& a, const std::vector<std::vector<int>>& tokens, int n) {
  if (tokens.empty()) return 0;
  double total = 0;
  std::vector<int> covers(n);
  for (const std::vector<int>& token : tokens) {
    std::vector<int> left = token;
    while (!left.empty()) {
      std::fill(covers.begin(), covers.end(), 0);
      for (int i : left) {
        for (int s : a[i]) ++covers[s];
      }
      const int best =
          static_cast<int>(std::max_element(covers.begin(), covers.end()) - covers.begin());
      left.erase(std::remove_if(left.begin(), left.end(),
                                [&](int i) {
                                  return std::find(a[i].begin(), a[i].end(), best) != a[i].end();
                                }),
                 left.end());
      total += 1;
    }
  }
  return total / tokens.size();
}

// Each expert one replica, then each further slot to the expert with the
// highest load per replica (ties to the lower index), while that is above
// zero and the expert has a server left.
std::vector<int> ReplicaCounts(const std::vector<double>& load, int64_t budget, int max_each) {
  std::vector<int> replicas(load.size(), 1);
  auto lower = [&](int a, int b) {  // true when b goes first
    const double la = load[a] / replicas[a], lb = load[b] / replicas[b];
    return la != lb ? la < lb : a > b;
  };
  std::priority_queue<int, std::vector<int>, decltype(lower)> next(lower);
  for (size_t i = 0; i < load.size(); ++i) next.push(static_cast<int>(i));
  for (int64_t extra = budget - static_cast<int64_t>(load.size()); extra > 0 && !next.empty();) {
    const int i = next.top();
    next.pop();
    if (load[i] <= 0) break;
    if (replicas[i] >= max_each) continue;
    ++replicas[i];
    --extra;
    next.push(i);
  }
  return replicas;
}

struct PackOptions {
  const std::vector<int>* slots = nullptr;
  // Prefer servers that already hold the expert (no copy).
  const Assignment* current = nullptr;
  const Affinity* affinity = nullptr;
  // Extra load accepted to follow those preferences, above the larger of
  // the least a server could reach now and `target` (the final max load's
  // lower bound: a server may fill up to it in any order).
  double tolerance = 0;
  double target = 0;
};

// Heaviest replica first (load per replica), each onto the server where the
// max load grows least; among servers within `tolerance` of that, one that
// already holds the expert, then the one with most co-chosen experts, then
// the least loaded, then the lowest id. An extra replica is dropped rather
// than take a slot an expert's only replica needs.
Assignment Pack(const std::vector<int>& replicas, const std::vector<double>& load,
                const PackOptions& options) {
  const std::vector<int>& slots = *options.slots;
  const int n = static_cast<int>(slots.size());
  struct Replica {
    int item;
    double weight;
    bool first;
  };
  std::vector<Replica> order;
  for (size_t i = 0; i < replicas.size(); ++i) {
    for (int r = 0; r < replicas[i]; ++r) {
      order.push_back({static_cast<int>(i), load[i] / replicas[i], r == 0});
    }
  }
  std::stable_sort(order.begin(), order.end(), [](const Replica& a, const Replica& b) {
    if (a.weight != b.weight) return a.weight > b.weight;
    if (a.item != b.item) return a.item < b.item;
    return a.first && !b.first;
  });
  Assignment a(replicas.size());
  std::vector<double> server_load(n, 0.0);
  std::vector<int> used(n, 0);
  std::vector<std::vector<bool>> holds(n, std::vector<bool>(replicas.size(), false));
  int64_t free_slots = std::accumulate(slots.begin(), slots.end(), int64_t{0});
  int64_t firsts_left = static_cast<int64_t>(replicas.size());
  for (const Replica& replica : order) {
    if (!replica.first && free_slots - 1 < firsts_left) continue;
    double best = kInfinity;
    for (int s = 0; s < n; ++s) {
      if (used[s] < slots[s] && !holds[s][replica.item]) {
        best = std::min(best, server_load[s] + replica.weight);
      }
    }
    if (best == kInfinity) continue;  // an extra replica with nowhere to go
    int chosen = -1;
    bool chosen_keeps = false;
    double chosen_affinity = 0;
    for (int s = 0; s < n; ++s) {
      if (used[s] >= slots[s] || holds[s][replica.item]) continue;
      const double after = server_load[s] + replica.weight;
      if (after > std::max(best, options.target) + options.tolerance) continue;
      const bool keeps =
          options.current != nullptr && std::find((*options.current)[replica.item].begin(),
                                                  (*options.current)[replica.item].end(),
                                                  s) != (*options.current)[replica.item].end();
      double affinity = 0;
      if (options.affinity != nullptr) {
        for (const auto& [other, count] : (*options.affinity)[replica.item]) {
          if (holds[s][other]) affinity += count;
        }
      }
      bool better;
      if (chosen < 0) {
        better = true;
      } else if (keeps != chosen_keeps) {
        better = keeps;
      } else if (affinity != chosen_affinity) {
        better = affinity > chosen_affinity;
      } else {
        better = after < server_load[chosen] + replica.weight;  // equal: the lower id
      }
      if (better) {
        chosen = s;
        chosen_keeps = keeps;
        chosen_affinity = affinity;
      }
    }
    a[replica.item].push_back(chosen);
    holds[chosen][replica.item] = true;
    server_load[chosen] += replica.weight;
    ++used[chosen];
    --free_slots;
    if (replica.first) --firsts_left;
  }
  for (auto& servers : a) std::sort(servers.begin(), servers.end());
  return a;
}

// Lowers the max server load while one change helps: a replica on the most
// loaded server moves to another server with room, swaps with a lighter
// one, gets another replica elsewhere (within `budget`), or is dropped (if
// its expert has others).
void Improve(Assignment& a, const std::vector<double>& load, const std::vector<int>& slots,
             int64_t budget) {
  const int n = static_cast<int>(slots.size());
  std::vector<std::vector<int>> on(n);
  int64_t replicas = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    for (int s : a[i]) on[s].push_back(static_cast<int>(i));
    replicas += static_cast<int64_t>(a[i].size());
  }
  auto holds = [&](int s, int i) { return std::find(a[i].begin(), a[i].end(), s) != a[i].end(); };
  std::vector<double> loads = LoadsOf(a, load, n);
  // The max load after adding each change's delta to its server.
  std::vector<double> after(n);
  auto max_after = [&](const std::vector<std::pair<int, double>>& changes) {
    after = loads;
    for (const auto& [server, delta] : changes) after[server] += delta;
    return *std::max_element(after.begin(), after.end());
  };
  enum class Kind { kMove, kSwap, kReplicate, kDrop };
  for (int round = 0; round < 10000; ++round) {
    const int top = static_cast<int>(std::max_element(loads.begin(), loads.end()) - loads.begin());
    double best = loads[top] - 1e-9;  // a change must lower the max
    Kind kind = Kind::kMove;
    int item = -1, other = -1, server = -1;
    for (int i : on[top]) {
      const double r = static_cast<double>(a[i].size());
      const double w = load[i] / r;
      for (int t = 0; t < n; ++t) {
        if (t == top || holds(t, i)) continue;
        const bool room = static_cast<int>(on[t].size()) < slots[t];
        if (room) {
          const double m = max_after({{top, -w}, {t, w}});
          if (m < best) best = m, kind = Kind::kMove, item = i, server = t;
          if (replicas < budget) {
            std::vector<std::pair<int, double>> changes = {{t, load[i] / (r + 1)}};
            for (int s : a[i]) changes.push_back({s, load[i] / (r + 1) - w});
            const double m2 = max_after(changes);
            if (m2 < best) best = m2, kind = Kind::kReplicate, item = i, server = t;
          }
        }
        for (int j : on[t]) {
          const double v = load[j] / a[j].size();
          if (v >= w || holds(top, j)) continue;
          const double m = max_after({{top, v - w}, {t, w - v}});
          if (m < best) best = m, kind = Kind::kSwap, item = i, server = t, other = j;
        }
      }
      if (r > 1) {
        std::vector<std::pair<int, double>> changes = {{top, -w}};
        for (int s : a[i]) {
          if (s != top) changes.push_back({s, load[i] / (r - 1) - w});
        }
        const double m = max_after(changes);
        if (m < best) best = m, kind = Kind::kDrop, item = i;
      }
    }
    if (item < 0) break;
    auto take = [&](int i, int from) {
      a[i].erase(std::find(a[i].begin(), a[i].end(), from));
      on[from].erase(std::find(on[from].begin(), on[from].end(), i));
    };
    auto put = [&](int i, int to) {
      a[i].push_back(to);
      on[to].push_back(i);
    };
    switch (kind) {
      case Kind::kMove:
        take(item, top), put(item, server);
        break;
      case Kind::kSwap:
        take(item, top), put(item, server), take(other, server), put(other, top);
        break;
      case Kind::kReplicate:
        put(item, server), ++replicas;
        break;
      case Kind::kDrop:
        take(item, top), --replicas;
        break;
    }
    loads = LoadsOf(a, load, n);
  }
  for (auto& servers : a) std::sort(servers.begin(), servers.end());
}

// Minimum-cost perfect matching of rows to columns (Hungarian algorithm,
// O(n^3)); cost[r][c] may be kInfinity. Returns the column of each row.
std::vector<int> Hungarian(const std::vector<std::vector<double>>& cost) {
  const int n = static_cast<int>(cost.size());
  constexpr double kBig = 1e18;
  auto c = [&](int r, int col) { return cost[r][col] == kInfinity ? kBig : cost[r][col]; };
  std::vector<double> u(n + 1, 0), v(n + 1, 0);
  std::vector<int> p(n + 1, 0), way(n + 1, 0);
  for (int r = 1; r <= n; ++r) {
    p[0] = r;
    int j0 = 0;
    std::vector<double> minv(n + 1, kBig * 4);
    std::vector<bool> used(n + 1, false);
    do {
      used[j0] = true;
      const int i0 = p[j0];
      double delta = kBig * 4;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const double cur = c(i0 - 1, j - 1) - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;
      }
      for (int j = 0; j <= n; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> column_of(n);
  for (int j = 1; j <= n; ++j) column_of[p[j] - 1] = j - 1;
  return column_of;
}

// The same packing with its servers renamed so that as many replicas as
// possible stay where `current` has them (a server's replicas all move
// together, so loads and co-location are unchanged); a server takes another's
// replicas only if it has the slots for them.
Assignment Relabel(const Assignment& a, const Assignment& current, const std::vector<int>& slots) {
  const int n = static_cast<int>(slots.size());
  std::vector<std::vector<double>> cost(n, std::vector<double>(n, 0.0));
  std::vector<int> count(n, 0);
  for (size_t i = 0; i < a.size(); ++i) {
    for (int s : a[i]) ++count[s];
  }
  for (size_t i = 0; i < a.size(); ++i) {
    for (int from : a[i]) {
      for (int to : current[i]) cost[from][to] -= 1;
    }
  }
  for (int from = 0; from < n; ++from) {
    for (int to = 0; to < n; ++to) {
      if (count[from] > slots[to]) cost[from][to] = kInfinity;
    }
  }
  const std::vector<int> to = Hungarian(cost);
  Assignment renamed(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    for (int s : a[i]) renamed[i].push_back(to[s]);
    std::sort(renamed[i].begin(), renamed[i].end());
  }
  // The identity is a candidate too (the matching is optimal, but not
  // every cost is finite in every row).
  return Added(renamed, current) <= Added(a, current) ? renamed : a;
}

// Every placement within the budget, when there are few: the least max
// load, then the fewest new replicas, then the fewest servers per token.
std::optional<Assignment> Exhaustive(const std::vector<double>& load, const std::vector<int>& slots,
                                     int64_t total_slots, const Assignment* current,
                                     const std::vector<std::vector<int>>& tokens, int64_t limit) {
  const int n = static_cast<int>(slots.size());
  const int items = static_cast<int>(load.size());
  if (n > 20) return std::nullopt;
  const int64_t subsets = (int64_t{1} << n) - 1;
  double candidates = 1;
  for (int i = 0; i < items; ++i) {
    candidates *= static_cast<double>(subsets);
    if (candidates > static_cast<double>(limit)) return std::nullopt;
  }
  std::optional<Assignment> best;
  double best_max = kInfinity;
  int best_added = 0;
  double best_tokens = 0;
  Assignment a(items);
  std::vector<int> used(n, 0);
  std::vector<double> loads(n, 0.0);
  int64_t replicas = 0;
  std::function<void(int)> visit = [&](int i) {
    if (i == items) {
      const double max = *std::max_element(loads.begin(), loads.end());
      const int added = current != nullptr ? Added(a, *current) : 0;
      const bool tie = best.has_value() && max >= best_max - 1e-9;
      if (tie && added > best_added) return;
      const double per_token = ServersPerToken(a, tokens, n);
      if (tie && added == best_added && per_token >= best_tokens) return;
      best = a, best_max = max, best_added = added, best_tokens = per_token;
      return;
    }
    for (int64_t mask = 1; mask <= subsets; ++mask) {
      a[i].clear();
      bool fits = true;
      for (int s = 0; s < n; ++s) {
        if ((mask >> s) & 1) {
          a[i].push_back(s);
          fits = fits && used[s] < slots[s];
        }
      }
      const int64_t size = static_cast<int64_t>(a[i].size());
      // Room for this expert's replicas and one for each expert after it.
      if (!fits || replicas + size + (items - i - 1) > total_slots) continue;
      const double share = load[i] / size;
      // Loads only grow as experts are added: prune what is already worse.
      bool within = true;
      for (int s : a[i]) within = within && loads[s] + share <= best_max + 1e-9;
      if (!within) continue;
      for (int s : a[i]) ++used[s], loads[s] += share;
      replicas += size;
      visit(i + 1);
      replicas -= size;
      for (int s : a[i]) --used[s], loads[s] -= share;
    }
    a[i].clear();
  };
  visit(0);
  return best;
}

}  // namespace

absl::StatusOr<PlacementPlan> SolvePlacement(const PlacementProblem& problem) {
  const int n = problem.num_servers;
  if (n < 1) return absl::InvalidArgumentError("placement solver: needs at least one server");
  if (static_cast<int>(problem.server_slots.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement solver: ", problem.server_slots.size(), " server slot counts for ",
                     n, " servers"));
  }
  if (problem.load.empty()) return absl::InvalidArgumentError("placement solver: no layers");
  // Flatten (layer, expert) into items.
  std::vector<ExpertKey> keys;
  std::vector<double> load;
  std::vector<int> first_of_layer;
  for (size_t l = 0; l < problem.load.size(); ++l) {
    if (problem.load[l].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement solver: layer ", l, " has no experts"));
    }
    first_of_layer.push_back(static_cast<int>(keys.size()));
    for (size_t e = 0; e < problem.load[l].size(); ++e) {
      const double value = problem.load[l][e];
      const ExpertKey key(static_cast<int32_t>(l), static_cast<int32_t>(e));
      if (!std::isfinite(value) || value < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement solver: load of ", key.ToString(), " is ", value));
      }
      keys.push_back(key);
      load.push_back(value);
    }
  }
  const int items = static_cast<int>(keys.size());
  int64_t capacity = 0;
  int servers_with_room = 0;
  for (int s = 0; s < n; ++s) {
    if (problem.server_slots[s] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement solver: server ", s, " has ", problem.server_slots[s], " slots"));
    }
    capacity += problem.server_slots[s];
    servers_with_room += problem.server_slots[s] > 0;
  }
  const int64_t budget =
      problem.total_slots > 0 ? std::min<int64_t>(problem.total_slots, capacity) : capacity;
  if (budget < items) {
    return absl::InvalidArgumentError(absl::StrCat("placement solver: a budget of ", budget,
                                                   " replicas cannot hold ", items,
                                                   " experts once"));
  }
  auto index_of = [&](ExpertKey key) -> int {
    if (key.layer < 0 || key.layer >= static_cast<int>(problem.load.size()) || key.expert < 0 ||
        key.expert >= static_cast<int>(problem.load[key.layer].size())) {
      return -1;
    }
    return first_of_layer[key.layer] + key.expert;
  };
  std::optional<Assignment> current;
  if (problem.current.has_value()) {
    const Placement& placement = *problem.current;
    bool same = placement.num_servers() == n &&
                placement.num_layers() == static_cast<int>(problem.load.size());
    for (int l = 0; same && l < placement.num_layers(); ++l) {
      same = placement.num_experts(l) == static_cast<int>(problem.load[l].size());
    }
    if (!same) {
      return absl::InvalidArgumentError(
          "placement solver: the current placement has other servers, layers or experts");
    }
    current.emplace(items);
    for (int i = 0; i < items; ++i) {
      const auto servers = placement.ServersOf(keys[i]);
      (*current)[i].assign(servers.begin(), servers.end());
    }
  }
  std::vector<std::vector<int>> tokens;
  Affinity affinity(items);
  for (const std::vector<ExpertKey>& chosen : problem.token_experts) {
    std::vector<int> token;
    for (ExpertKey key : chosen) {
      const int i = index_of(key);
      if (i < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement solver: a sampled token names unknown ", key.ToString()));
      }
      token.push_back(i);
    }
    for (size_t a = 0; a < token.size(); ++a) {
      for (size_t b = 0; b < token.size(); ++b) {
        if (a != b) affinity[token[a]][token[b]] += 1;
      }
    }
    tokens.push_back(std::move(token));
  }

  const double total_load = std::accumulate(load.begin(), load.end(), 0.0);
  PackOptions options;
  options.slots = &problem.server_slots;
  options.affinity = tokens.empty() ? nullptr : &affinity;
  options.tolerance = problem.tolerance * total_load / n;
  const std::vector<int> counts = ReplicaCounts(load, budget, servers_with_room);
  for (size_t i = 0; i < counts.size(); ++i) {
    options.target = std::max(options.target, load[i] / counts[i]);
  }
  options.target = std::max(options.target, total_load / servers_with_room);

  Assignment chosen;
  bool exhaustive = false;
  if (problem.exhaustive_limit > 0) {
    if (std::optional<Assignment> best =
            Exhaustive(load, problem.server_slots, budget, current ? &*current : nullptr, tokens,
                       problem.exhaustive_limit)) {
      chosen = *std::move(best);
      exhaustive = true;
    }
  }
  if (!exhaustive) {
    // A fresh solve (as EPLB does), renamed to keep what it can.
    Assignment fresh = Pack(counts, load, options);
    Improve(fresh, load, problem.server_slots, budget);
    chosen = fresh;
    if (current) {
      fresh = Relabel(fresh, *current, problem.server_slots);
      // And one that prefers the servers holding an expert already: the
      // better balanced of the two that copies no more than the fresh one.
      PackOptions keep = options;
      keep.current = &*current;
      Assignment kept = Pack(counts, load, keep);
      Improve(kept, load, problem.server_slots, budget);
      kept = Relabel(kept, *current, problem.server_slots);
      const double fresh_max = MaxLoad(fresh, load, n), kept_max = MaxLoad(kept, load, n);
      const bool take_kept =
          Added(kept, *current) <= Added(fresh, *current) &&
          (kept_max <= fresh_max || Added(kept, *current) < Added(fresh, *current));
      chosen = take_kept ? kept : fresh;
    }
  }
  // Hysteresis: the current placement stays when it is within the tolerance
  // of the best found (and within the budget): nothing moves for nothing.
  if (current && Fits(*current, problem.server_slots, budget) &&
      MaxLoad(*current, load, n) <= MaxLoad(chosen, load, n) + options.tolerance + 1e-9) {
    chosen = *current;
  }

  PlacementPlan plan{*Placement::CreateLayers(n, [&] {
    std::vector<std::vector<std::vector<int>>> servers(problem.load.size());
    for (int i = 0; i < items; ++i) servers[keys[i].layer].push_back(chosen[i]);
    return servers;
  }())};
  for (const auto& servers : chosen) plan.replicas.push_back(static_cast<int>(servers.size()));
  plan.exhaustive = exhaustive;
  plan.server_load_after = LoadsOf(chosen, load, n);
  plan.imbalance_after = Imbalance(plan.server_load_after, problem.server_slots);
  plan.servers_per_token_after = ServersPerToken(chosen, tokens, n);
  if (current) {
    plan.server_load_before = LoadsOf(*current, load, n);
    plan.imbalance_before = Imbalance(plan.server_load_before, problem.server_slots);
    plan.servers_per_token_before = ServersPerToken(*current, tokens, n);
    plan.replicas_added = Added(chosen, *current);
    plan.replicas_removed = Added(*current, chosen);
    plan.bytes_moved = plan.replicas_added * problem.replica_bytes;
  }
  return plan;
}

}  // namespace moe
