#include "common/checkpoint.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <map>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/atomic_file.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using json = nlohmann::json;

// The index metadata's producer of the checkpoints written here.
constexpr char kProducer[] = "moe-serve";

// One tensor of the model: its checkpoint name and nn.Linear shape.
struct TensorSlot {
  std::string name;
  Shape shape;       // as stored: [out, in] for matrices
  int expert = -1;   // -1 for the gate
  ExpertTensor which = ExpertTensor::kW1;
  int layer = 0;
  // A part of the stored matrix: `count` rows (slice_dim 0) or columns
  // (slice_dim 1) from `begin` (Qwen2-MoE's shared expert, served in
  // slices); count 0: all of it.
  int slice_dim = 0;
  int64_t begin = 0;
  int64_t count = 0;
  // The gate's: the first column of W_g [d_model, gate_width] it fills.
  int gate_column = 0;
};

std::string LayerPrefix(int layer) {
  return layer == 0 ? std::string() : absl::StrCat("layers.", layer, ".");
}

// A Hugging Face model's name for the tensor of `layout`'s MoE block
// (expert < 0: the router); empty for a tensor it does not have (the biases
// of Switch Transformers' and the gated SiLU families' experts).
std::string HuggingFaceName(const CheckpointLayout& layout, int layer, int expert,
                            ExpertTensor which) {
  const std::string p = layout.LayerPrefix(layer);
  switch (layout.family) {
    case CheckpointFamily::kMoeServe:
      break;
    case CheckpointFamily::kNllbMoe:
    case CheckpointFamily::kSwitchTransformers: {
      if (expert < 0) return absl::StrCat(p, ".router.classifier.weight");
      const std::string module = absl::StrCat(p, ".experts.expert_", expert, ".");
      const bool nllb = layout.family == CheckpointFamily::kNllbMoe;
      switch (which) {
        case ExpertTensor::kW1:
          return module + (nllb ? "fc1.weight" : "wi.weight");
        case ExpertTensor::kB1:
          return nllb ? module + "fc1.bias" : std::string();
        case ExpertTensor::kW2:
          return module + (nllb ? "fc2.weight" : "wo.weight");
        case ExpertTensor::kB2:
          return nllb ? module + "fc2.bias" : std::string();
        case ExpertTensor::kW3:
          return std::string();
      }
      break;
    }
    case CheckpointFamily::kMixtral:
    case CheckpointFamily::kQwen2Moe: {
      if (expert < 0) return absl::StrCat(p, ".gate.weight");
      const std::string module = absl::StrCat(p, ".experts.", expert, ".");
      const bool mixtral = layout.family == CheckpointFamily::kMixtral;
      switch (which) {
        case ExpertTensor::kW1:
          return module + (mixtral ? "w1.weight" : "gate_proj.weight");
        case ExpertTensor::kW2:
          return module + (mixtral ? "w2.weight" : "down_proj.weight");
        case ExpertTensor::kW3:
          return module + (mixtral ? "w3.weight" : "up_proj.weight");
        case ExpertTensor::kB1:
        case ExpertTensor::kB2:
          return std::string();
      }
      break;
    }
  }
  return std::string();
}

