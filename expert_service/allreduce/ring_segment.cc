#include "expert_service/allreduce/ring_segment.h"

#include <algorithm>
#include <cstring>

#include "common/proto_status.h"
#include "common/proto_wire.h"
#include "common/wire_reader.h"

namespace moe::allreduce {
namespace {

constexpr int kDataField = 8;

grpc::Status Malformed(const char* what) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      std::string("malformed ring segment: ") + what);
}

}  // namespace

void RingHeaderToChunk(const RingHeader& header, v1::RingChunk* chunk) {
  chunk->mutable_id()->set_step(header.step);
  chunk->mutable_id()->set_group_id(header.group_id);
  chunk->set_sender_rank(header.sender_rank);
  chunk->set_phase(static_cast<v1::RingPhase>(header.phase));
  chunk->set_ring_step(header.ring_step);
  chunk->set_chunk_index(header.chunk_index);
  chunk->set_offset_elements(header.offset_elements);
  chunk->set_buffer_elements(header.buffer_elements);
  if (header.abort.ok()) {
    chunk->clear_abort();
  } else {
    ToProtoStatus(header.abort, chunk->mutable_abort());
  }
}

RingHeader RingHeaderFromChunk(const v1::RingChunk& chunk) {
  RingHeader header;
  header.step = chunk.id().step();
  header.group_id = chunk.id().group_id();
  header.sender_rank = chunk.sender_rank();
  header.phase = static_cast<RingPhase>(chunk.phase());
  header.ring_step = chunk.ring_step();
  header.chunk_index = chunk.chunk_index();
  header.offset_elements = chunk.offset_elements();
  header.buffer_elements = chunk.buffer_elements();
  if (chunk.has_abort()) {
    header.abort = FromProtoStatus(chunk.abort());
    if (header.abort.ok()) header.abort = absl::UnknownError(chunk.abort().message());
  }
  return header;
}

ReceivedSegment ReceivedSegment::FromChunk(const v1::RingChunk& chunk) {
  ReceivedSegment segment;
  segment.wire_header_ = chunk;
  segment.wire_header_.clear_data();
  segment.header_ = RingHeaderFromChunk(segment.wire_header_);
  segment.slices_.emplace_back(chunk.data());
  const grpc::Slice& data = segment.slices_.back();
  if (!chunk.data().empty()) {
    segment.payload_.emplace_back(reinterpret_cast<const char*>(data.begin()), data.size());
  }
  segment.payload_bytes_ = chunk.data().size();
  return segment;
}

grpc::Status ReceivedSegment::FromByteBuffer(grpc::ByteBuffer& buffer, ReceivedSegment& segment) {
  segment.wire_status_ = Parse(buffer, segment);
  return segment.wire_status_;
}

grpc::Status ReceivedSegment::Parse(grpc::ByteBuffer& buffer, ReceivedSegment& segment) {
  segment.slices_.clear();
  segment.payload_.clear();
  segment.payload_bytes_ = 0;
  if (grpc::Status dumped = buffer.Dump(&segment.slices_); !dumped.ok()) return dumped;
  std::vector<absl::string_view> pieces;
  pieces.reserve(segment.slices_.size());
  for (const grpc::Slice& slice : segment.slices_) {
    pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // The header fields are re-encoded into `header` and parsed by protobuf;
  // `data` is only located.
  std::string header;
  WireReader reader(pieces);
  while (!reader.AtEnd()) {
    uint64_t field;
    int wire_type;
    if (!reader.ReadTag(field, wire_type)) return Malformed("truncated tag or bad field number");
    if (field == kDataField && wire_type == kLengthDelimited) {
      uint64_t length;
      if (!reader.ReadLength(length)) return Malformed("truncated or bad data length");
      segment.payload_.clear();  // A repeated field: the last one counts.
      if (!reader.Take(length, segment.payload_)) return Malformed("truncated data");
      segment.payload_bytes_ = length;
      continue;
    }
    if (!reader.CopyField(field, wire_type, header))
      return Malformed("truncated field or unknown wire type");
  }
  if (!segment.wire_header_.ParseFromString(header)) return Malformed("bad header fields");
  segment.header_ = RingHeaderFromChunk(segment.wire_header_);
  return grpc::Status::OK;
}

// Runs apply(dst, src, n) over the payload's floats; `src` may be
// unaligned, and a float split between two slices is put together first.
template <typename Apply>
void ReceivedSegment::ForEachRun(float* dst, Apply apply) const {
  char split[sizeof(float)];
  size_t split_bytes = 0;
  for (const absl::string_view piece : payload_) {
    const char* src = piece.data();
    size_t left = piece.size();
    if (split_bytes > 0) {
      const size_t take = std::min(sizeof(float) - split_bytes, left);
      std::memcpy(split + split_bytes, src, take);
      split_bytes += take;
      src += take;
      left -= take;
      if (split_bytes < sizeof(float)) continue;
      apply(dst, split, 1);
      ++dst;
      split_bytes = 0;
    }
    const size_t floats = left / sizeof(float);
    apply(dst, src, floats);
    dst += floats;
    split_bytes = left - floats * sizeof(float);
    if (split_bytes > 0) std::memcpy(split, src + floats * sizeof(float), split_bytes);
  }
}

void ReceivedSegment::AddPayloadTo(float* dst) const {
  ForEachRun(dst, [](float* out, const char* src, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      float value;
      std::memcpy(&value, src + i * sizeof(float), sizeof(float));  // unaligned load
      out[i] += value;
    }
  });
}

void ReceivedSegment::CopyPayloadTo(float* dst) const {
  ForEachRun(dst, [](float* out, const char* src, size_t n) {
    if (n > 0) std::memcpy(out, src, n * sizeof(float));
  });
}

}  // namespace moe::allreduce

namespace grpc {

Status SerializationTraits<moe::allreduce::RingSegment, void>::Serialize(
    const moe::allreduce::RingSegment& segment, ByteBuffer* buffer, bool* own_buffer) {
  std::string head = segment.header.SerializeAsString();
  if (segment.length > 0) {
    moe::AppendLengthDelimited(moe::allreduce::kDataField,
                               static_cast<uint64_t>(segment.length) * sizeof(float), head);
  }
  Slice slices[2] = {Slice(head), Slice(segment.data, segment.length * sizeof(float),
                                        Slice::STATIC_SLICE)};
  *buffer = ByteBuffer(slices, segment.length > 0 ? 2 : 1);
  *own_buffer = true;
  return Status::OK;
}

}  // namespace grpc
