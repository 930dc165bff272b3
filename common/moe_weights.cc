#include "common/moe_weights.h"

#include <algorithm>

#include "common/digest.h"
#include "common/log.h"

namespace moe {

bool HasExpertTensor(const ModelConfig& model, ExpertTensor which) {
  return which != ExpertTensor::kW3 || model.gated();
}

Shape ExpertTensorShape(const ModelConfig& model, ExpertTensor which) {
  switch (which) {
    case ExpertTensor::kW1:
    case ExpertTensor::kW3:
      return {model.d_model, model.d_ff};
    case ExpertTensor::kB1:
      return {model.d_ff};
    case ExpertTensor::kW2:
      return {model.d_ff, model.d_model};
    case ExpertTensor::kB2:
      return {model.d_model};
  }
  return {};  // unreachable: the switch covers every value
}

absl::Span<const float> GateOfLayer(const ModelConfig& model, absl::Span<const float> gates,
                                    int layer) {
  const size_t size = static_cast<size_t>(model.d_model) * model.gate_width();
  MOE_CHECK(gates.size() == size * model.num_layers && layer >= 0 && layer < model.num_layers);
  return gates.subspan(layer * size, size);
}

absl::Span<float> GateOfLayer(const ModelConfig& model, absl::Span<float> gates, int layer) {
  const size_t size = static_cast<size_t>(model.d_model) * model.gate_width();
  MOE_CHECK(gates.size() == size * model.num_layers && layer >= 0 && layer < model.num_layers);
  return gates.subspan(layer * size, size);
}

std::vector<MoeWeights> SplitGates(const ModelConfig& model, const FloatTensor& gates) {
  std::vector<MoeWeights> layers(model.num_layers);
  for (int l = 0; l < model.num_layers; ++l) {
    const absl::Span<const float> gate = GateOfLayer(model, gates.values(), l);
    layers[l].layer = l;
    layers[l].gate = FloatTensor({model.d_model, model.gate_width()},
                                 std::vector<float>(gate.begin(), gate.end()));
  }
  return layers;
}

FloatTensor StackGates(const ModelConfig& model, const std::vector<FloatTensor>& gates) {
  MOE_CHECK(static_cast<int>(gates.size()) == model.num_layers);
  FloatTensor stacked(model.gate_shape());
  for (int l = 0; l < model.num_layers; ++l) {
    MOE_CHECK(gates[l].shape() == Shape({model.d_model, model.gate_width()}));
    std::copy(gates[l].values().begin(), gates[l].values().end(),
              GateOfLayer(model, stacked.mutable_values(), l).begin());
  }
  return stacked;
}

ExpertWeights ExpertWeights::Zeros(const ModelConfig& model) {
  ExpertWeights zeros;
  for (ExpertTensor which : kAllExpertTensors) {
    if (HasExpertTensor(model, which)) {
      zeros.tensor(which) = FloatTensor(ExpertTensorShape(model, which));
    }
  }
  return zeros;
}

FloatTensor& ExpertWeights::tensor(ExpertTensor which) {
  switch (which) {
    case ExpertTensor::kW1:
      return w1;
    case ExpertTensor::kB1:
      return b1;
    case ExpertTensor::kW2:
      return w2;
    case ExpertTensor::kB2:
      return b2;
    case ExpertTensor::kW3:
      return w3;
  }
  return w1;  // unreachable: the switch covers every value
}

const FloatTensor& ExpertWeights::tensor(ExpertTensor which) const {
  return const_cast<ExpertWeights*>(this)->tensor(which);
}

void ZeroBiases(ExpertWeights& weights) {
  for (FloatTensor* bias : {&weights.b1, &weights.b2}) {
    absl::Span<float> values = bias->mutable_values();
    std::fill(values.begin(), values.end(), 0.0f);
  }
}

uint64_t ExpertWeights::Digest() const {
  ArrayDigest64 digest;
  for (ExpertTensor which : kAllExpertTensors) digest.AddFloats(tensor(which).values());
  return digest.value();
}

}  // namespace moe