// The tensors of MoE layer `layer`, named as `layout` names them
// (moe-serve's own names by default); with a `state` (optimizer state),
// each name gets "." + state. A tensor the layout does not have is left
// out (its weights stay zero).
std::vector<TensorSlot> LayerSlots(const ModelConfig& model, int layer,
                                   const std::string& state = "",
                                   const CheckpointLayout& layout = {}) {
  const bool own = layout.family == CheckpointFamily::kMoeServe;
  const std::string suffix = state.empty() ? std::string() : "." + state;
  std::vector<TensorSlot> slots;
  // moe-serve's names hold the whole gate (the shared expert's gate as its
  // last row) and the shared expert's slices as experts.
  slots.push_back({(own ? GateTensorName(layer) : HuggingFaceName(layout, layer, -1, {})) + suffix,
                   {own ? model.gate_width() : model.num_experts, model.d_model},
                   -1,
                   ExpertTensor::kW1,
                   layer});
  for (int e = 0; e < (own ? model.experts_per_layer() : model.num_experts); ++e) {
    const ExpertKey key(layer, e);
    for (ExpertTensor which : kAllExpertTensors) {
      if (!HasExpertTensor(model, which)) continue;
      // Bias-free experts in moe-serve's names keep their (zero) biases.
      const std::string name =
          own ? ExpertTensorName(key, which) : HuggingFaceName(layout, layer, e, which);
      if (name.empty()) continue;
      Shape shape = ExpertTensorShape(model, which);
      std::reverse(shape.begin(), shape.end());  // nn.Linear's [out, in]
      slots.push_back({name + suffix, shape, e, which, layer});
    }
  }
  if (!own && model.has_shared_expert()) {
    // Qwen2-MoE: {p}.shared_expert_gate.weight [1, d_model] is W_g's last
    // column; slice i of {p}.shared_expert is rows [i d_ff, (i + 1) d_ff)
    // of gate_proj and up_proj [D_s, d_model] and those columns of
    // down_proj [d_model, D_s].
    const std::string p = layout.LayerPrefix(layer);
    TensorSlot gate{p + ".shared_expert_gate.weight" + suffix, {1, model.d_model}, -1};
    gate.layer = layer;
    gate.gate_column = model.num_experts;
    slots.push_back(gate);
    const int64_t width = int64_t{model.shared_slices} * model.d_ff;
    for (int i = 0; i < model.shared_slices; ++i) {
      for (const auto& [which, name] :
           {std::pair{ExpertTensor::kW1, "gate_proj"}, std::pair{ExpertTensor::kW3, "up_proj"},
            std::pair{ExpertTensor::kW2, "down_proj"}}) {
        const bool down = which == ExpertTensor::kW2;
        TensorSlot slice{absl::StrCat(p, ".shared_expert.", name, ".weight", suffix),
                         down ? Shape{model.d_model, width} : Shape{width, model.d_model},
                         model.num_experts + i, which, layer};
        slice.slice_dim = down ? 1 : 0;
        slice.begin = i * model.d_ff;
        slice.count = model.d_ff;
        slots.push_back(slice);
      }
    }
  }
  return slots;
}

// The tensors of every layer of the model.
std::vector<TensorSlot> ModelSlots(const ModelConfig& model, const std::string& state = "",
                                   const CheckpointLayout& layout = {}) {
  std::vector<TensorSlot> slots;
  for (int l = 0; l < model.num_layers; ++l) {
    std::vector<TensorSlot> layer = LayerSlots(model, l, state, layout);
    std::move(layer.begin(), layer.end(), std::back_inserter(slots));
  }
  return slots;
}

// [rows, cols] -> [cols, rows].
FloatTensor Transposed(absl::Span<const float> values, int64_t rows, int64_t cols) {
  FloatTensor out({cols, rows});
  absl::Span<float> dst = out.mutable_values();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = values[r * cols + c];
  }
  return out;
}

}  // namespace

std::string GateTensorName(int layer) { return LayerPrefix(layer) + "gate.weight"; }

std::string ExpertTensorName(ExpertKey expert, ExpertTensor which) {
  const char* suffix = "";
  switch (which) {
    case ExpertTensor::kW1:
      suffix = "w1.weight";
      break;
    case ExpertTensor::kB1:
      suffix = "w1.bias";
      break;
    case ExpertTensor::kW2:
      suffix = "w2.weight";
      break;
    case ExpertTensor::kB2:
      suffix = "w2.bias";
      break;
    case ExpertTensor::kW3:
      suffix = "w3.weight";
      break;
  }
  return absl::StrCat(LayerPrefix(expert.layer), "experts.", expert.expert, ".", suffix);
}

namespace {

// Which experts `selection` asks for, validated.
absl::StatusOr<std::vector<bool>> WantedExperts(const std::string& path, const ModelConfig& model,
                                                const CheckpointSelection& selection) {
  MOE_RETURN_IF_ERROR(CheckLayer(model, selection.layer));
  std::vector<bool> wanted(model.experts_per_layer(), !selection.experts.has_value());
  if (selection.experts.has_value()) {
    for (int e : *selection.experts) {
      if (e < 0 || e >= model.experts_per_layer()) {
        return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path, ": expert ", e,
                                                       " is out of range [0, ",
                                                       model.experts_per_layer(), ")"));
      }
      wanted[e] = true;
    }
  }
  return wanted;
}

