// A ring segment as it goes on the wire, without copying its data: the
// RingChunk header fields (everything but `data`) serialized by protobuf,
// then the `data` field's tag and length, then the floats themselves as a
// gRPC slice over the collective's own buffer. The receiver parses it as an
// ordinary RingChunk (protobuf accepts fields in any order).
#ifndef MOE_EXPERT_SERVICE_RING_SEGMENT_H_
#define MOE_EXPERT_SERVICE_RING_SEGMENT_H_

#include <cstdint>
#include <string>

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/impl/serialization_traits.h>
#include <grpcpp/support/slice.h>
#include <grpcpp/support/status.h>

#include "proto/collective.pb.h"

namespace moe::expert {

struct RingSegment {
  // Every field but `data`.
  v1::RingChunk header;
  // The payload: `length` floats that stay unchanged and alive until the
  // segment is acknowledged (or its stream ends).
  const float* data = nullptr;
  int64_t length = 0;

  uint64_t sequence_id() const { return header.sequence_id(); }
};

}  // namespace moe::expert

namespace grpc {

template <>
class SerializationTraits<moe::expert::RingSegment, void> {
 public:
  static Status Serialize(const moe::expert::RingSegment& segment, ByteBuffer* buffer,
                          bool* own_buffer) {
    std::string head = segment.header.SerializeAsString();
    if (segment.length > 0) {
      // Field 8 (`data`), wire type 2: tag 0x42, then the byte length as a
      // varint.
      head.push_back(static_cast<char>(0x42));
      uint64_t bytes = static_cast<uint64_t>(segment.length) * sizeof(float);
      while (bytes >= 0x80) {
        head.push_back(static_cast<char>((bytes & 0x7f) | 0x80));
        bytes >>= 7;
      }
      head.push_back(static_cast<char>(bytes));
    }
    Slice slices[2] = {Slice(head), Slice(segment.data, segment.length * sizeof(float),
                                          Slice::STATIC_SLICE)};
    *buffer = ByteBuffer(slices, segment.length > 0 ? 2 : 1);
    *own_buffer = true;
    return Status::OK;
  }

  // Segments are only sent from here.
  static Status Deserialize(ByteBuffer*, moe::expert::RingSegment*) {
    return Status(StatusCode::UNIMPLEMENTED, "ring segments are not read as RingSegment");
  }
};

}  // namespace grpc

#endif  // MOE_EXPERT_SERVICE_RING_SEGMENT_H_
