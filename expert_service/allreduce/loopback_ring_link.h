// RingLink into another rank's CollectiveRegistry in this process: the
// in-process version of GrpcRingLink, for tests and in-process clusters.
// Segments are delivered in order, one at a time, on the link's own thread
// (as a gRPC stream whose reader acks before reading on); by default the
// receiver reads the sender's floats in place. Fails on command: Break()
// fails every later send and ends the receiver's collective of its group,
// as a dead connection would; Stall() holds sends as a stopped peer would.
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_LOOPBACK_RING_LINK_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_LOOPBACK_RING_LINK_H_

#include <deque>
#include <functional>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/ring_link.h"

namespace moe::allreduce {

class LoopbackRingLink final : public RingLink {
 public:
  // How a sent segment reaches the receiver (a test passes one that goes
  // through the wire encoding). The result must stay valid on its own.
  using Carry = std::function<std::unique_ptr<ReceivedRingSegment>(const RingHeader&,
                                                                   absl::Span<const float>)>;

  // `target` must outlive the link. Empty `carry`: a SpanSegment over the
  // sender's floats (valid until the ack, which is all the receiver needs).
  explicit LoopbackRingLink(CollectiveRegistry* target, Carry carry = nullptr);
  // Fails what is still queued (UNAVAILABLE) and stops the thread.
  ~LoopbackRingLink() override;

  void Send(const RingHeader& header, absl::Span<const float> data, AckDone done) override;

  void Break() ABSL_LOCKS_EXCLUDED(mu_);
  void Stall() ABSL_LOCKS_EXCLUDED(mu_);
  // Undoes Break() and Stall(); held segments go on.
  void Heal() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Item {
    std::unique_ptr<ReceivedRingSegment> segment;
    AckDone done;
  };
  void Loop();

  CollectiveRegistry* const target_;
  const Carry carry_;
  absl::Mutex mu_;
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool stalled_ ABSL_GUARDED_BY(mu_) = false;
  // Last: started once the state above exists.
  std::thread thread_;
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_LOOPBACK_RING_LINK_H_
