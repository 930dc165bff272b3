#include "common/moe_weights.h"

#include <algorithm>

#include "common/digest.h"

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
