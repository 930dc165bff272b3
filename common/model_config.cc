#include "common/model_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace moe {
namespace {

// Generous bounds that still keep one weight matrix addressable with int32
// strides in every kernel library.
constexpr int64_t kMaxDim = 1 << 16;
constexpr int kMaxExperts = 4096;
constexpr int64_t kDefaultMaxBatchTokens = 65536;
// Layers of one cluster; their gates are one tensor, their metrics series
// grow with them (docs/metrics.md).
constexpr int kMaxLayers = 1024;
constexpr int kMaxLayerNumber = 1 << 20;

absl::Status FieldError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

absl::Status CheckDim(absl::string_view field, int64_t value) {
  if (value <= 0 || value > kMaxDim) {
    return FieldError(field, absl::StrCat("must be in [1, ", kMaxDim, "], got ",
                                          value));
  }
  return absl::OkStatus();
}

bool IsValidServerName(absl::string_view name) {
  if (name.empty()) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::StatusOr<OptimizerOptions> OptimizerFromProto(
    const v1::OptimizerConfig& proto) {
  OptimizerOptions options;
  switch (proto.type()) {
    case v1::OPTIMIZER_TYPE_UNSPECIFIED:
    case v1::OPTIMIZER_TYPE_SGD:
      options.type = OptimizerType::kSgd;
      break;
    case v1::OPTIMIZER_TYPE_SGD_MOMENTUM:
      options.type = OptimizerType::kSgdMomentum;
      break;
    case v1::OPTIMIZER_TYPE_ADAMW:
      options.type = OptimizerType::kAdamW;
      break;
    default:
      return FieldError("model.optimizer.type",
                        absl::StrCat("unknown value ", proto.type()));
  }
  if (!std::isfinite(proto.learning_rate()) || proto.learning_rate() < 0) {
    return FieldError("model.optimizer.learning_rate",
                      absl::StrCat("must be finite and >= 0, got ",
                                   proto.learning_rate()));
  }
  if (!(proto.momentum() >= 0 && proto.momentum() < 1)) {
    return FieldError("model.optimizer.momentum",
                      absl::StrCat("must be in [0, 1), got ", proto.momentum()));
  }
  options.learning_rate = proto.learning_rate();
  options.momentum = proto.momentum();
  if (proto.has_beta1()) options.beta1 = proto.beta1();
  if (proto.has_beta2()) options.beta2 = proto.beta2();
  if (proto.has_eps()) options.eps = proto.eps();
  if (proto.has_weight_decay()) options.weight_decay = proto.weight_decay();
  for (const auto& [name, value] :
       {std::pair<const char*, double>{"beta1", options.beta1}, {"beta2", options.beta2}}) {
    if (!(value >= 0 && value < 1)) {
      return FieldError(absl::StrCat("model.optimizer.", name),
                        absl::StrCat("must be in [0, 1), got ", value));
    }
  }
  if (!(options.eps > 0) || !std::isfinite(options.eps)) {
    return FieldError("model.optimizer.eps",
                      absl::StrCat("must be finite and > 0, got ", options.eps));
  }
  if (!(options.weight_decay >= 0) || !std::isfinite(options.weight_decay)) {
    return FieldError("model.optimizer.weight_decay",
                      absl::StrCat("must be finite and >= 0, got ", options.weight_decay));
  }
  if (!(proto.max_grad_norm() >= 0) || !std::isfinite(proto.max_grad_norm())) {
    return FieldError(
        "model.optimizer.max_grad_norm",
        absl::StrCat("must be finite and >= 0 (0: off), got ", proto.max_grad_norm()));
  }
  options.max_grad_norm = proto.max_grad_norm();
  return options;
}

absl::Status CheckServers(const v1::ClusterConfig& proto) {
  if (proto.servers().empty()) {
    return FieldError("cluster.servers", "at least one server is required");
  }
  absl::flat_hash_set<std::string> names, addresses;
  for (int i = 0; i < proto.servers_size(); ++i) {
    const v1::ServerSpec& server = proto.servers(i);
    const std::string field = absl::StrCat("cluster.servers[", i, "]");
    if (!IsValidServerName(server.name())) {
      return FieldError(absl::StrCat(field, ".name"),
                        absl::StrCat("\"", server.name(),
                                     "\" is not a name ([A-Za-z0-9._-]+)"));
    }
    if (server.address().empty()) {
      return FieldError(absl::StrCat(field, ".address"), "must be set");
    }
    if (!names.insert(server.name()).second) {
      return FieldError(absl::StrCat(field, ".name"),
                        absl::StrCat("duplicate server name \"", server.name(),
                                     "\""));
    }
    if (!addresses.insert(server.address()).second) {
      return FieldError(absl::StrCat(field, ".address"),
                        absl::StrCat("duplicate address \"", server.address(),
                                     "\""));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<double>> LoadProfileFromProto(const v1::LoadProfile& proto,
                                                         int num_experts) {
  if (proto.expert_load_size() != num_experts) {
    return FieldError("cluster.load_profile.expert_load",
                      absl::StrCat("expected ", num_experts, " values (one per expert), got ",
                                   proto.expert_load_size()));
  }
  for (int e = 0; e < num_experts; ++e) {
    const double load = proto.expert_load(e);
    if (!std::isfinite(load) || load < 0) {
      return FieldError(absl::StrCat("cluster.load_profile.expert_load[", e, "]"),
                        absl::StrCat("must be finite and >= 0, got ", load));
    }
  }
  return std::vector<double>(proto.expert_load().begin(), proto.expert_load().end());
}

class FirstErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (error_.empty()) {
      error_ = absl::StrCat("line ", line + 1, " column ", column + 1, ": ", message);
    }
  }
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

}  // namespace

absl::StatusOr<std::vector<std::vector<std::vector<int>>>> ExplicitPlacementFromProto(
    const v1::ExplicitPlacement& proto, const ClusterConfig& cluster, const ModelConfig& model,
    absl::string_view field_name) {
  std::vector<std::vector<std::vector<int>>> placement(
      model.num_layers, std::vector<std::vector<int>>(model.experts_per_layer()));
  for (int i = 0; i < proto.experts_size(); ++i) {
    const v1::ExpertAssignment& assignment = proto.experts(i);
    const std::string field = absl::StrCat(field_name, ".experts[", i, "]");
    const ExpertKey expert = ExpertKeyOf(assignment);
    if (expert.layer < 0 || expert.layer >= model.num_layers) {
      return FieldError(
          absl::StrCat(field, ".layer"),
          absl::StrCat("layer ", expert.layer, " is out of range [0, ", model.num_layers, ")"));
    }
    if (expert.expert < 0 || expert.expert >= model.experts_per_layer()) {
      return FieldError(
          absl::StrCat(field, ".expert_id"),
          absl::StrCat(expert.ToString(), " is out of range [0, ", model.experts_per_layer(), ")"));
    }
    std::vector<int>& servers = placement[expert.layer][expert.expert];
    if (!servers.empty()) {
      return FieldError(absl::StrCat(field, ".expert_id"),
                        absl::StrCat(expert.ToString(), " is listed twice"));
    }
    if (assignment.servers().empty()) {
      return FieldError(absl::StrCat(field, ".servers"),
                        absl::StrCat(expert.ToString(), " has no server"));
    }
    for (const std::string& name : assignment.servers()) {
      const int server = cluster.FindServer(name);
      if (server < 0) {
        return FieldError(absl::StrCat(field, ".servers"),
                          absl::StrCat("unknown server \"", name, "\""));
      }
      if (std::find(servers.begin(), servers.end(), server) != servers.end()) {
        return FieldError(
            absl::StrCat(field, ".servers"),
            absl::StrCat("server \"", name, "\" is listed twice for ", expert.ToString()));
      }
      servers.push_back(server);
    }
  }
  for (int l = 0; l < model.num_layers; ++l) {
    for (int e = 0; e < model.experts_per_layer(); ++e) {
      if (placement[l][e].empty()) {
        return FieldError(std::string(field_name),
                          absl::StrCat(ExpertKey(l, e).ToString(), " is not placed"));
      }
    }
  }
  return placement;
}

absl::Status CheckLayer(const ModelConfig& model, int layer) {
  if (layer < 0 || layer >= model.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is out of range [0, ", model.num_layers, ")"));
  }
  return absl::OkStatus();
}

std::string CheckpointLayout::LayerPrefix(int layer) const {
  const int number = layer_numbers.empty() ? layer : layer_numbers.at(layer);
  return absl::StrReplaceAll(prefix, {{"{layer}", absl::StrCat(number)}});
}

absl::Status CheckExpertKey(const ModelConfig& model, ExpertKey expert) {
  if (expert.layer < 0 || expert.layer >= model.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(expert.ToString(), ": layer ", expert.layer,
                                                   " is out of range [0, ", model.num_layers, ")"));
  }
  if (expert.expert < 0 || expert.expert >= model.experts_per_layer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(expert.ToString(), ": out of range [0, ", model.experts_per_layer(), ")"));
  }
  return absl::OkStatus();
}

absl::string_view PlacementStrategyName(PlacementStrategy strategy) {
  switch (strategy) {
    case PlacementStrategy::kDataParallel:
      return "DATA_PARALLEL";
    case PlacementStrategy::kModelParallel:
      return "MODEL_PARALLEL";
    case PlacementStrategy::kHybrid:
      return "HYBRID";
    case PlacementStrategy::kDynamic:
      return "DYNAMIC";
    case PlacementStrategy::kExplicit:
      return "EXPLICIT";
  }
  return "UNKNOWN";
}

absl::StatusOr<PlacementStrategy> ParsePlacementStrategy(absl::string_view name) {
  for (PlacementStrategy s :
       {PlacementStrategy::kDataParallel, PlacementStrategy::kModelParallel,
        PlacementStrategy::kHybrid, PlacementStrategy::kDynamic,
        PlacementStrategy::kExplicit}) {
    if (name == PlacementStrategyName(s)) return s;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown placement strategy \"", name,
      "\" (want DATA_PARALLEL, MODEL_PARALLEL, HYBRID, DYNAMIC or EXPLICIT)"));
}

