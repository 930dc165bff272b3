// Chooses which replica serves each (token, expert) pair: the healthy one
// with the fewest tokens outstanding, counting the pairs assigned so far in
// the same request. Outstanding counts are released as answers come back.
// The placement is the caller's (the snapshot its request started with);
// the counts are per server, across placements. A replica that answered
// from older weights than the call's (a restarted server that could not
// sync) is marked stale for a while, and one that keeps failing is ejected
// for a while: other replicas are preferred, so requests stop paying a
// refused or failed round trip to it. Thread-safe.
#ifndef MOE_ROUTER_SERVICE_REPLICA_PICKER_H_
#define MOE_ROUTER_SERVICE_REPLICA_PICKER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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

  // `server`'s copy of `expert` is behind the cluster's step: avoided
  // until `until` (then tried again by real traffic), unless every healthy
  // replica is stale (the call then fails naming the versions).
  void MarkStale(int server, ExpertKey expert, absl::Time until) ABSL_LOCKS_EXCLUDED(stale_mu_);
  // The experts marked stale on `server` at `now`, ascending.
  std::vector<ExpertKey> StaleExperts(int server, absl::Time now) const
      ABSL_LOCKS_EXCLUDED(stale_mu_);
  int64_t outstanding(int server) const { return outstanding_[server].load(); }

  // Outlier ejection (as Envoy's): after kEjectAfter failures in a row
  // that say the server is in trouble (unavailable, overloaded, internal),
  // it is avoided for kBaseEjection doubled per ejection before (up to
  // 32 times), unless nothing else can serve; then traffic tries it again.
  // A success resets both counts. RecordFailure returns true when it
  // ejected the server.
  static constexpr int kEjectAfter = 5;
  static constexpr absl::Duration kBaseEjection = absl::Seconds(1);
  bool RecordFailure(int server, absl::Time now) ABSL_LOCKS_EXCLUDED(stale_mu_);
  void RecordSuccess(int server) ABSL_LOCKS_EXCLUDED(stale_mu_);
  bool Ejected(int server, absl::Time now) const ABSL_LOCKS_EXCLUDED(stale_mu_);

 private:
  // Healthy replicas of `expert` not in `excluded`; the stale ones only
  // when there is nothing else.
  std::vector<int> Candidates(const Placement& placement, ExpertKey expert,
                              absl::Span<const int> excluded) const ABSL_LOCKS_EXCLUDED(stale_mu_);

  const int num_servers_;
  const ExpertClient& health_;
  std::unique_ptr<std::atomic<int64_t>[]> outstanding_;
  mutable absl::Mutex stale_mu_;
  absl::flat_hash_map<std::pair<int, ExpertKey>, absl::Time> stale_until_
      ABSL_GUARDED_BY(stale_mu_);
  struct Outlier {
    int failures_in_a_row = 0;
    int ejections = 0;
    absl::Time ejected_until = absl::InfinitePast();
  };
  std::vector<Outlier> outliers_ ABSL_GUARDED_BY(stale_mu_);
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_REPLICA_PICKER_H_
