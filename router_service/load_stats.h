// Load over a sliding window: pairs served per expert and token rows sent
// per server, and pairs dropped, in one-second buckets, so GetClusterState
// and the metrics show recent load rather than all-time totals. Time is
// passed in (testable without sleeping). Thread-safe.
#ifndef MOE_ROUTER_SERVICE_LOAD_STATS_H_
#define MOE_ROUTER_SERVICE_LOAD_STATS_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace moe::router {

class LoadStats {
 public:
  struct Snapshot {
    absl::Duration window;
    // Layer-major: every layer's experts, layer 0's first.
    std::vector<int64_t> expert_tokens;
    std::vector<int64_t> server_tokens;
    int64_t dropped_pairs = 0;
    // max / mean (1 when idle).
    double expert_imbalance = 1;
    double server_imbalance = 1;
  };

  // `window` is rounded to whole seconds, at least one.
  LoadStats(int num_experts, int num_servers, absl::Duration window = absl::Seconds(60));

  // `expert_tokens` are of experts expert_offset, expert_offset + 1, ...
  // (one layer's experts, layer-major: expert e of layer l is l E + e).
  void Record(int64_t expert_offset, absl::Span<const int64_t> expert_tokens,
              absl::Span<const int64_t> server_tokens, int64_t dropped_pairs, absl::Time now)
      ABSL_LOCKS_EXCLUDED(mu_);
  Snapshot Get(absl::Time now) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Bucket {
    int64_t second = -1;  // Unix second this bucket holds, -1 when empty
    std::vector<int64_t> expert_tokens;
    std::vector<int64_t> server_tokens;
    int64_t dropped_pairs = 0;
  };

  const int num_experts_;
  const int num_servers_;
  const int64_t seconds_;
  mutable absl::Mutex mu_;
  std::vector<Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_LOAD_STATS_H_
