#include "router_service/load_stats.h"

#include <algorithm>

#include "common/placement.h"

namespace moe::router {

LoadStats::LoadStats(int num_experts, int num_servers, absl::Duration window)
    : num_experts_(num_experts),
      num_servers_(num_servers),
      seconds_(std::max<int64_t>(1, absl::ToInt64Seconds(window))),
      buckets_(seconds_) {}

void LoadStats::Record(int64_t expert_offset, absl::Span<const int64_t> expert_tokens,
                       absl::Span<const int64_t> server_tokens, int64_t dropped_pairs,
                       absl::Time now) {
  const int64_t second = absl::ToUnixSeconds(now);
  absl::MutexLock lock(&mu_);
  Bucket& bucket = buckets_[second % seconds_];
  if (bucket.second != second) {
    bucket.second = second;
    bucket.expert_tokens.assign(num_experts_, 0);
    bucket.server_tokens.assign(num_servers_, 0);
    bucket.dropped_pairs = 0;
  }
  for (size_t e = 0; e < expert_tokens.size(); ++e) {
    const int64_t at = expert_offset + static_cast<int64_t>(e);
    if (at >= 0 && at < num_experts_) bucket.expert_tokens[at] += expert_tokens[e];
  }
  for (size_t s = 0; s < server_tokens.size() && s < bucket.server_tokens.size(); ++s) {
    bucket.server_tokens[s] += server_tokens[s];
  }
  bucket.dropped_pairs += dropped_pairs;
}

LoadStats::Snapshot LoadStats::Get(absl::Time now) const {
  const int64_t second = absl::ToUnixSeconds(now);
  Snapshot snapshot;
  snapshot.window = absl::Seconds(seconds_);
  snapshot.expert_tokens.assign(num_experts_, 0);
  snapshot.server_tokens.assign(num_servers_, 0);
  {
    absl::MutexLock lock(&mu_);
    for (const Bucket& bucket : buckets_) {
      if (bucket.second < 0 || bucket.second <= second - seconds_ || bucket.second > second) {
        continue;  // empty, or older than the window
      }
      for (int e = 0; e < num_experts_; ++e) snapshot.expert_tokens[e] += bucket.expert_tokens[e];
      for (int s = 0; s < num_servers_; ++s) snapshot.server_tokens[s] += bucket.server_tokens[s];
      snapshot.dropped_pairs += bucket.dropped_pairs;
    }
  }
  snapshot.expert_imbalance = Imbalance(
      std::vector<double>(snapshot.expert_tokens.begin(), snapshot.expert_tokens.end()));
  snapshot.server_imbalance = Imbalance(
      std::vector<double>(snapshot.server_tokens.begin(), snapshot.server_tokens.end()));
  return snapshot;
}

}  // namespace moe::router