absl::Status UnexpectedTensor(const std::string& path, const ModelConfig& model,
                              const std::string& name) {
  return absl::InvalidArgumentError(
      absl::StrCat("checkpoint ", path, ": unexpected tensor \"", name, "\" (the model has ",
                   model.num_layers, " layer(s) of ", model.num_experts,
                   " experts; names are gate.weight, experts.{e}.{w1,w2}.{weight,bias}",
                   model.gated() ? " and experts.{e}.w3.weight" : "",
                   model.num_layers > 1 ? ", prefixed \"layers.{l}.\" in layers past 0" : "", ")"));
}

absl::Status CheckEntry(const std::string& path, const TensorSlot& slot,
                        const SafetensorsEntry* entry) {
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path, ": missing tensor \"",
                                                   slot.name, "\" ", ShapeString(slot.shape)));
  }
  if (entry->type == StoredType::kOther) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", path, ": tensor \"", slot.name, "\" is ", entry->dtype,
                     ", the wrong dtype for weights (want F32, BF16 or F16)"));
  }
  if (entry->shape != slot.shape) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path, ": tensor \"", slot.name,
                                                   "\" has shape ", ShapeString(entry->shape),
                                                   ", the model needs ", ShapeString(slot.shape)));
  }
  return absl::OkStatus();
}

// Reads `slot` into `weights` (transposed to the x W layout).
absl::Status ReadSlot(const SafetensorsReader& reader, const ModelConfig& model,
                      const TensorSlot& slot, std::vector<float>& buffer, MoeWeights& weights) {
  buffer.resize(NumElements(slot.shape));
  MOE_RETURN_IF_ERROR(reader.ReadFloats(*reader.Find(slot.name), absl::MakeSpan(buffer)));
  if (slot.count > 0) {
    // Keep the slice's rows or columns only.
    const int64_t rows = slot.shape[0], cols = slot.shape[1];
    std::vector<float> part;
    part.reserve(slot.count * (slot.slice_dim == 0 ? cols : rows));
    for (int64_t r = 0; r < rows; ++r) {
      if (slot.slice_dim == 0 && (r < slot.begin || r >= slot.begin + slot.count)) continue;
      const float* row = buffer.data() + r * cols;
      if (slot.slice_dim == 0) {
        part.insert(part.end(), row, row + cols);
      } else {
        part.insert(part.end(), row + slot.begin, row + slot.begin + slot.count);
      }
    }
    buffer = std::move(part);
  }
  const int64_t rows = slot.count > 0 && slot.slice_dim == 0 ? slot.count : slot.shape[0];
  FloatTensor tensor = slot.shape.size() == 2
                           ? Transposed(buffer, rows, static_cast<int64_t>(buffer.size()) / rows)
                           : FloatTensor(slot.shape, buffer);
  if (slot.expert >= 0) {
    weights.experts[slot.expert].tensor(slot.which) = std::move(tensor);
    return absl::OkStatus();
  }
  // The gate's columns [gate_column, gate_column + rows) of W_g.
  const int64_t d_model = tensor.dim(0), width = model.gate_width();
  if (!weights.gate) weights.gate = FloatTensor({d_model, width});
  for (int64_t i = 0; i < d_model; ++i) {
    std::copy_n(tensor.row(i).data(), tensor.dim(1),
                weights.gate->mutable_values().data() + i * width + slot.gate_column);
  }
  return absl::OkStatus();
}

bool Wanted(const TensorSlot& slot, const CheckpointSelection& selection,
            const std::vector<bool>& wanted) {
  if (slot.layer != selection.layer) return false;
  return slot.expert < 0 ? selection.gate : wanted[slot.expert];
}

