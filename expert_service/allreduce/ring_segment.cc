#include "expert_service/allreduce/ring_segment.h"

#include <algorithm>
#include <cstring>

#include "common/proto_status.h"
#include "common/proto_wire.h"

namespace moe::allreduce {
namespace {

constexpr int kDataField = 8;

// Reads a message that spans slices, byte by byte where it must, in runs
// where it can.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {}

  bool AtEnd() {
    SkipEmpty();
    return slice_ == slices_.size();
  }

  bool ReadByte(uint8_t& byte) {
    SkipEmpty();
    if (slice_ == slices_.size()) return false;
    byte = slices_[slice_].begin()[offset_++];
    return true;
  }

  // At most `max_bytes` bytes (protobuf: 5 for a tag, 10 otherwise).
  bool ReadVarint(uint64_t& value, int max_bytes = 10) {
    value = 0;
    for (int shift = 0; shift < 7 * max_bytes && shift < 64; shift += 7) {
      uint8_t byte;
      if (!ReadByte(byte)) return false;
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  // The next `n` bytes as pieces of the slices (nothing copied).
  template <typename Piece>
  bool Take(size_t n, std::vector<Piece>& pieces) {
    return ForEachRun(n, [&](size_t slice, size_t offset, size_t run) {
      pieces.push_back({slice, offset, run});
    });
  }

  // The next `n` bytes appended to `out`.
  bool Copy(size_t n, std::string& out) {
    return ForEachRun(n, [&](size_t slice, size_t offset, size_t run) {
      out.append(reinterpret_cast<const char*>(slices_[slice].begin()) + offset, run);
    });
  }

 private:
  // Consumes the next `n` bytes, calling visit(slice, offset, length) for
  // each stretch within one slice; false if the message ends first.
  template <typename Visit>
  bool ForEachRun(size_t n, Visit visit) {
    while (n > 0) {
      SkipEmpty();
      if (slice_ == slices_.size()) return false;
      const size_t run = std::min(n, slices_[slice_].size() - offset_);
      visit(slice_, offset_, run);
      offset_ += run;
      n -= run;
    }
    return true;
  }

  void SkipEmpty() {
    while (slice_ < slices_.size() && offset_ == slices_[slice_].size()) {
      ++slice_;
      offset_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0;
  size_t offset_ = 0;
};

constexpr uint64_t kMaxFieldNumber = (uint64_t{1} << 29) - 1;

// A length-delimited field's length, as protobuf reads one: at most 5
// bytes and at most 2^31 - 1 (a longer encoding of 0 is refused there too;
// found by fuzzing).
bool ReadLength(SliceReader& reader, uint64_t& length) {
  return reader.ReadVarint(length, /*max_bytes=*/5) && length <= 0x7fffffff;
}

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
  if (!chunk.data().empty()) segment.payload_.push_back({0, 0, chunk.data().size()});
  segment.payload_bytes_ = chunk.data().size();
  return segment;
}

grpc::Status ReceivedSegment::FromByteBuffer(grpc::ByteBuffer& buffer, ReceivedSegment& segment) {
  segment.wire_status_ = Parse(buffer, segment);
  return segment.wire_status_;
}

grpc::Status ReceivedSegment::Parse(grpc::ByteBuffer& buffer,
                                             ReceivedSegment& segment) {
  segment.slices_.clear();
  segment.payload_.clear();
  segment.payload_bytes_ = 0;
  if (grpc::Status dumped = buffer.Dump(&segment.slices_); !dumped.ok()) return dumped;
  // The header fields are re-encoded into `header` and parsed by protobuf;
  // `data` is only located.
  std::string header;
  SliceReader reader(segment.slices_);
  while (!reader.AtEnd()) {
    uint64_t tag;
    if (!reader.ReadVarint(tag, /*max_bytes=*/5)) return Malformed("truncated or overlong tag");
    const uint64_t field = tag >> 3;
    const int wire_type = static_cast<int>(tag & 7);
    // Protobuf's field numbers are 1 .. 2^29 - 1; its parser would stop at
    // any other tag and drop the fields after it (found by fuzzing).
    if (field == 0 || field > kMaxFieldNumber) return Malformed("bad field number");
    if (field == kDataField && wire_type == kLengthDelimited) {
      uint64_t length;
      if (!ReadLength(reader, length)) return Malformed("truncated or bad data length");
      segment.payload_.clear();  // A repeated field: the last one counts.
      if (!reader.Take(length, segment.payload_)) return Malformed("truncated data");
      segment.payload_bytes_ = length;
      continue;
    }
    AppendVarint(tag, header);
    uint64_t value;
    switch (wire_type) {
      case 0:
        if (!reader.ReadVarint(value)) return Malformed("truncated varint");
        AppendVarint(value, header);
        break;
      case 1:
        if (!reader.Copy(8, header)) return Malformed("truncated fixed64");
        break;
      case 2:
        if (!ReadLength(reader, value)) return Malformed("truncated or bad length");
        AppendVarint(value, header);
        if (!reader.Copy(value, header)) return Malformed("truncated field");
        break;
      case 5:
        if (!reader.Copy(4, header)) return Malformed("truncated fixed32");
        break;
      default:
        return Malformed("unknown wire type");
    }
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
  for (const Piece& piece : payload_) {
    const char* src = reinterpret_cast<const char*>(slices_[piece.slice].begin()) + piece.offset;
    size_t left = piece.length;
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
