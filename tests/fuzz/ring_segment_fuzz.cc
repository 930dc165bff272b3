// Ring segments from the wire: ReceivedSegment's own parser (it locates
// `data` in the slices instead of copying it) against protobuf's. Whatever
// it accepts, protobuf accepts too, with the same header fields and the
// same payload bytes; a split into up to three slices changes nothing.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "expert_service/allreduce/ring_segment.h"
#include "proto/collective.pb.h"
#include "tests/fuzz/cut_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const std::vector<absl::string_view> pieces = moe::fuzz::CutInThree(data, size);
  const char* bytes = pieces[0].data();
  const size_t body = size - 2;
  std::vector<grpc::Slice> slices;
  for (absl::string_view piece : pieces) {
    if (!piece.empty()) slices.emplace_back(piece.data(), piece.size());
  }
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  moe::allreduce::ReceivedSegment segment;
  const grpc::Status status = moe::allreduce::ReceivedSegment::FromByteBuffer(buffer, segment);
  if (!status.ok()) {
    if (status.error_code() != grpc::StatusCode::INVALID_ARGUMENT) __builtin_trap();
    return 0;
  }
  moe::v1::RingChunk parsed;
  if (!parsed.ParseFromArray(bytes, static_cast<int>(body))) __builtin_trap();
  if (parsed.data().size() != segment.payload_bytes()) __builtin_trap();
  moe::v1::RingChunk header = parsed;
  header.clear_data();
  if (header.SerializeAsString() != segment.wire_header().SerializeAsString()) __builtin_trap();
  // The payload as floats (a trailing partial float is not read).
  std::vector<float> copied(segment.payload_bytes() / sizeof(float) + 1, 0.0f);
  segment.CopyPayloadTo(copied.data());
  if (std::memcmp(copied.data(), parsed.data().data(),
                  (segment.payload_bytes() / sizeof(float)) * sizeof(float)) != 0) {
    __builtin_trap();
  }
  std::vector<float> added(copied.size(), 0.0f);
  segment.AddPayloadTo(added.data());
  return 0;
}