// A moe-serve file holds one layer and nothing else; a Hugging Face
// model's holds the whole model, of which only the layer's tensors are read.
absl::StatusOr<MoeWeights> LoadSingleFile(const std::string& path, const ModelConfig& model,
                                          const CheckpointSelection& selection,
                                          const CheckpointLayout& layout) {
  MOE_ASSIGN_OR_RETURN(SafetensorsReader reader, SafetensorsReader::Open(path));
  const std::vector<TensorSlot> slots = ModelSlots(model, "", layout);
  absl::flat_hash_set<std::string> known;
  for (const TensorSlot& slot : slots) {
    known.insert(slot.name);
    MOE_RETURN_IF_ERROR(CheckEntry(path, slot, reader.Find(slot.name)));
  }
  for (const SafetensorsEntry& entry : reader.entries()) {
    if (layout.family == CheckpointFamily::kMoeServe && !known.contains(entry.name)) {
      return UnexpectedTensor(path, model, entry.name);
    }
  }
  MOE_ASSIGN_OR_RETURN(const std::vector<bool> wanted, WantedExperts(path, model, selection));
  MoeWeights weights;
  weights.layer = selection.layer;
  std::vector<float> buffer;
  for (const TensorSlot& slot : slots) {
    if (Wanted(slot, selection, wanted)) {
      MOE_RETURN_IF_ERROR(ReadSlot(reader, model, slot, buffer, weights));
    }
  }
  return weights;
}

// A parsed model.safetensors.index.json.
struct ShardIndex {
  std::string directory;
  CheckpointMetadata metadata;
  // metadata.producer: "moe-serve" for the checkpoints it writes.
  std::string producer;
  // tensor name -> shard file name (a plain name in `directory`).
  std::map<std::string, std::string> weight_map;
};

bool EndsWith(const std::string& s, absl::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix.data(), suffix.size()) == 0;
}

// The index `path` names (a directory holding one, or the index file), or
// nullopt for a single-file checkpoint.
absl::StatusOr<std::optional<ShardIndex>> ReadIndex(const std::string& path) {
  std::string index_path;
  std::string directory;
  struct stat info;
  if (stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
    directory = path;
    index_path = absl::StrCat(path, "/", kCheckpointIndexName);
  } else if (EndsWith(path, ".index.json")) {
    index_path = path;
    const size_t slash = path.rfind('/');
    directory = slash == std::string::npos ? "." : path.substr(0, slash);
  } else {
    return std::nullopt;
  }
  // An index is kilobytes; a hostile one is not read whole into memory.
  constexpr int64_t kMaxIndexBytes = 64 << 20;
  std::ifstream file(index_path, std::ios::binary);
  if (!file) {
    return absl::NotFoundError(absl::StrCat("checkpoint ", path, ": no ", index_path,
                                            " (a checkpoint directory is complete only once "
                                            "its index is written)"));
  }
  file.seekg(0, std::ios::end);
  const int64_t size = file.tellg();
  if (size < 0 || size > kMaxIndexBytes) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", index_path, ": index of ", size,
                                                   " bytes (at most ", kMaxIndexBytes, ")"));
  }
  file.seekg(0);
  std::string text(size, '\0');
  file.read(text.data(), size);
  const json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", index_path, ": ", what));
  };
  if (!index.is_object()) return bad("not a JSON object");
  const auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object()) return bad("no \"weight_map\" object");
  ShardIndex result;
  result.directory = directory;
  for (const auto& [name, shard] : map->items()) {
    if (!shard.is_string()) return bad(absl::StrCat("shard of \"", name, "\" is not a string"));
    const std::string file_name = shard.get<std::string>();
    if (file_name.empty() || file_name.find('/') != std::string::npos || file_name == "." ||
        file_name == ".." || !EndsWith(file_name, ".safetensors")) {
      return bad(absl::StrCat("shard \"", file_name, "\" of \"", name,
                              "\" is not a .safetensors file name in the checkpoint directory"));
    }
    result.weight_map[name] = file_name;
  }
  const auto metadata = index.find("metadata");
  if (metadata != index.end() && metadata->is_object()) {
    const auto step = metadata->find("step");
    if (step != metadata->end()) {
      if (!step->is_string() ||
          !absl::SimpleAtoi(step->get<std::string>(), &result.metadata.step)) {
        return bad("metadata.step is not a decimal string");
      }
    }
    const auto lineage = metadata->find("lineage");
    if (lineage != metadata->end() && lineage->is_string()) {
      result.metadata.lineage = lineage->get<std::string>();
    }
    const auto producer = metadata->find("producer");
    if (producer != metadata->end() && producer->is_string()) {
      result.producer = producer->get<std::string>();
    }
  }
  return result;
}

