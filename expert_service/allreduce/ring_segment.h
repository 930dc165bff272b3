// Ring segments on the wire (the gRPC side of RingLink), without copying
// their data.
//
// Sending (RingSegment): the RingChunk header fields (everything but
// `data`) serialized by protobuf, then the `data` field's tag and length,
// then the floats themselves as a gRPC slice over the collective's own
// buffer.
//
// Receiving (ReceivedSegment): any RingChunk encoding is accepted; its
// `data` bytes stay in the gRPC slices they arrived in, and the collective
// adds or copies them from there into its buffer (a protobuf parse would
// first copy them into a string).
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_RING_SEGMENT_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_RING_SEGMENT_H_

#include <grpcpp/impl/serialization_traits.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/status.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "expert_service/allreduce/ring_link.h"
#include "proto/collective.pb.h"

namespace moe::allreduce {

// The Collective service's one method (proto/collective.proto). A constant:
// a generic stub keeps a pointer to the name for the life of each call.
inline constexpr char kRingMethod[] = "/moe.v1.Collective/Ring";

// The header fields of the wire message, and back. An abort without a code
// (code 0) becomes UNKNOWN: a segment that says "abort" is never OK.
void RingHeaderToChunk(const RingHeader& header, v1::RingChunk* chunk);
RingHeader RingHeaderFromChunk(const v1::RingChunk& chunk);

struct RingSegment {
  // Every field but `data`.
  v1::RingChunk header;
  // The payload: `length` floats that stay unchanged and alive until the
  // segment is acknowledged (or its stream ends).
  const float* data = nullptr;
  int64_t length = 0;

  uint64_t sequence_id() const { return header.sequence_id(); }
};

// A segment as the Collective service reads it: the header fields parsed,
// the `data` bytes left in the slices they arrived in (a float may straddle
// two slices).
class ReceivedSegment final : public ReceivedRingSegment {
 public:
  ReceivedSegment() = default;
  // Moved, never copied: the payload's views point into the slices (small
  // ones hold their bytes inline), which a move keeps where they are.
  ReceivedSegment(ReceivedSegment&&) = default;
  ReceivedSegment& operator=(ReceivedSegment&&) = default;
  ReceivedSegment(const ReceivedSegment&) = delete;
  ReceivedSegment& operator=(const ReceivedSegment&) = delete;

  // From a parsed RingChunk (tests and in-process links): copies its data.
  static ReceivedSegment FromChunk(const v1::RingChunk& chunk);
  // From the wire: the slices of `buffer` are kept, not copied. Any valid
  // RingChunk encoding; a malformed one is INVALID_ARGUMENT (also kept as
  // the segment's wire_status()).
  static grpc::Status FromByteBuffer(grpc::ByteBuffer& buffer, ReceivedSegment& segment);

  // Why the last message read from the wire is not a segment (OK: it is).
  // gRPC would end the stream as if the peer had closed it; the service
  // answers this instead.
  const grpc::Status& wire_status() const { return wire_status_; }

  const RingHeader& header() const override { return header_; }
  // Every field of the message but `data` (the ack echoes some).
  const v1::RingChunk& wire_header() const { return wire_header_; }
  size_t payload_bytes() const override { return payload_bytes_; }
  void AddPayloadTo(float* dst) const override;
  void CopyPayloadTo(float* dst) const override;

 private:
  static grpc::Status Parse(grpc::ByteBuffer& buffer, ReceivedSegment& segment);
  template <typename Apply>
  void ForEachRun(float* dst, Apply apply) const;

  grpc::Status wire_status_;
  v1::RingChunk wire_header_;
  RingHeader header_;
  std::vector<grpc::Slice> slices_;
  // The data's bytes, in slices_.
  std::vector<absl::string_view> payload_;
  size_t payload_bytes_ = 0;
};

}  // namespace moe::allreduce

namespace grpc {

template <>
class SerializationTraits<moe::allreduce::RingSegment, void> {
 public:
  // The header, then the `data` field's tag and length, then the floats as
  // a slice over the sender's buffer.
  static Status Serialize(const moe::allreduce::RingSegment& segment, ByteBuffer* buffer,
                          bool* own_buffer);

  // Segments are only sent from here.
  static Status Deserialize(ByteBuffer*, moe::allreduce::RingSegment*) {
    return Status(StatusCode::UNIMPLEMENTED, "ring segments are not read as RingSegment");
  }
};

template <>
class SerializationTraits<moe::allreduce::ReceivedSegment, void> {
 public:
  // Segments are only received as ReceivedSegment.
  static Status Serialize(const moe::allreduce::ReceivedSegment&, ByteBuffer*, bool*) {
    return Status(StatusCode::UNIMPLEMENTED, "received segments are not sent");
  }

  // Always OK to gRPC: a malformed message is kept as the segment's
  // wire_status(), for the service to refuse by name.
  static Status Deserialize(ByteBuffer* buffer, moe::allreduce::ReceivedSegment* segment) {
    moe::allreduce::ReceivedSegment::FromByteBuffer(*buffer, *segment);
    buffer->Clear();
    return Status::OK;
  }
};

}  // namespace grpc

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_RING_SEGMENT_H_
