// MoE checkpoints: safetensors files with PyTorch nn.Linear names and
// layouts, so a PyTorch state dict saved with safetensors is served as is
// (docs/checkpoints.md):
//   gate.weight            [num_experts, d_model]
//   experts.{e}.w1.weight  [d_ff, d_model]      experts.{e}.w1.bias [d_ff]
//   experts.{e}.w2.weight  [d_model, d_ff]      experts.{e}.w2.bias [d_model]
// F32 or BF16. In memory, weights are transposed to the x W layout
// (moe_weights.h). A file holds one MoE layer; the names of other layers'
// tensors are prefixed "layers.{l}." (GateTensorName, ExpertTensorName), so
// layer 0's names are today's. Thread-safe (no shared state).
#ifndef MOE_COMMON_CHECKPOINT_H_
#define MOE_COMMON_CHECKPOINT_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/tensor.h"

namespace moe {

// The checkpoint names of a layer's gate and of one tensor of an expert.
std::string GateTensorName(int layer);
std::string ExpertTensorName(ExpertKey expert, ExpertTensor which);

// What to read from a checkpoint. The whole header is validated either way:
// every tensor of the model must be present with its shape, and no unknown
// tensor may be.
struct CheckpointSelection {
  bool gate = true;
  // nullopt: every expert.
  std::optional<std::vector<int>> experts;
};

absl::StatusOr<MoeWeights> LoadCheckpoint(const std::string& path,
                                          const ModelConfig& model,
                                          const CheckpointSelection& selection = {});

// Writes the gate and every expert of `weights` (all must be present) in
// `dtype`.
absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const MoeWeights& weights, DType dtype);

}  // namespace moe

#endif  // MOE_COMMON_CHECKPOINT_H_