// The tensors of `states` (one MoeWeights each; {""}: the weights), after
// checking the index names every one of them once and nothing else.
absl::StatusOr<std::vector<MoeWeights>> LoadSharded(const ShardIndex& index,
                                                    const ModelConfig& model,
                                                    const CheckpointSelection& selection,
                                                    const std::vector<std::string>& states,
                                                    const CheckpointLayout& layout = {}) {
  const std::string& path = index.directory;
  std::vector<std::vector<TensorSlot>> slots;
  absl::flat_hash_set<std::string> known;
  for (const std::string& state : states) {
    slots.push_back(ModelSlots(model, state, layout));
    for (const TensorSlot& slot : slots.back()) {
      known.insert(slot.name);
      if (index.weight_map.count(slot.name) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path,
                                                       ": the index has no tensor \"", slot.name,
                                                       "\" ", ShapeString(slot.shape)));
      }
    }
  }
  for (const auto& [name, shard] : index.weight_map) {
    if (layout.family == CheckpointFamily::kMoeServe && !known.contains(name)) {
      return UnexpectedTensor(path, model, name);
    }
  }
  MOE_ASSIGN_OR_RETURN(const std::vector<bool> wanted, WantedExperts(path, model, selection));
  // Only the shards holding wanted tensors are opened.
  std::map<std::string, std::vector<std::pair<size_t, const TensorSlot*>>> by_shard;
  for (size_t k = 0; k < slots.size(); ++k) {
    for (const TensorSlot& slot : slots[k]) {
      if (Wanted(slot, selection, wanted)) {
        by_shard[index.weight_map.at(slot.name)].emplace_back(k, &slot);
      }
    }
  }
  std::vector<MoeWeights> out(states.size());
  for (MoeWeights& weights : out) weights.layer = selection.layer;
  std::vector<float> buffer;
  for (const auto& [shard, shard_slots] : by_shard) {
    const std::string shard_path = absl::StrCat(index.directory, "/", shard);
    MOE_ASSIGN_OR_RETURN(SafetensorsReader reader, SafetensorsReader::Open(shard_path));
    for (const auto& [k, slot] : shard_slots) {
      MOE_RETURN_IF_ERROR(CheckEntry(shard_path, *slot, reader.Find(slot->name)));
      MOE_RETURN_IF_ERROR(ReadSlot(reader, model, *slot, buffer, out[k]));
    }
  }
  return out;
}

// Writes `directory`/`name`: the index of `states`' tensors ({""}: the
// weights), each exactly once, durably and atomically.
absl::Status WriteIndex(const std::string& directory, const char* name, const ModelConfig& model,
                        const std::vector<std::string>& states,
                        const std::map<std::string, std::string>& weight_map, int64_t total_size,
                        const CheckpointMetadata& metadata) {
  // Every tensor exactly once, nothing else: an index that loads is whole.
  size_t found = 0;
  for (const std::string& state : states) {
    for (const TensorSlot& slot : ModelSlots(model, state)) {
      if (weight_map.count(slot.name) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("checkpoint index: no shard holds \"", slot.name, "\""));
      }
      ++found;
    }
  }
  if (found != weight_map.size()) {
    return absl::InvalidArgumentError("checkpoint index: tensors the model does not have");
  }
  json index = {{"metadata",
                 {{"total_size", total_size},
                  {"step", absl::StrCat(metadata.step)},
                  {"lineage", metadata.lineage},
                  {"producer", kProducer}}},
                {"weight_map", json::object()}};
  for (const auto& [tensor, shard] : weight_map) index["weight_map"][tensor] = shard;
  const std::string text = index.dump(2) + "\n";
  MOE_ASSIGN_OR_RETURN(AtomicFileWriter file,
                       AtomicFileWriter::Create(absl::StrCat(directory, "/", name)));
  MOE_RETURN_IF_ERROR(file.Append(text.data(), text.size()));
  return file.Commit();
}

}  // namespace

