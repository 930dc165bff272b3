// The experts that recent tokens chose, kept as a bounded sample: what the
// placement solver reads as co-activation (experts chosen by the same token
// should share a server). Each forward adds at most `per_request` of its
// tokens, evenly spaced; the newest `capacity` tokens are kept. Dropped
// pairs are left out (no server ran them). Thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTING_SAMPLE_H_
#define MOE_ROUTER_SERVICE_ROUTING_SAMPLE_H_

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/expert_key.h"
#include "common/gating.h"

namespace moe::router {

class RoutingSample {
 public:
  explicit RoutingSample(int capacity = 4096, int per_request = 64);

  void Record(const Routing& routing, int layer = 0) ABSL_LOCKS_EXCLUDED(mu_);
  // The kept tokens, each the experts it chose (oldest first).
  std::vector<std::vector<ExpertKey>> Tokens() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const size_t capacity_;
  const int64_t per_request_;
  mutable absl::Mutex mu_;
  std::vector<std::vector<ExpertKey>> ring_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTING_SAMPLE_H_
