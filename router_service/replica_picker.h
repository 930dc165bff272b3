// Chooses which replica serves each (token, expert) pair: the healthy one
// with the fewest tokens outstanding, counting the pairs assigned so far in
// the same request. Outstanding counts are released as answers come back.
// The placement is the caller's (the snapshot its request started with);
// the counts are per server, across placements. Thread-safe.
#ifndef MOE_ROUTER_SERVICE_REPLICA_PICKER_H_
#define MOE_ROUTER_SERVICE_REPLICA_PICKER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "common/expert_key.h"
#include "common/placement.h"
#include "router_service/expert_client.h"

namespace moe::router {

class ReplicaPicker {
 public:
  // Servers are [0, num_servers). `health` must outlive the picker.
  ReplicaPicker(int num_servers, const ExpertClient& health);

  // Splits `count` pairs of `expert` over its healthy replicas not in
  // `excluded`, one pair at a time to the least loaded (ties: lower server
  // id), and adds them to the outstanding counts. Returns (server, pairs)
  // for servers given at least one; empty when no replica is available.
  std::vector<std::pair<int, int64_t>> Assign(const Placement& placement, ExpertKey expert,
                                              int64_t count, absl::Span<const int> excluded);
  // All `count` pairs to the single least loaded healthy replica not in
  // `excluded` (failover re-sends a whole group); -1 when there is none.
  int PickOne(const Placement& placement, ExpertKey expert, int64_t count,
              absl::Span<const int> excluded);
  void Release(int server, int64_t tokens);
  int64_t outstanding(int server) const { return outstanding_[server].load(); }

 private:
  const int num_servers_;
  const ExpertClient& health_;
  std::unique_ptr<std::atomic<int64_t>[]> outstanding_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_REPLICA_PICKER_H_