absl::StatusOr<MoeWeights> LoadCheckpoint(const std::string& path, const ModelConfig& model,
                                          const CheckpointSelection& selection) {
  MOE_ASSIGN_OR_RETURN(std::optional<ShardIndex> index, ReadIndex(path));
  // What moe-serve wrote is in its own names, whichever model it started
  // from.
  const CheckpointLayout layout =
      index && index->producer == kProducer ? CheckpointLayout{} : model.checkpoint_layout;
  MoeWeights weights;
  if (index) {
    MOE_ASSIGN_OR_RETURN(std::vector<MoeWeights> loaded,
                         LoadSharded(*index, model, selection, {""}, layout));
    weights = std::move(loaded[0]);
  } else {
    MOE_ASSIGN_OR_RETURN(weights, LoadSingleFile(path, model, selection, layout));
  }
  // Tensors the layout does not have (bias-free experts' biases): zero.
  for (auto& [e, expert] : weights.experts) {
    for (ExpertTensor which : kAllExpertTensors) {
      FloatTensor& tensor = expert.tensor(which);
      if (HasExpertTensor(model, which) && tensor.values().empty()) {
        tensor = FloatTensor(ExpertTensorShape(model, which));
      }
    }
  }
  return weights;
}

absl::StatusOr<FloatTensor> LoadGates(const std::string& path, const ModelConfig& model) {
  std::vector<FloatTensor> gates;
  for (int l = 0; l < model.num_layers; ++l) {
    CheckpointSelection selection{/*gate=*/true, std::vector<int>{}, l};
    MOE_ASSIGN_OR_RETURN(MoeWeights weights, LoadCheckpoint(path, model, selection));
    gates.push_back(*std::move(weights.gate));
  }
  return StackGates(model, gates);
}

absl::StatusOr<std::optional<std::vector<FloatTensor>>> LoadGateOptimizerState(
    const std::string& path, const ModelConfig& model) {
  // states[k][l]: state k of layer l's gate.
  std::vector<std::vector<FloatTensor>> states;
  for (int l = 0; l < model.num_layers; ++l) {
    CheckpointSelection selection{/*gate=*/true, std::vector<int>{}, l};
    MOE_ASSIGN_OR_RETURN(std::optional<std::vector<MoeWeights>> loaded,
                         LoadOptimizerState(path, model, selection));
    if (!loaded) return std::nullopt;
    states.resize(loaded->size());
    for (size_t k = 0; k < loaded->size(); ++k) states[k].push_back(*std::move((*loaded)[k].gate));
  }
  std::vector<FloatTensor> stacked;
  for (const std::vector<FloatTensor>& state : states) stacked.push_back(StackGates(model, state));
  return stacked;
}

std::vector<std::string> OptimizerStateNames(OptimizerType type) {
  switch (type) {
    case OptimizerType::kSgd:
      return {};
    case OptimizerType::kSgdMomentum:
      return {"momentum_buffer"};
    case OptimizerType::kAdamW:
      return {"exp_avg", "exp_avg_sq"};
  }
  return {};
}

absl::StatusOr<std::optional<std::vector<MoeWeights>>> LoadOptimizerState(
    const std::string& path, const ModelConfig& model, const CheckpointSelection& selection) {
  const std::vector<std::string> states = OptimizerStateNames(model.optimizer.type);
  MOE_ASSIGN_OR_RETURN(std::optional<ShardIndex> weights_index, ReadIndex(path));
  if (!weights_index || states.empty()) return std::nullopt;
  const std::string index_path = absl::StrCat(weights_index->directory, "/", kOptimizerIndexName);
  struct stat info;
  if (stat(index_path.c_str(), &info) != 0) return std::nullopt;
  MOE_ASSIGN_OR_RETURN(std::optional<ShardIndex> index, ReadIndex(index_path));
  if (index->metadata.step != weights_index->metadata.step) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", index_path, ": optimizer state of step ", index->metadata.step,
                     ", the weights are of step ", weights_index->metadata.step));
  }
  MOE_ASSIGN_OR_RETURN(std::vector<MoeWeights> loaded,
                       LoadSharded(*index, model, selection, states));
  return loaded;
}

