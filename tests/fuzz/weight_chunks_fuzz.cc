// Weight transfer from the wire: a stream of ExpertWeightsChunk messages
// (each prefixed by a one-byte length) into an ExpertAssembler. Every
// chunk is accepted or refused with INVALID_ARGUMENT; nothing is written
// outside a tensor; Finish either returns a complete expert or names what
// is missing.
#include <cstdint>

#include "expert_service/weight_transfer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::ModelConfig model;
  model.d_model = 4;
  model.d_ff = 8;
  model.num_experts = 3;
  model.top_k = 1;
  moe::expert::ExpertAssembler assembler(model);
  size_t at = 0;
  while (at < size) {
    const size_t length = data[at++];
    if (length > size - at) break;
    moe::v1::ExpertWeightsChunk chunk;
    if (chunk.ParseFromArray(data + at, static_cast<int>(length))) {
      const absl::Status added = assembler.Add(chunk);
      if (!added.ok() && added.code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
    }
    at += length;
  }
  absl::StatusOr<moe::expert::ExpertSnapshot> done = assembler.Finish();
  if (done.ok() && done->weights.w1.num_elements() != model.d_model * model.d_ff) {
    __builtin_trap();
  }
  return 0;
}
