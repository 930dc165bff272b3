#include "common/optimizer.h"

#include "common/log.h"

namespace moe {

void ApplySgd(const OptimizerOptions& options, float learning_rate,
              const FloatTensor& grads, FloatTensor& weights, FloatTensor* velocity) {
  MOE_CHECK(grads.shape() == weights.shape());
  absl::Span<float> w = weights.mutable_values();
  absl::Span<const float> g = grads.values();
  if (options.type == OptimizerType::kSgd) {
    for (size_t i = 0; i < w.size(); ++i) w[i] -= learning_rate * g[i];
    return;
  }
  MOE_CHECK(velocity != nullptr && velocity->shape() == weights.shape());
  absl::Span<float> v = velocity->mutable_values();
  const float momentum = options.momentum;
  for (size_t i = 0; i < w.size(); ++i) {
    v[i] = momentum * v[i] + g[i];
    w[i] -= learning_rate * v[i];
  }
}

void ApplySgd(const OptimizerOptions& options, float learning_rate,
              const ExpertWeights& grads, ExpertWeights& weights,
              ExpertWeights* velocity) {
  for (ExpertTensor which : kAllExpertTensors) {
    ApplySgd(options, learning_rate, grads.tensor(which), weights.tensor(which),
             velocity != nullptr ? &velocity->tensor(which) : nullptr);
  }
}

}  // namespace moe
