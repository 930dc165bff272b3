// Moving an expert between servers: its weights (and momentum buffers) cut
// into ExpertWeightsChunk messages, and put back together with every chunk
// checked against the model's shapes and the sender's digest.
// Thread-compatible.
#ifndef MOE_EXPERT_SERVICE_WEIGHT_TRANSFER_H_
#define MOE_EXPERT_SERVICE_WEIGHT_TRANSFER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "expert_service/expert_store.h"
#include "proto/expert.pb.h"

namespace moe::expert {

// Chunks are at least this large (but for a tensor's last): a request for
// smaller ones would build a message per few bytes.
inline constexpr size_t kMinChunkBytes = 1024;

// The chunks of one expert, data at most max(`max_chunk_bytes`,
// kMinChunkBytes) each; the last one carries the weights digest and
// last = true.
std::vector<v1::ExpertWeightsChunk> ChunkExpert(ExpertKey expert, const ExpertSnapshot& snapshot,
                                                size_t max_chunk_bytes);

class ExpertAssembler {
 public:
  // Keeps a copy of `model` (a few numbers).
  explicit ExpertAssembler(ModelConfig model) : model_(std::move(model)) {}

  // Copies one chunk in; errors name the problem (another expert, an
  // unknown kind, a wrong shape, bytes out of range or out of order, a chunk
  // after the last). A tensor's chunks come in order, each starting where
  // the one before ended, so no byte is written twice or left out.
  absl::Status Add(const v1::ExpertWeightsChunk& chunk);
  // After the last chunk: every byte received and the digest matching.
  absl::StatusOr<ExpertSnapshot> Finish();
  // The expert of the first chunk; nullopt before it.
  std::optional<ExpertKey> expert() const { return expert_; }
  // The step the weights were committed at, and their digest, as the last
  // chunk says (Finish() checked the digest against the bytes).
  uint64_t step() const { return step_; }
  uint64_t digest() const { return digest_; }

 private:
  std::string Name() const;

  const ModelConfig model_;
  std::optional<ExpertKey> expert_;
  bool last_seen_ = false;
  uint64_t digest_ = 0;
  uint64_t step_ = 0;
  ExpertSnapshot snapshot_;
  // Bytes received, by ExpertTensorKind (1..15).
  int64_t received_[16] = {};
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_WEIGHT_TRANSFER_H_
