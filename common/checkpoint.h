// MoE checkpoints: safetensors files with PyTorch nn.Linear names and
// layouts, so a PyTorch state dict saved with safetensors is served as is
// (docs/checkpoints.md):
//   gate.weight            [num_experts, d_model]
//   experts.{e}.w1.weight  [d_ff, d_model]      experts.{e}.w1.bias [d_ff]
//   experts.{e}.w2.weight  [d_model, d_ff]      experts.{e}.w2.bias [d_model]
//   experts.{e}.w3.weight  [d_ff, d_model]      (gated SiLU experts only)
// F32 or BF16. In memory, weights are transposed to the x W layout
// (moe_weights.h). A checkpoint holds every MoE layer of the model; layer
// 0's tensors have the names above, other layers' are prefixed
// "layers.{l}." (GateTensorName, ExpertTensorName), so one-layer
// checkpoints are unchanged. Thread-safe (no shared state).
#ifndef MOE_COMMON_CHECKPOINT_H_
#define MOE_COMMON_CHECKPOINT_H_

#include <cstdint>
#include <map>
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
  // The layer they are of (one load reads one layer).
  int layer = 0;
};

// `path` is a single safetensors file, or a sharded checkpoint: a directory
// holding model.safetensors.index.json (or that file's path). A sharded
// load opens only the shards holding selected tensors.
absl::StatusOr<MoeWeights> LoadCheckpoint(const std::string& path,
                                          const ModelConfig& model,
                                          const CheckpointSelection& selection = {});

// Every layer's gate, stacked (ModelConfig::gate_shape()): what a router
// serves.
absl::StatusOr<FloatTensor> LoadGates(const std::string& path, const ModelConfig& model);

// Sharded checkpoints, the Hugging Face layout: a directory of shards
// (ShardFileName) and the index, written last, mapping each tensor to its
// shard, with metadata naming the training step the weights were committed
// at and the training run (lineage).
inline constexpr char kCheckpointIndexName[] = "model.safetensors.index.json";
// The optimizer's state beside it (fp32): tensors named as the weights they
// belong to plus "." and PyTorch's state name (OptimizerStateNames), in
// OptimizerShardFileName shards, indexed by this file, written before the
// weights' index.
inline constexpr char kOptimizerIndexName[] = "optimizer.safetensors.index.json";

struct CheckpointMetadata {
  // The committed step (0 for a single file: as initialised or trained
  // elsewhere).
  uint64_t step = 0;
  // Identifies the training run; empty when unknown.
  std::string lineage;
};

// The index's metadata; {0, ""} for a single file. NOT_FOUND for a
// directory without an index (a checkpoint not completely written).
absl::StatusOr<CheckpointMetadata> ReadCheckpointMetadata(const std::string& path);

// `root`/`relative` when `relative` is a safe relative path: plain names
// ([A-Za-z0-9._-]+, not "." or "..") joined by '/'. A checkpoint path from
// a request is hostile input: it must not leave the checkpoint directory.
absl::StatusOr<std::string> ResolveCheckpointPath(const std::string& root,
                                                  const std::string& relative);

// The complete checkpoint (index present) with the highest step among
// `directory`/step-N, or nullopt when there is none (or no such directory).
// A process started with --checkpoint_dir resumes from it when it is newer
// than what --checkpoint names.
struct LatestCheckpoint {
  std::string path;
  uint64_t step = 0;
};
absl::StatusOr<std::optional<LatestCheckpoint>> FindLatestCheckpoint(const std::string& directory);

// What a process starts from: `checkpoint_path` (empty: the seed's init),
// or the latest complete checkpoint under `checkpoint_dir` when it holds a
// later step (a process restarted mid-training resumes where the last
// checkpoint left off). `path` empty means the seed's init.
struct StartingCheckpoint {
  std::string path;
  CheckpointMetadata metadata;
};
absl::StatusOr<StartingCheckpoint> ChooseStartingCheckpoint(const std::string& checkpoint_path,
                                                            const std::string& checkpoint_dir);

// "model-00002-of-00003.safetensors" (1-based).
std::string ShardFileName(int shard, int num_shards);

// Writes one shard: the gate (when `part` has it) and `part`'s experts, in
// `dtype`. Appends the tensor names to `tensor_names`; returns the bytes of
// tensor data.
absl::StatusOr<int64_t> SaveCheckpointShard(const std::string& path, const ModelConfig& model,
                                            const MoeWeights& part, DType dtype,
                                            std::vector<std::string>* tensor_names);

// The state names of an optimizer, as PyTorch's state_dict calls them:
// none for SGD, "momentum_buffer" for SGD with momentum, "exp_avg" and
// "exp_avg_sq" for AdamW.
std::vector<std::string> OptimizerStateNames(OptimizerType type);

// Tensors shaped as the weights: the weights themselves (`state` empty) or
// one optimizer state.
struct ShardPart {
  std::string state;
  const MoeWeights* tensors = nullptr;
};
// Writes one shard holding several parts.
absl::StatusOr<int64_t> SaveCheckpointShard(const std::string& path, const ModelConfig& model,
                                            const std::vector<ShardPart>& parts, DType dtype,
                                            std::vector<std::string>* tensor_names);

// "optimizer-00002-of-00003.safetensors" (1-based).
std::string OptimizerShardFileName(int shard, int num_shards);

// Writes `directory`/optimizer.safetensors.index.json: every state of the
// model's optimizer for every tensor exactly once.
absl::Status WriteOptimizerIndex(const std::string& directory, const ModelConfig& model,
                                 const std::map<std::string, std::string>& weight_map,
                                 int64_t total_size, const CheckpointMetadata& metadata);

// The optimizer's state saved with the sharded checkpoint `path`, one
// MoeWeights per OptimizerStateNames (the selected tensors), after checking
// its index names all of them and is of the weights' step. nullopt when
// there is none (a single file, an optimizer without state, or a checkpoint
// written without it).
absl::StatusOr<std::optional<std::vector<MoeWeights>>> LoadOptimizerState(
    const std::string& path, const ModelConfig& model, const CheckpointSelection& selection);
// The optimizer's state of every layer's gate, stacked, one per
// OptimizerStateNames (nullopt as above).
absl::StatusOr<std::optional<std::vector<FloatTensor>>> LoadGateOptimizerState(
    const std::string& path, const ModelConfig& model);

// Writes `directory`/model.safetensors.index.json, durably and atomically.
// INVALID_ARGUMENT unless `weight_map` names every tensor of the model and
// nothing else.
absl::Status WriteCheckpointIndex(const std::string& directory, const ModelConfig& model,
                                  const std::map<std::string, std::string>& weight_map,
                                  int64_t total_size, const CheckpointMetadata& metadata);

// Writes the gate and every expert of `weights` (all must be present) in
// `dtype`: a one-layer model's checkpoint.
absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const MoeWeights& weights, DType dtype);
// The same for every layer of the model, each exactly once.
absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const std::vector<const MoeWeights*>& layers, DType dtype);

}  // namespace moe

#endif  // MOE_COMMON_CHECKPOINT_H_