int ClusterConfig::FindServer(absl::string_view name) const {
  for (size_t i = 0; i < servers.size(); ++i) {
    if (servers[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

namespace {

absl::StatusOr<GateOptions> GateFromProto(const v1::GateConfig& proto,
                                          const ModelConfig& model) {
  GateOptions gate;
  switch (proto.weights()) {
    case v1::GateConfig::WEIGHTS_UNSPECIFIED:
    case v1::GateConfig::WEIGHTS_RENORMALIZED:
      gate.renormalize = true;
      break;
    case v1::GateConfig::WEIGHTS_PROBABILITIES:
      gate.renormalize = false;
      break;
    default:
      return FieldError("model.gate.weights", absl::StrCat("unknown value ", proto.weights()));
  }
  if (proto.num_groups() != 0 || proto.top_groups() != 0) {
    if (proto.num_groups() < 1 || model.num_experts % proto.num_groups() != 0) {
      return FieldError("model.gate.num_groups",
                        absl::StrCat("must divide num_experts = ", model.num_experts, ", got ",
                                     proto.num_groups()));
    }
    const int per_group = model.num_experts / proto.num_groups();
    if (proto.top_groups() < 1 || proto.top_groups() > proto.num_groups() ||
        static_cast<int64_t>(proto.top_groups()) * per_group < model.top_k) {
      return FieldError(
          "model.gate.top_groups",
          absl::StrCat("must be in [1, num_groups = ", proto.num_groups(),
                       "] with top_k = ", model.top_k, " <= top_groups x ", per_group,
                       " experts per group, got ", proto.top_groups()));
    }
  }
  gate.num_groups = proto.num_groups();
  gate.top_groups = proto.top_groups();
  if (!std::isfinite(proto.scaling_factor()) || proto.scaling_factor() < 0) {
    return FieldError("model.gate.scaling_factor",
                      absl::StrCat("must be finite and > 0 (0 means 1), got ",
                                   proto.scaling_factor()));
  }
  gate.scaling_factor = proto.scaling_factor() == 0 ? 1.0 : proto.scaling_factor();
  for (const auto& [name, value] : {std::pair{"aux_loss_coef", proto.aux_loss_coef()},
                                    std::pair{"z_loss_coef", proto.z_loss_coef()}}) {
    if (!std::isfinite(value) || value < 0) {
      return FieldError(absl::StrCat("model.gate.", name),
                        absl::StrCat("must be finite and >= 0, got ", value));
    }
  }
  gate.aux_loss_coef = proto.aux_loss_coef();
  gate.z_loss_coef = proto.z_loss_coef();
  return gate;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromProto(const v1::ModelConfig& proto) {
  ModelConfig config;
  MOE_RETURN_IF_ERROR(CheckDim("model.d_model", proto.d_model()));
  MOE_RETURN_IF_ERROR(CheckDim("model.d_ff", proto.d_ff()));
  config.d_model = proto.d_model();
  config.d_ff = proto.d_ff();
  if (proto.num_experts() <= 0 || proto.num_experts() > kMaxExperts) {
    return FieldError("model.num_experts",
                      absl::StrCat("must be in [1, ", kMaxExperts, "], got ",
                                   proto.num_experts()));
  }
  config.num_experts = proto.num_experts();
  if (proto.top_k() < 1 || proto.top_k() > proto.num_experts()) {
    return FieldError("model.top_k",
                      absl::StrCat("must be in [1, num_experts = ",
                                   proto.num_experts(), "], got ", proto.top_k()));
  }
  config.top_k = proto.top_k();
  switch (proto.overflow_policy()) {
    case v1::OVERFLOW_POLICY_UNSPECIFIED:
    case v1::OVERFLOW_POLICY_DROPLESS:
      config.overflow = OverflowPolicy::kDropless;
      break;
    case v1::OVERFLOW_POLICY_DROP:
      config.overflow = OverflowPolicy::kDrop;
      if (!std::isfinite(proto.capacity_factor()) ||
          proto.capacity_factor() <= 0) {
        return FieldError("model.capacity_factor",
                          absl::StrCat("must be > 0 with OVERFLOW_POLICY_DROP, "
                                       "got ",
                                       proto.capacity_factor()));
      }
      break;
    default:
      return FieldError("model.overflow_policy",
                        absl::StrCat("unknown value ", proto.overflow_policy()));
  }
  config.capacity_factor = proto.capacity_factor();
  config.seed = proto.seed();
  MOE_ASSIGN_OR_RETURN(config.optimizer, OptimizerFromProto(proto.optimizer()));
  if (proto.max_batch_tokens() < 0) {
    return FieldError("model.max_batch_tokens",
                      absl::StrCat("must be >= 0, got ", proto.max_batch_tokens()));
  }
  config.max_batch_tokens = proto.max_batch_tokens() == 0
                                ? kDefaultMaxBatchTokens
                                : proto.max_batch_tokens();
  MOE_ASSIGN_OR_RETURN(config.gate, GateFromProto(proto.gate(), config));
  const v1::CheckpointLayout& layout = proto.checkpoint_layout();
  switch (layout.family()) {
    case v1::CheckpointLayout::FAMILY_UNSPECIFIED:
    case v1::CheckpointLayout::FAMILY_MOE_SERVE:
      config.checkpoint_layout.family = CheckpointFamily::kMoeServe;
      break;
    case v1::CheckpointLayout::FAMILY_NLLB_MOE:
      config.checkpoint_layout.family = CheckpointFamily::kNllbMoe;
      break;
    case v1::CheckpointLayout::FAMILY_SWITCH_TRANSFORMERS:
      config.checkpoint_layout.family = CheckpointFamily::kSwitchTransformers;
      break;
    case v1::CheckpointLayout::FAMILY_MIXTRAL:
      config.checkpoint_layout.family = CheckpointFamily::kMixtral;
      break;
    case v1::CheckpointLayout::FAMILY_QWEN2_MOE:
      config.checkpoint_layout.family = CheckpointFamily::kQwen2Moe;
      break;
    default:
      return FieldError("model.checkpoint_layout.family",
                        absl::StrCat("unknown value ", layout.family()));
  }
  switch (proto.activation()) {
    case v1::EXPERT_ACTIVATION_UNSPECIFIED:
    case v1::EXPERT_ACTIVATION_RELU:
      config.activation = ExpertActivation::kRelu;
      break;
    case v1::EXPERT_ACTIVATION_SILU_GATED:
      config.activation = ExpertActivation::kSiluGated;
      break;
    default:
      return FieldError("model.activation", absl::StrCat("unknown value ", proto.activation()));
  }
  // The layout's experts have the activation's tensors: said, not guessed.
  const CheckpointFamily family = config.checkpoint_layout.family;
  const bool gated_family =
      family == CheckpointFamily::kMixtral || family == CheckpointFamily::kQwen2Moe;
  const bool relu_family =
      family == CheckpointFamily::kNllbMoe || family == CheckpointFamily::kSwitchTransformers;
  if ((gated_family && !config.gated()) || (relu_family && config.gated())) {
    return FieldError("model.activation",
                      absl::StrCat("checkpoint_layout.family ",
                                   v1::CheckpointLayout::Family_Name(layout.family()), " has ",
                                   gated_family ? "gated SiLU" : "ReLU",
                                   " experts: set activation: EXPERT_ACTIVATION_",
                                   gated_family ? "SILU_GATED" : "RELU"));
  }
  if (proto.num_layers() < 0 || proto.num_layers() > kMaxLayers) {
    return FieldError("model.num_layers", absl::StrCat("must be in [0, ", kMaxLayers,
                                                       "] (0 means 1), got ", proto.num_layers()));
  }
  config.num_layers = std::max(1, proto.num_layers());
  if (proto.shared_expert_d_ff() != 0) {
    if (proto.shared_expert_d_ff() < 0 || proto.shared_expert_d_ff() % config.d_ff != 0) {
      return FieldError("model.shared_expert_d_ff",
                        absl::StrCat("must be a multiple of d_ff = ", config.d_ff,
                                     " (it is served as slices of that width), got ",
                                     proto.shared_expert_d_ff()));
    }
    if (!config.gated()) {
      return FieldError("model.shared_expert_d_ff",
                        "a shared expert is gated SiLU (Qwen2-MoE's): set activation: "
                        "EXPERT_ACTIVATION_SILU_GATED");
    }
    if (config.checkpoint_layout.family != CheckpointFamily::kMoeServe &&
        config.checkpoint_layout.family != CheckpointFamily::kQwen2Moe) {
      return FieldError("model.shared_expert_d_ff",
                        absl::StrCat("checkpoint_layout.family ",
                                     v1::CheckpointLayout::Family_Name(layout.family()),
                                     " has no shared expert (Qwen2-MoE's has)"));
    }
    config.shared_slices = proto.shared_expert_d_ff() / static_cast<int>(config.d_ff);
    if (config.experts_per_layer() > kMaxExperts) {
      return FieldError("model.shared_expert_d_ff",
                        absl::StrCat(config.shared_slices, " slices and ", config.num_experts,
                                     " experts are more than ", kMaxExperts, " per layer"));
    }
  }
  const bool has_placeholder = absl::StrContains(layout.prefix(), "{layer}");
  if (config.checkpoint_layout.family != CheckpointFamily::kMoeServe) {
    // Dotted names of PyTorch modules, "{layer}" standing for a number.
    const std::string name = absl::StrReplaceAll(layout.prefix(), {{"{layer}", "0"}});
    bool ok = !name.empty() && name.size() <= 256 && name.front() != '.' && name.back() != '.';
    for (char c : name) ok &= absl::ascii_isalnum(c) || c == '_' || c == '.';
    if (!ok) {
      return FieldError("model.checkpoint_layout.prefix",
                        absl::StrCat("must be a module name such as "
                                     "\"model.encoder.layers.3.ffn\" (\"{layer}\" standing for "
                                     "the layer's number), got \"",
                                     layout.prefix(), "\""));
    }
    if (config.num_layers > 1 && !has_placeholder) {
      return FieldError("model.checkpoint_layout.prefix",
                        absl::StrCat("with num_layers ", config.num_layers,
                                     " it must name the layer as \"{layer}\" (e.g. "
                                     "\"model.layers.{layer}.mlp\"), got \"",
                                     layout.prefix(), "\""));
    }
  }
  if (!layout.layer_numbers().empty()) {
    if (layout.layer_numbers_size() != config.num_layers) {
      return FieldError("model.checkpoint_layout.layer_numbers",
                        absl::StrCat("lists ", layout.layer_numbers_size(),
                                     " layers, num_layers is ", config.num_layers));
    }
    absl::flat_hash_set<int> seen;
    for (int number : layout.layer_numbers()) {
      if (number < 0 || number >= kMaxLayerNumber || !seen.insert(number).second) {
        return FieldError(
            "model.checkpoint_layout.layer_numbers",
            absl::StrCat("must be distinct numbers in [0, ", kMaxLayerNumber, "), got ", number));
      }
    }
  }
  config.checkpoint_layout.prefix = layout.prefix();
  config.checkpoint_layout.layer_numbers.assign(layout.layer_numbers().begin(),
                                                layout.layer_numbers().end());
  return config;
}

v1::ModelConfig ModelConfigToProto(const ModelConfig& config) {
  v1::ModelConfig proto;
  proto.set_d_model(config.d_model);
  proto.set_d_ff(config.d_ff);
  proto.set_num_experts(config.num_experts);
  proto.set_top_k(config.top_k);
  proto.set_capacity_factor(config.capacity_factor);
  proto.set_overflow_policy(config.overflow == OverflowPolicy::kDrop
                                ? v1::OVERFLOW_POLICY_DROP
                                : v1::OVERFLOW_POLICY_DROPLESS);
  proto.set_seed(config.seed);
  v1::OptimizerConfig& optimizer = *proto.mutable_optimizer();
  switch (config.optimizer.type) {
    case OptimizerType::kSgd:
      optimizer.set_type(v1::OPTIMIZER_TYPE_SGD);
      break;
    case OptimizerType::kSgdMomentum:
      optimizer.set_type(v1::OPTIMIZER_TYPE_SGD_MOMENTUM);
      break;
    case OptimizerType::kAdamW:
      optimizer.set_type(v1::OPTIMIZER_TYPE_ADAMW);
      break;
  }
  optimizer.set_learning_rate(config.optimizer.learning_rate);
  optimizer.set_momentum(config.optimizer.momentum);
  optimizer.set_beta1(config.optimizer.beta1);
  optimizer.set_beta2(config.optimizer.beta2);
  optimizer.set_eps(config.optimizer.eps);
  optimizer.set_weight_decay(config.optimizer.weight_decay);
  optimizer.set_max_grad_norm(config.optimizer.max_grad_norm);
  proto.set_max_batch_tokens(config.max_batch_tokens);
  v1::GateConfig& gate = *proto.mutable_gate();
  gate.set_weights(config.gate.renormalize ? v1::GateConfig::WEIGHTS_RENORMALIZED
                                           : v1::GateConfig::WEIGHTS_PROBABILITIES);
  gate.set_num_groups(config.gate.num_groups);
  gate.set_top_groups(config.gate.top_groups);
  gate.set_scaling_factor(config.gate.scaling_factor);
  gate.set_aux_loss_coef(config.gate.aux_loss_coef);
  gate.set_z_loss_coef(config.gate.z_loss_coef);
  v1::CheckpointLayout& layout = *proto.mutable_checkpoint_layout();
  switch (config.checkpoint_layout.family) {
    case CheckpointFamily::kMoeServe:
      layout.set_family(v1::CheckpointLayout::FAMILY_MOE_SERVE);
      break;
    case CheckpointFamily::kNllbMoe:
      layout.set_family(v1::CheckpointLayout::FAMILY_NLLB_MOE);
      break;
    case CheckpointFamily::kSwitchTransformers:
      layout.set_family(v1::CheckpointLayout::FAMILY_SWITCH_TRANSFORMERS);
      break;
    case CheckpointFamily::kMixtral:
      layout.set_family(v1::CheckpointLayout::FAMILY_MIXTRAL);
      break;
    case CheckpointFamily::kQwen2Moe:
      layout.set_family(v1::CheckpointLayout::FAMILY_QWEN2_MOE);
      break;
  }
  layout.set_prefix(config.checkpoint_layout.prefix);
  layout.mutable_layer_numbers()->Assign(config.checkpoint_layout.layer_numbers.begin(),
                                         config.checkpoint_layout.layer_numbers.end());
  proto.set_num_layers(config.num_layers);
  proto.set_shared_expert_d_ff(static_cast<int32_t>(config.shared_slices * config.d_ff));
  proto.set_activation(config.gated() ? v1::EXPERT_ACTIVATION_SILU_GATED
                                      : v1::EXPERT_ACTIVATION_RELU);
  return proto;
}

absl::StatusOr<ClusterConfig> ClusterConfigFromProto(
    const v1::ClusterConfig& proto, const ModelConfig& model) {
  MOE_RETURN_IF_ERROR(CheckServers(proto));
  ClusterConfig cluster;
  for (const v1::ServerSpec& server : proto.servers()) {
    cluster.servers.push_back({server.name(), server.address()});
  }
  if (proto.spare_servers() < 0 || proto.spare_servers() >= proto.servers_size()) {
    return FieldError("cluster.spare_servers",
                      absl::StrCat(proto.spare_servers(), " of ", proto.servers_size(),
                                   " servers: must be >= 0 and leave at least one server"));
  }
  cluster.spare_servers = proto.spare_servers();
  switch (proto.strategy()) {
    case v1::PLACEMENT_STRATEGY_DATA_PARALLEL:
      cluster.strategy = PlacementStrategy::kDataParallel;
      break;
    case v1::PLACEMENT_STRATEGY_MODEL_PARALLEL:
      cluster.strategy = PlacementStrategy::kModelParallel;
      break;
    case v1::PLACEMENT_STRATEGY_HYBRID:
      cluster.strategy = PlacementStrategy::kHybrid;
      break;
    case v1::PLACEMENT_STRATEGY_DYNAMIC: {
      cluster.strategy = PlacementStrategy::kDynamic;
      MOE_ASSIGN_OR_RETURN(cluster.load_profile,
                           LoadProfileFromProto(proto.load_profile(), model.experts_per_layer()));
      const int slots = proto.dynamic_options().slots_per_server();
      const int64_t num_servers = cluster.active_servers();
      if (slots < 0 || (slots > 0 && slots * num_servers < model.experts_per_layer())) {
        return FieldError("cluster.dynamic_options.slots_per_server",
                          absl::StrCat(slots, " slots x ", num_servers, " servers cannot hold ",
                                       model.experts_per_layer(), " experts"));
      }
      cluster.slots_per_server = slots;
      break;
    }
    case v1::PLACEMENT_STRATEGY_EXPLICIT: {
      cluster.strategy = PlacementStrategy::kExplicit;
      MOE_ASSIGN_OR_RETURN(cluster.explicit_placement,
                           ExplicitPlacementFromProto(proto.explicit_placement(), cluster, model));
      for (size_t l = 0; l < cluster.explicit_placement.size(); ++l) {
        for (size_t e = 0; e < cluster.explicit_placement[l].size(); ++e) {
          for (int s : cluster.explicit_placement[l][e]) {
            if (s >= cluster.active_servers()) {
              return FieldError(
                  "cluster.explicit_placement",
                  absl::StrCat(ExpertKey(static_cast<int>(l), static_cast<int>(e)).ToString(),
                               " on spare server ", cluster.servers[s].name, " (the last ",
                               cluster.spare_servers, " servers host nothing at first)"));
            }
          }
        }
      }
      break;
    }
    default:
      return FieldError(
          "cluster.strategy",
          "must be PLACEMENT_STRATEGY_DATA_PARALLEL, _MODEL_PARALLEL, _HYBRID, "
          "_DYNAMIC or _EXPLICIT");
  }
  return cluster;
}

v1::ClusterConfig ClusterConfigToProto(const ClusterConfig& config) {
  v1::ClusterConfig proto;
  proto.set_spare_servers(config.spare_servers);
  for (const ServerSpec& server : config.servers) {
    v1::ServerSpec* out = proto.add_servers();
    out->set_name(server.name);
    out->set_address(server.address);
  }
  switch (config.strategy) {
    case PlacementStrategy::kDataParallel:
      proto.set_strategy(v1::PLACEMENT_STRATEGY_DATA_PARALLEL);
      break;
    case PlacementStrategy::kModelParallel:
      proto.set_strategy(v1::PLACEMENT_STRATEGY_MODEL_PARALLEL);
      break;
    case PlacementStrategy::kHybrid:
      proto.set_strategy(v1::PLACEMENT_STRATEGY_HYBRID);
      break;
    case PlacementStrategy::kDynamic:
      proto.set_strategy(v1::PLACEMENT_STRATEGY_DYNAMIC);
      proto.mutable_load_profile()->mutable_expert_load()->Assign(config.load_profile.begin(),
                                                                  config.load_profile.end());
      proto.mutable_dynamic_options()->set_slots_per_server(config.slots_per_server);
      break;
    case PlacementStrategy::kExplicit:
      proto.set_strategy(v1::PLACEMENT_STRATEGY_EXPLICIT);
      for (size_t l = 0; l < config.explicit_placement.size(); ++l) {
        for (size_t e = 0; e < config.explicit_placement[l].size(); ++e) {
          v1::ExpertAssignment* assignment = proto.mutable_explicit_placement()->add_experts();
          SetExpertKey(ExpertKey(static_cast<int>(l), static_cast<int>(e)), assignment);
          for (int s : config.explicit_placement[l][e]) {
            assignment->add_servers(config.servers[s].name);
          }
        }
      }
      break;
  }
  return proto;
}

std::string ServingConfigToText(const ServingConfig& config) {
  v1::ServingConfig proto;
  *proto.mutable_model() = ModelConfigToProto(config.model);
  *proto.mutable_cluster() = ClusterConfigToProto(config.cluster);
  std::string text;
  google::protobuf::TextFormat::PrintToString(proto, &text);
  return text;
}

absl::StatusOr<ServingConfig> ServingConfigFromProto(
    const v1::ServingConfig& proto) {
  if (!proto.has_model()) return FieldError("model", "must be set");
  if (!proto.has_cluster()) return FieldError("cluster", "must be set");
  ServingConfig config;
  MOE_ASSIGN_OR_RETURN(config.model, ModelConfigFromProto(proto.model()));
  MOE_ASSIGN_OR_RETURN(config.cluster,
                       ClusterConfigFromProto(proto.cluster(), config.model));
  return config;
}

absl::StatusOr<ServingConfig> ParseServingConfig(absl::string_view text) {
  v1::ServingConfig proto;
  google::protobuf::TextFormat::Parser parser;
  FirstErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &proto)) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a text-format moe.v1.ServingConfig: ", errors.error()));
  }
  return ServingConfigFromProto(proto);
}

absl::StatusOr<ServingConfig> LoadServingConfig(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    return absl::NotFoundError(absl::StrCat("config ", path, ": cannot open"));
  }
  std::stringstream text;
  text << file.rdbuf();
  absl::StatusOr<ServingConfig> config = ParseServingConfig(text.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat("config ", path, ": ",
                                     config.status().message()));
  }
  return config;
}

}  // namespace moe
