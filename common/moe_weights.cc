#include "common/moe_weights.h"

#include <algorithm>

#include "common/digest.h"

namespace moe {

ExpertWeights ExpertWeights::Zeros(const ModelConfig& model) {
  return {FloatTensor({model.d_model, model.d_ff}), FloatTensor({model.d_ff}),
          FloatTensor({model.d_ff, model.d_model}), FloatTensor({model.d_model})};
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
