#include "router_service/replica_picker.h"

#include <algorithm>

#include "common/log.h"

namespace moe::router {

ReplicaPicker::ReplicaPicker(int num_servers, const ExpertClient& health)
    : num_servers_(num_servers),
      health_(health),
      outstanding_(new std::atomic<int64_t>[num_servers]) {
  for (int s = 0; s < num_servers; ++s) outstanding_[s] = 0;
  absl::MutexLock lock(&stale_mu_);
  outliers_.resize(num_servers);
}

std::vector<int> ReplicaPicker::Candidates(const Placement& placement, ExpertKey expert,
                                           absl::Span<const int> excluded) const {
  MOE_CHECK(placement.num_servers() == num_servers_);
  std::vector<int> fresh, stale;
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&stale_mu_);
  for (int s : placement.ServersOf(expert)) {
    if (std::find(excluded.begin(), excluded.end(), s) != excluded.end()) continue;
    if (!health_.IsHealthy(s)) continue;
    auto it = stale_until_.find(std::make_pair(s, expert));
    const bool avoided =
        (it != stale_until_.end() && it->second > now) || outliers_[s].ejected_until > now;
    (avoided ? stale : fresh).push_back(s);
  }
  return fresh.empty() ? stale : fresh;
}

std::vector<std::pair<int, int64_t>> ReplicaPicker::Assign(const Placement& placement,
                                                           ExpertKey expert, int64_t count,
                                                           absl::Span<const int> excluded) {
  const std::vector<int> candidates = Candidates(placement, expert, excluded);
  if (candidates.empty()) return {};
  // Water-filling: each pair to the replica with the least load so far.
  std::vector<int64_t> load(candidates.size()), given(candidates.size(), 0);
  for (size_t i = 0; i < candidates.size(); ++i) load[i] = outstanding_[candidates[i]].load();
  for (int64_t pair = 0; pair < count; ++pair) {
    const size_t best = std::min_element(load.begin(), load.end()) - load.begin();
    ++load[best];
    ++given[best];
  }
  std::vector<std::pair<int, int64_t>> result;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (given[i] == 0) continue;
    outstanding_[candidates[i]] += given[i];
    result.emplace_back(candidates[i], given[i]);
  }
  return result;
}

int ReplicaPicker::PickOne(const Placement& placement, ExpertKey expert, int64_t count,
                           absl::Span<const int> excluded) {
  int best = -1;
  for (int s : Candidates(placement, expert, excluded)) {
    if (best < 0 || outstanding_[s].load() < outstanding_[best].load()) best = s;
  }
  if (best >= 0) outstanding_[best] += count;
  return best;
}

void ReplicaPicker::Release(int server, int64_t tokens) { outstanding_[server] -= tokens; }

bool ReplicaPicker::RecordFailure(int server, absl::Time now) {
  absl::MutexLock lock(&stale_mu_);
  Outlier& o = outliers_[server];
  if (o.ejected_until > now) return false;  // failures of calls sent before
  if (++o.failures_in_a_row < kEjectAfter) return false;
  o.failures_in_a_row = 0;
  o.ejected_until = now + kBaseEjection * (1 << std::min(o.ejections, 5));
  ++o.ejections;
  return true;
}

void ReplicaPicker::RecordSuccess(int server) {
  absl::MutexLock lock(&stale_mu_);
  outliers_[server] = Outlier{};
}

bool ReplicaPicker::Ejected(int server, absl::Time now) const {
  absl::MutexLock lock(&stale_mu_);
  return outliers_[server].ejected_until > now;
}

void ReplicaPicker::MarkStale(int server, ExpertKey expert, absl::Time until) {
  absl::MutexLock lock(&stale_mu_);
  stale_until_[std::make_pair(server, expert)] = until;
}

std::vector<ExpertKey> ReplicaPicker::StaleExperts(int server, absl::Time now) const {
  std::vector<ExpertKey> stale;
  absl::MutexLock lock(&stale_mu_);
  for (const auto& [key, until] : stale_until_) {
    if (key.first == server && until > now) stale.push_back(key.second);
  }
  std::sort(stale.begin(), stale.end());
  return stale;
}

}  // namespace moe::router
