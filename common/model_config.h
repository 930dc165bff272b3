// Typed, validated configuration. The text-format ServingConfig file is
// parsed once at start-up into these structs; nothing downstream looks at
// the proto or compares strings. Every validation error names the field.
// Thread-safe (pure functions).
#ifndef MOE_COMMON_MODEL_CONFIG_H_
#define MOE_COMMON_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/expert_key.h"
#include "common/tensor.h"
#include "proto/config.pb.h"

namespace moe {

enum class OverflowPolicy { kDropless, kDrop };
enum class OptimizerType { kSgd, kSgdMomentum, kAdamW };

struct OptimizerOptions {
  OptimizerType type = OptimizerType::kSgd;
  // Used when a Step request gives no learning rate.
  float learning_rate = 0.0f;
  // For kSgdMomentum, in [0, 1).
  float momentum = 0.0f;
  // For kAdamW (PyTorch's defaults; double, as PyTorch's).
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // Global gradient-norm clipping; 0: off.
  float max_grad_norm = 0.0f;
};

// The gate's variant (proto GateConfig; common/gating.h has the arithmetic).
struct GateOptions {
  // Weights are the chosen probabilities divided by their sum; else the
  // probabilities themselves.
  bool renormalize = true;
  // Group-limited choice (DeepSeek-V2): 0, or num_groups dividing
  // num_experts with 1 <= top_groups <= num_groups and top_k <= the experts
  // of top_groups groups.
  int num_groups = 0;
  int top_groups = 0;
  // > 0, finite.
  double scaling_factor = 1.0;
  // The weights of the load-balancing and z losses in training; >= 0.
  double aux_loss_coef = 0.0;
  double z_loss_coef = 0.0;
};

// Where a layer's tensors are in a checkpoint (proto CheckpointLayout).
enum class CheckpointFamily { kMoeServe, kNllbMoe, kSwitchTransformers, kMixtral, kQwen2Moe };

// What an expert computes (proto ExpertActivation).
enum class ExpertActivation {
  // ReLU(x W1 + b1) W2 + b2.
  kRelu,
  // (SiLU(x W1) * (x W3)) W2, bias-free.
  kSiluGated,
};
struct CheckpointLayout {
  CheckpointFamily family = CheckpointFamily::kMoeServe;
  // The MoE block's name prefix (Hugging Face families); with several
  // layers it holds "{layer}".
  std::string prefix;
  // The model's layer number of each served layer; empty: 0, 1, ...
  std::vector<int> layer_numbers;