absl::StatusOr<CheckpointMetadata> ReadCheckpointMetadata(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(std::optional<ShardIndex> index, ReadIndex(path));
  if (!index) return CheckpointMetadata{};
  return index->metadata;
}

absl::StatusOr<std::string> ResolveCheckpointPath(const std::string& root,
                                                  const std::string& relative) {
  auto bad = [&](absl::string_view why) {
    // The path comes from a request: shown, but not at any length.
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint path \"", absl::string_view(relative).substr(0, 100), "\": ", why));
  };
  if (root.empty()) return absl::FailedPreconditionError("no checkpoint directory configured");
  if (relative.empty() || relative.size() > 1024) return bad("empty or longer than 1024");
  for (absl::string_view part : absl::StrSplit(relative, '/')) {
    if (part.empty() || part == "." || part == "..") {
      return bad("each '/'-separated part must be a plain name");
    }
    for (char c : part) {
      if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
        return bad("only [A-Za-z0-9._-] and '/' are allowed");
      }
    }
  }
  return absl::StrCat(root, "/", relative);
}

absl::StatusOr<std::optional<LatestCheckpoint>> FindLatestCheckpoint(const std::string& directory) {
  std::optional<LatestCheckpoint> latest;
  DIR* dir = opendir(directory.c_str());
  if (dir == nullptr) return latest;
  while (const dirent* entry = readdir(dir)) {
    uint64_t step = 0;
    absl::string_view name = entry->d_name;
    if (!absl::ConsumePrefix(&name, "step-")) continue;
    if (!absl::SimpleAtoi(name, &step)) continue;
    const std::string path = absl::StrCat(directory, "/", entry->d_name);
    // Torn (no index) or inconsistent directories are skipped, not fatal.
    absl::StatusOr<CheckpointMetadata> metadata = ReadCheckpointMetadata(path);
    if (!metadata.ok() || metadata->step != step) continue;
    if (!latest || step > latest->step) latest = LatestCheckpoint{path, step};
  }
  closedir(dir);
  return latest;
}

absl::StatusOr<StartingCheckpoint> ChooseStartingCheckpoint(const std::string& checkpoint_path,
                                                            const std::string& checkpoint_dir) {
  StartingCheckpoint start{checkpoint_path, {}};
  if (!checkpoint_path.empty()) {
    MOE_ASSIGN_OR_RETURN(start.metadata, ReadCheckpointMetadata(checkpoint_path));
  }
  if (checkpoint_dir.empty()) return start;
  MOE_ASSIGN_OR_RETURN(const std::optional<LatestCheckpoint> latest,
                       FindLatestCheckpoint(checkpoint_dir));
  if (latest && latest->step > start.metadata.step) {
    start.path = latest->path;
    MOE_ASSIGN_OR_RETURN(start.metadata, ReadCheckpointMetadata(latest->path));
  }
  return start;
}

std::string ShardFileName(int shard, int num_shards) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", shard, num_shards);
}

absl::StatusOr<int64_t> SaveCheckpointShard(const std::string& path, const ModelConfig& model,
                                            const MoeWeights& part, DType dtype,
                                            std::vector<std::string>* tensor_names) {
  return SaveCheckpointShard(path, model, {{"", &part}}, dtype, tensor_names);
}

