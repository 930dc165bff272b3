// One rank's part of a ring all-reduce (fp32 sum) over a replica group.
//
// The buffer is split into N chunks (chunk c is [c*L/N, (c+1)*L/N)), each
// into segments of at most `segment_elements`. Reduce-scatter step s: rank r
// sends chunk (r-s) mod N to its successor and adds chunk (r-s-1) from its
// predecessor; after N-1 steps rank r holds the sum of chunk (r+1). All-gather
// step s: rank r sends chunk (r+1-s) and copies chunk (r-s). Segments are
// forwarded as soon as they arrive (a segment of reduce-scatter step s is
// what step s+1 sends), so receiving, adding and sending overlap. Each chunk's
// sum is made once, in ring order, and then copied: every rank ends with the
// same bits. Each rank sends 2(N-1)/N of the buffer.
//
// Transport-free: segments leave through a RingLink to the successor and
// arrive through OnChunk (the registry calls it).
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_RING_ALLREDUCE_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_RING_ALLREDUCE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "expert_service/allreduce/ring_link.h"

namespace moe::allreduce {

struct RingOptions {
  // Pipeline segment: 256 Ki floats = 1 MiB.
  int64_t segment_elements = int64_t{1} << 18;
  // Segments sent and not yet acknowledged, at most.
  int window_segments = 4;
};

class RingAllReduce : public std::enable_shared_from_this<RingAllReduce> {
 public:
  struct Spec {
    uint64_t step = 0;
    uint64_t group_id = 0;
    int rank = 0;
    int size = 1;
    // For messages.
    std::string predecessor;
    std::string successor;
    // Summed in place; owned by the collective, so segments in flight can
    // point into it until their acks come, even after a failure.
    std::vector<float> buffer;
  };

  // `successor` must outlive the collective (unused when size is 1). Shared:
  // acks that come late (after a failure) still find it.
  static std::shared_ptr<RingAllReduce> Create(Spec spec, RingOptions options,
                                               RingLink* successor);

  // Sends the first segments; returns at once.
  void Start() ABSL_LOCKS_EXCLUDED(mu_);
  // A segment from the predecessor. The status goes back to the sender in
  // its ack; a rejected segment also fails this collective.
  absl::Status OnChunk(const ReceivedRingSegment& segment) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the collective with `status` (aborted, predecessor gone); the
  // first failure wins.
  void Fail(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_);
  // The stream from the predecessor ended: fails with `why` unless every
  // segment from it has arrived.
  void PredecessorLost(const absl::Status& why) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until every segment is received and acknowledged, the collective
  // fails, or `deadline` passes (then DEADLINE_EXCEEDED saying what it was
  // waiting for). Returns the collective's status; after a failure, sends
  // still in flight are not waited for.
  absl::Status Wait(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // The sums. REQUIRES: Wait() returned OK.
  std::vector<float> TakeBuffer() ABSL_LOCKS_EXCLUDED(mu_);

  uint64_t step() const { return spec_.step; }
  uint64_t group_id() const { return spec_.group_id; }
  // Payload bytes this rank sent.
  int64_t bytes_sent() const ABSL_LOCKS_EXCLUDED(mu_);
  // "step S group G" for messages.
  std::string Name() const;

 private:
  struct Segment {
    RingPhase phase;
    int ring_step;
    int chunk;
    int64_t offset;
    int64_t length;
  };

  RingAllReduce(Spec spec, RingOptions options, RingLink* successor);

  int64_t ChunkBegin(int chunk) const;
  int64_t ChunkEnd(int chunk) const { return ChunkBegin(chunk + 1); }
  int64_t SegmentsIn(int chunk) const;
  int Mod(int v) const { return ((v % spec_.size) + spec_.size) % spec_.size; }
  // The chunk rank r receives at (phase, ring_step).
  int ReceivedChunk(RingPhase phase, int ring_step) const;
  // Queues every segment of `chunk` to send at (phase, ring_step).
  void QueueChunk(RingPhase phase, int ring_step, int chunk)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts sends while the window has room (or passes a failure on);
  // chunks are built here, from the buffer as it is now.
  void Pump() ABSL_LOCKS_EXCLUDED(mu_);
  void OnAck(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_);
  // OnChunk's work; `pump` says whether something is now to be sent.
  absl::Status Receive(const ReceivedRingSegment& segment, bool& pump)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Validate(const ReceivedRingSegment& segment) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Finished() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status WaitLocked(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // spec_.buffer is written under mu_ (sums) and read by gRPC while a
  // segment is in flight (never the same elements at the same time: a
  // region changes again only after its segment went round the ring).
  Spec spec_;
  const RingOptions options_;
  RingLink* const successor_;

  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::deque<Segment> to_send_ ABSL_GUARDED_BY(mu_);
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sends_expected_ = 0;
  int64_t receives_expected_ = 0;
  int64_t acked_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  // Next expected offset per (phase, ring_step): segments of one step arrive
  // in order, so this catches a lost, repeated or misplaced segment.
  std::vector<int64_t> next_offset_ ABSL_GUARDED_BY(mu_);
  bool pumping_ ABSL_GUARDED_BY(mu_) = false;
  // The failure still to pass on to the successor.
  bool abort_pending_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_RING_ALLREDUCE_H_