  // `prefix` for served layer `layer`, "{layer}" replaced by its number.
  std::string LayerPrefix(int layer) const;
};

// The MoE layer's hyper-parameters (see proto/config.proto).
struct ModelConfig {
  int64_t d_model = 0;
  int64_t d_ff = 0;
  int num_experts = 0;
  int top_k = 0;
  // > 0 with kDrop; unused with kDropless.
  float capacity_factor = 0.0f;
  OverflowPolicy overflow = OverflowPolicy::kDropless;
  uint64_t seed = 0;
  OptimizerOptions optimizer;
  // Largest batch a request may carry.
  int64_t max_batch_tokens = 65536;
  GateOptions gate;
  CheckpointLayout checkpoint_layout;
  ExpertActivation activation = ExpertActivation::kRelu;
  // MoE layers served, each with these shapes and its own gate and experts.
  int num_layers = 1;
  // Qwen2-MoE's shared expert, served as this many slices shaped like a
  // routed expert (proto shared_expert_d_ff / d_ff); 0: none.
  int shared_slices = 0;
  bool has_shared_expert() const { return shared_slices > 0; }
  // A layer's experts as placed, run and trained: the routed ones
  // (0 .. num_experts - 1), then the shared expert's slices.
  int experts_per_layer() const { return num_experts + shared_slices; }
  // Columns of a layer's gate W_g: a logit per routed expert, then the
  // shared expert's gate (w_s) when there is one.
  int gate_width() const { return num_experts + (has_shared_expert() ? 1 : 0); }
  // Experts without biases (Switch Transformers', gated SiLU ones): the
  // biases are zero and stay zero in training (their gradients are not
  // kept).
  bool bias_free() const {
    return checkpoint_layout.family == CheckpointFamily::kSwitchTransformers || gated();
  }
  // Whether experts have a W3 (gated SiLU).
  bool gated() const { return activation == ExpertActivation::kSiluGated; }
  // Width of the forward state an expert keeps per row for its backward:
  // x W1 + b1 (ReLU), or x W1 and x W3 side by side (gated SiLU).
  int64_t activation_width() const { return gated() ? 2 * d_ff : d_ff; }
  // Parameters of one expert: W1, b1, W2, b2 (and W3).
  int64_t expert_parameters() const { return (gated() ? 3 : 2) * d_model * d_ff + d_model + d_ff; }
  // The gates of every layer stacked as one tensor [num_layers * d_model,
  // gate_width()]: layer l's W_g is rows [l d_model, (l + 1) d_model), so
  // it is a contiguous slice (GateOfLayer), and versioning, the gradient's
  // sum and the optimizer treat all gates as one tensor.
  Shape gate_shape() const { return {num_layers * d_model, gate_width()}; }
  // Experts of every layer, shared slices included.
  int64_t total_experts() const { return int64_t{num_layers} * experts_per_layer(); }
};

// INVALID_ARGUMENT naming `expert` unless it is an expert of `model`: layer
// in [0, num_layers), expert in [0, experts_per_layer()).
absl::Status CheckExpertKey(const ModelConfig& model, ExpertKey expert);
// INVALID_ARGUMENT naming `layer` unless it is in [0, num_layers).
absl::Status CheckLayer(const ModelConfig& model, int layer);

enum class PlacementStrategy {
  kDataParallel,
  kModelParallel,
  kHybrid,
  kDynamic,
  kExplicit,
};
// "DATA_PARALLEL", "MODEL_PARALLEL", "HYBRID", "DYNAMIC", "EXPLICIT".
absl::string_view PlacementStrategyName(PlacementStrategy strategy);
absl::StatusOr<PlacementStrategy> ParsePlacementStrategy(absl::string_view name);

struct ServerSpec {
  std::string name;
  std::string address;
};

struct ClusterConfig {
  // In ring order; the index into this vector is a server's id everywhere.
  std::vector<ServerSpec> servers;
  PlacementStrategy strategy = PlacementStrategy::kModelParallel;
  // kExplicit: for each layer and expert, the ids of the servers holding it.
  std::vector<std::vector<std::vector<int>>> explicit_placement;
  // kDynamic: relative load of each expert.
  std::vector<double> load_profile;
  // kDynamic: replicas each server holds (0 = ceil(E / N) + 1).
  int slots_per_server = 0;
  // The last spare_servers servers host nothing in the config's placement
  // (room to scale up; they need not run).
  int spare_servers = 0;

  // The servers the config's placement places experts on (the first ones).
  int active_servers() const { return static_cast<int>(servers.size()) - spare_servers; }

  // The id of the server called `name`, or -1.
  int FindServer(absl::string_view name) const;
};

struct ServingConfig {
  ModelConfig model;
  ClusterConfig cluster;
};

absl::StatusOr<ModelConfig> ModelConfigFromProto(const v1::ModelConfig& proto);
v1::ModelConfig ModelConfigToProto(const ModelConfig& config);

// REQUIRES: `model` is valid (its num_experts sizes the placement checks).
absl::StatusOr<ClusterConfig> ClusterConfigFromProto(
    const v1::ClusterConfig& proto, const ModelConfig& model);

v1::ClusterConfig ClusterConfigToProto(const ClusterConfig& config);
// servers_of_expert[layer][expert] of `proto`, by server index in
// `cluster`; errors name the field as `field_name`.experts[i].
absl::StatusOr<std::vector<std::vector<std::vector<int>>>> ExplicitPlacementFromProto(
    const v1::ExplicitPlacement& proto, const ClusterConfig& cluster, const ModelConfig& model,
    absl::string_view field_name = "cluster.explicit_placement");
// The text format a ServingConfig file holds (parses back to `config`).
std::string ServingConfigToText(const ServingConfig& config);

absl::StatusOr<ServingConfig> ServingConfigFromProto(
    const v1::ServingConfig& proto);
// Parses a text-format moe.v1.ServingConfig.
absl::StatusOr<ServingConfig> ParseServingConfig(absl::string_view text);
// Reads and parses a text-format file; errors name the path.
absl::StatusOr<ServingConfig> LoadServingConfig(const std::string& path);

}  // namespace moe

#endif  // MOE_COMMON_MODEL_CONFIG_H_