absl::StatusOr<int64_t> SaveCheckpointShard(const std::string& path, const ModelConfig& model,
                                            const std::vector<ShardPart>& parts, DType dtype,
                                            std::vector<std::string>* tensor_names) {
  // Must outlive the writer's Write(), and never move: the writer holds
  // spans of them.
  std::vector<FloatTensor> transposed;
  size_t matrices = 0;
  for (const ShardPart& shard_part : parts) {
    matrices += (shard_part.tensors->gate ? 1 : 0) +
                (model.gated() ? 3 : 2) * shard_part.tensors->experts.size();
  }
  transposed.reserve(matrices);
  SafetensorsWriter writer;
  int64_t bytes = 0;
  for (const ShardPart& shard_part : parts) {
    const MoeWeights& part = *shard_part.tensors;
    MOE_RETURN_IF_ERROR(CheckLayer(model, part.layer));
    for (const TensorSlot& slot : LayerSlots(model, part.layer, shard_part.state)) {
      const FloatTensor* source = nullptr;
      if (slot.expert < 0) {
        if (!part.gate) continue;
        source = &*part.gate;
      } else {
        auto it = part.experts.find(slot.expert);
        if (it == part.experts.end()) continue;
        source = &it->second.tensor(slot.which);
      }
      const Shape memory_shape =
          slot.shape.size() == 2 ? Shape{slot.shape[1], slot.shape[0]} : slot.shape;
      if (source->shape() != memory_shape) {
        return absl::InvalidArgumentError(absl::StrCat("save checkpoint: ", slot.name,
                                                       " has shape ", ShapeString(source->shape()),
                                                       ", expected ", ShapeString(memory_shape)));
      }
      if (slot.shape.size() == 2) {
        transposed.push_back(Transposed(source->values(), memory_shape[0], memory_shape[1]));
        writer.Add(slot.name, slot.shape, transposed.back().values());
      } else {
        writer.Add(slot.name, slot.shape, source->values());
      }
      bytes += NumElements(slot.shape) * DTypeSize(dtype);
      if (tensor_names != nullptr) tensor_names->push_back(slot.name);
    }
  }
  MOE_RETURN_IF_ERROR(writer.Write(path, dtype));
  return bytes;
}

absl::Status WriteCheckpointIndex(const std::string& directory, const ModelConfig& model,
                                  const std::map<std::string, std::string>& weight_map,
                                  int64_t total_size, const CheckpointMetadata& metadata) {
  return WriteIndex(directory, kCheckpointIndexName, model, {""}, weight_map, total_size, metadata);
}

absl::Status WriteOptimizerIndex(const std::string& directory, const ModelConfig& model,
                                 const std::map<std::string, std::string>& weight_map,
                                 int64_t total_size, const CheckpointMetadata& metadata) {
  return WriteIndex(directory, kOptimizerIndexName, model,
                    OptimizerStateNames(model.optimizer.type), weight_map, total_size, metadata);
}

std::string OptimizerShardFileName(int shard, int num_shards) {
  return absl::StrFormat("optimizer-%05d-of-%05d.safetensors", shard, num_shards);
}

absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const MoeWeights& weights, DType dtype) {
  return SaveCheckpoint(path, model, std::vector<const MoeWeights*>{&weights}, dtype);
}

absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const std::vector<const MoeWeights*>& layers, DType dtype) {
  std::vector<bool> seen(model.num_layers, false);
  std::vector<ShardPart> parts;
  for (const MoeWeights* weights : layers) {
    MOE_RETURN_IF_ERROR(CheckLayer(model, weights->layer));
    if (seen[weights->layer]) {
      return absl::InvalidArgumentError(
          absl::StrCat("save checkpoint: layer ", weights->layer, " is given twice"));
    }
    seen[weights->layer] = true;
    if (!weights->gate.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("save checkpoint: layer ", weights->layer, ": no gate weights"));
    }
    for (int e = 0; e < model.experts_per_layer(); ++e) {
      if (weights->experts.count(e) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "save checkpoint: ", ExpertKey(weights->layer, e).ToString(), " is missing"));
      }
    }
    parts.push_back({"", weights});
  }
  for (int l = 0; l < model.num_layers; ++l) {
    if (!seen[l]) {
      return absl::InvalidArgumentError(absl::StrCat("save checkpoint: layer ", l, " is missing"));
    }
  }
  return SaveCheckpointShard(path, model, parts, dtype, nullptr).status();
}

}  // namespace moe
