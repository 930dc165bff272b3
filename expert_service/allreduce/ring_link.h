// What the ring all-reduce exchanges with its neighbours, without a
// transport: a segment is a RingHeader plus floats. A RingLink sends to the
// successor; segments from the predecessor arrive as ReceivedRingSegment,
// whose floats stay wherever the transport put them (gRPC slices for
// GrpcRingLink, the sender's buffer for LoopbackRingLink).
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_RING_LINK_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_RING_LINK_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/types/span.h"

namespace moe::allreduce {

// The numbers are v1::RingPhase's; a segment may carry any other number,
// which the collective rejects.
enum class RingPhase : int { kReduceScatter = 1, kAllGather = 2 };

// Where a segment belongs: every field of the wire's RingChunk but its data
// and the link's sequence id.
struct RingHeader {
  uint64_t step = 0;
  uint64_t group_id = 0;
  int sender_rank = 0;
  RingPhase phase = RingPhase::kReduceScatter;
  int ring_step = 0;
  int chunk_index = 0;
  int64_t offset_elements = 0;
  int64_t buffer_elements = 0;
  // Not OK: the sender's collective failed, and the segment has no data.
  absl::Status abort;
};

// A segment from the predecessor. Valid until its ack is given.
class ReceivedRingSegment {
 public:
  virtual ~ReceivedRingSegment() = default;
  virtual const RingHeader& header() const = 0;
  virtual size_t payload_bytes() const = 0;
  // dst[i] += the i-th float of the payload, for payload_bytes() / 4 floats.
  virtual void AddPayloadTo(float* dst) const = 0;
  // dst[i] = the i-th float.
  virtual void CopyPayloadTo(float* dst) const = 0;
};

// A received segment whose floats are one span (in-process links).
class SpanSegment final : public ReceivedRingSegment {
 public:
  SpanSegment(RingHeader header, absl::Span<const float> data)
      : header_(std::move(header)), data_(data) {}
  const RingHeader& header() const override { return header_; }
  size_t payload_bytes() const override { return data_.size() * sizeof(float); }
  void AddPayloadTo(float* dst) const override {
    for (size_t i = 0; i < data_.size(); ++i) dst[i] += data_[i];
  }
  void CopyPayloadTo(float* dst) const override {
    if (!data_.empty()) std::memcpy(dst, data_.data(), payload_bytes());
  }

 private:
  RingHeader header_;
  absl::Span<const float> data_;
};

// The stream to a rank's successor, shared by every collective that sends
// to that peer.
class RingLink {
 public:
  using AckDone = absl::AnyInvocable<void(absl::Status) &&>;
  virtual ~RingLink() = default;
  // Sends a segment; `data` stays unchanged and alive until `done` runs.
  // `done` runs once, with the receiver's verdict or the transport's
  // failure.
  virtual void Send(const RingHeader& header, absl::Span<const float> data, AckDone done) = 0;
  // A collective is about to use the link: one waiting out a back-off
  // after a failure tries again now (its peer answered the router a moment
  // ago, so it is likely back).
  virtual void RetryNow() {}
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_RING_LINK_H_
