#include "common/checkpoint.h"

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status_macros.h"

namespace moe {
namespace {

// One tensor of the model: its checkpoint name and nn.Linear shape.
struct TensorSlot {
  std::string name;
  Shape shape;       // as stored: [out, in] for matrices
  int expert = -1;   // -1 for the gate
  ExpertTensor which = ExpertTensor::kW1;
};

std::string LayerPrefix(int layer) {
  return layer == 0 ? std::string() : absl::StrCat("layers.", layer, ".");
}

// The tensors of the one MoE layer a checkpoint file holds (layer 0).
std::vector<TensorSlot> ModelSlots(const ModelConfig& model) {
  constexpr int kLayer = 0;
  std::vector<TensorSlot> slots;
  slots.push_back({GateTensorName(kLayer), {model.num_experts, model.d_model}});
  for (int e = 0; e < model.num_experts; ++e) {
    const ExpertKey key(kLayer, e);
    for (ExpertTensor which : kAllExpertTensors) {
      Shape shape;
      switch (which) {
        case ExpertTensor::kW1:
          shape = {model.d_ff, model.d_model};
          break;
        case ExpertTensor::kB1:
          shape = {model.d_ff};
          break;
        case ExpertTensor::kW2:
          shape = {model.d_model, model.d_ff};
          break;
        case ExpertTensor::kB2:
          shape = {model.d_model};
          break;
      }
      slots.push_back({ExpertTensorName(key, which), shape, e, which});
    }
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
  }
  return absl::StrCat(LayerPrefix(expert.layer), "experts.", expert.expert, ".", suffix);
}

absl::StatusOr<MoeWeights> LoadCheckpoint(const std::string& path,
                                          const ModelConfig& model,
                                          const CheckpointSelection& selection) {
  MOE_ASSIGN_OR_RETURN(SafetensorsReader reader, SafetensorsReader::Open(path));
  const std::vector<TensorSlot> slots = ModelSlots(model);

  absl::flat_hash_set<std::string> known;
  for (const TensorSlot& slot : slots) {
    known.insert(slot.name);
    const SafetensorsEntry* entry = reader.Find(slot.name);
    if (entry == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", path, ": missing tensor \"", slot.name, "\" ",
          ShapeString(slot.shape)));
    }
    if (entry->shape != slot.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", path, ": tensor \"", slot.name, "\" has shape ",
          ShapeString(entry->shape), ", the model needs ",
          ShapeString(slot.shape)));
    }
  }
  for (const SafetensorsEntry& entry : reader.entries()) {
    if (!known.contains(entry.name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", path, ": unexpected tensor \"", entry.name,
          "\" (the model has ", model.num_experts, " experts; names are "
          "gate.weight and experts.{e}.{w1,w2}.{weight,bias})"));
    }
  }

  std::vector<bool> wanted(model.num_experts, !selection.experts.has_value());
  if (selection.experts.has_value()) {
    for (int e : *selection.experts) {
      if (e < 0 || e >= model.num_experts) {
        return absl::InvalidArgumentError(absl::StrCat(
            "checkpoint ", path, ": expert ", e, " is out of range [0, ",
            model.num_experts, ")"));
      }
      wanted[e] = true;
    }
  }

  MoeWeights weights;
  std::vector<float> buffer;
  for (const TensorSlot& slot : slots) {
    if (slot.expert < 0 ? !selection.gate : !wanted[slot.expert]) continue;
    const SafetensorsEntry& entry = *reader.Find(slot.name);
    buffer.resize(NumElements(slot.shape));
    MOE_RETURN_IF_ERROR(reader.ReadFloats(entry, absl::MakeSpan(buffer)));
    FloatTensor tensor = slot.shape.size() == 2
                             ? Transposed(buffer, slot.shape[0], slot.shape[1])
                             : FloatTensor(slot.shape, buffer);
    if (slot.expert < 0) {
      weights.gate = std::move(tensor);
    } else {
      weights.experts[slot.expert].tensor(slot.which) = std::move(tensor);
    }
  }
  return weights;
}

absl::Status SaveCheckpoint(const std::string& path, const ModelConfig& model,
                            const MoeWeights& weights, DType dtype) {
  if (!weights.gate.has_value()) {
    return absl::InvalidArgumentError("save checkpoint: no gate weights");
  }
  const std::vector<TensorSlot> slots = ModelSlots(model);
  // Matrices are transposed back to nn.Linear layout; they must outlive
  // the writer's Write().
  std::vector<FloatTensor> transposed;
  transposed.reserve(slots.size());
  SafetensorsWriter writer;
  for (const TensorSlot& slot : slots) {
    const FloatTensor* source = nullptr;
    if (slot.expert < 0) {
      source = &*weights.gate;
    } else {
      auto it = weights.experts.find(slot.expert);
      if (it == weights.experts.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("save checkpoint: expert ", slot.expert, " is missing"));
      }
      source = &it->second.tensor(slot.which);
    }
    const Shape memory_shape = slot.shape.size() == 2
                                   ? Shape{slot.shape[1], slot.shape[0]}
                                   : slot.shape;
    if (source->shape() != memory_shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "save checkpoint: ", slot.name, " has shape ",
          ShapeString(source->shape()), ", expected ", ShapeString(memory_shape)));
    }
    if (slot.shape.size() == 2) {
      transposed.push_back(
          Transposed(source->values(), memory_shape[0], memory_shape[1]));
      writer.Add(slot.name, slot.shape, transposed.back().values());
    } else {
      writer.Add(slot.name, slot.shape, source->values());
    }
  }
  return writer.Write(path, dtype);
}

}  // namespace moe
