#include "router_service/routing_sample.h"

#include <algorithm>

namespace moe::router {

RoutingSample::RoutingSample(int capacity, int per_request)
    : capacity_(static_cast<size_t>(std::max(capacity, 1))),
      per_request_(std::max(per_request, 1)) {}

void RoutingSample::Record(const Routing& routing, int layer) {
  const int64_t tokens = routing.num_tokens;
  if (tokens == 0) return;
  const int64_t stride = (tokens + per_request_ - 1) / per_request_;
  const PairIndex pairs = routing.pairs();
  std::vector<std::vector<ExpertKey>> sampled;
  for (int64_t t = 0; t < tokens; t += stride) {
    std::vector<ExpertKey> chosen;
    for (int j = 0; j < routing.top_k; ++j) {
      const int64_t p = pairs.Pair(t, j);
      if (!routing.dropped.empty() && routing.dropped[p]) continue;
      chosen.push_back(ExpertKey(layer, routing.expert_ids[p]));
    }
    if (!chosen.empty()) sampled.push_back(std::move(chosen));
  }
  absl::MutexLock lock(&mu_);
  for (auto& token : sampled) {
    if (ring_.size() < capacity_) {
      ring_.push_back(std::move(token));
    } else {
      ring_[next_] = std::move(token);
    }
    next_ = (next_ + 1) % capacity_;
  }
}

std::vector<std::vector<ExpertKey>> RoutingSample::Tokens() const {
  absl::MutexLock lock(&mu_);
  if (ring_.size() < capacity_) return ring_;
  std::vector<std::vector<ExpertKey>> ordered(ring_.begin() + next_, ring_.end());
  ordered.insert(ordered.end(), ring_.begin(), ring_.begin() + next_);
  return ordered;
}

}  // namespace moe::router
