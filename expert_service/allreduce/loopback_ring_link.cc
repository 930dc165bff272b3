#include "expert_service/allreduce/loopback_ring_link.h"

#include <utility>

#include "absl/synchronization/notification.h"

namespace moe::allreduce {

LoopbackRingLink::LoopbackRingLink(CollectiveRegistry* target, Carry carry)
    : target_(target), carry_(std::move(carry)), thread_([this] { Loop(); }) {}

LoopbackRingLink::~LoopbackRingLink() {
  std::deque<Item> left;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
  {
    absl::MutexLock lock(&mu_);
    left.swap(queue_);
  }
  for (Item& item : left) std::move(item.done)(absl::UnavailableError("ring link closed"));
}

void LoopbackRingLink::Send(const RingHeader& header, absl::Span<const float> data,
                            AckDone done) {
  std::unique_ptr<ReceivedRingSegment> segment =
      carry_ ? carry_(header, data) : std::make_unique<SpanSegment>(header, data);
  absl::MutexLock lock(&mu_);
  queue_.push_back({std::move(segment), std::move(done)});
}

void LoopbackRingLink::Break() {
  absl::MutexLock lock(&mu_);
  broken_ = true;
}

void LoopbackRingLink::Stall() {
  absl::MutexLock lock(&mu_);
  stalled_ = true;
}

void LoopbackRingLink::Heal() {
  absl::MutexLock lock(&mu_);
  broken_ = false;
  stalled_ = false;
}

void LoopbackRingLink::Loop() {
  while (true) {
    Item item;
    bool broken = false;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || (!queue_.empty() && !stalled_);
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      item = std::move(queue_.front());
      queue_.pop_front();
      broken = broken_;
    }
    if (broken) {
      // Both ends see a dead connection: the sender's send fails, and the
      // receiver loses its predecessor (as when a gRPC stream breaks).
      const absl::Status gone = absl::UnavailableError("ring link broken");
      target_->PredecessorLost({item.segment->header().group_id}, gone);
      std::move(item.done)(gone);
      continue;
    }
    // The receiver may answer later (a parked segment); the next segment
    // waits for it, as on a stream.
    absl::Notification acked;
    absl::Status verdict;
    target_->Deliver(item.segment.get(), [&](absl::Status s) {
      verdict = std::move(s);
      acked.Notify();
    });
    acked.WaitForNotification();
    std::move(item.done)(std::move(verdict));
  }
}

}  // namespace moe::allreduce
