// Routes the segments that arrive on a server's Collective streams to the
// collective they belong to, by (step, group). A segment may arrive before
// this server has started its side of the step (the predecessor started
// first): it is parked, and its stream not read further, until the
// collective starts here, the step is aborted, or `park_timeout` passes.
// A segment of a step that is over or older than the one running, or of a
// group this server is not in, is rejected at once. Thread-safe.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_REGISTRY_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/deadline_timer.h"
#include "expert_service/allreduce/ring_allreduce.h"

namespace moe::allreduce {

class CollectiveRegistry {
 public:
  using Ack = absl::AnyInvocable<void(absl::Status) &&>;

  explicit CollectiveRegistry(absl::Duration park_timeout = absl::Seconds(30));
  ~CollectiveRegistry();

  // Groups this server belongs to; segments of others are rejected.
  // Placement changes add and remove groups at run time; removing one fails
  // its running collective and rejects its parked segments.
  void AddGroup(uint64_t group_id) ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveGroup(uint64_t group_id) ABSL_LOCKS_EXCLUDED(mu_);
  bool HasGroup(uint64_t group_id) const ABSL_LOCKS_EXCLUDED(mu_);

  // Makes `collective` receive its segments (those parked first, in order).
  // At most one collective per group at a time.
  void Register(std::shared_ptr<RingAllReduce> collective) ABSL_LOCKS_EXCLUDED(mu_);
  // Stops routing to it; later segments of its step are rejected.
  void Unregister(const RingAllReduce& collective) ABSL_LOCKS_EXCLUDED(mu_);

  // A segment from a stream. `segment` stays valid until `ack` runs; `ack`
  // runs once, with the verdict to send back.
  void Deliver(const ReceivedRingSegment* segment, Ack ack) ABSL_LOCKS_EXCLUDED(mu_);

  // The stream that brought segments of `groups` ended: their running
  // collectives fail with UNAVAILABLE (`why` names the peer).
  void PredecessorLost(const std::vector<uint64_t>& groups, const absl::Status& why)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Rejects parked and later segments and fails what runs (before the gRPC
  // server shuts down: a parked segment holds its stream open).
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // Fails the running collectives of `step` and rejects its parked segments.
  void AbortStep(uint64_t step, const absl::Status& why) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Parked {
    const ReceivedRingSegment* segment;
    Ack ack;
    uint64_t timer_id;
  };
  struct Group {
    std::shared_ptr<RingAllReduce> running;
    // Steps <= over are finished here; their segments are stale.
    uint64_t over = 0;
    bool has_over = false;
    std::vector<std::unique_ptr<Parked>> parked;
  };

  void Expire(uint64_t group_id, Parked* parked) ABSL_LOCKS_EXCLUDED(mu_);

  const absl::Duration park_timeout_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Group> groups_ ABSL_GUARDED_BY(mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  // Steps aborted here, whose segments are refused; the largest go first.
  static constexpr size_t kMaxAborted = 64;
  absl::btree_set<uint64_t> aborted_ ABSL_GUARDED_BY(mu_);
  // Last: its thread must stop before the state its callbacks touch goes.
  DeadlineTimer timer_;
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_REGISTRY_H_
