#include "common/optimizer.h"

#include "common/log.h"

namespace moe {

void SgdUpdate(const OptimizerOptions& options, float learning_rate,
               absl::Span<const float> grads, absl::Span<const float> weights,
               absl::Span<const float> velocity, absl::Span<float> new_weights,
               absl::Span<float> new_velocity) {
  const size_t n = weights.size();
  MOE_CHECK(grads.size() == n && new_weights.size() == n);
  // Element by element, each input read before its output is written: an
  // output may be its own input.
  if (options.type == OptimizerType::kSgd) {
    for (size_t i = 0; i < n; ++i) new_weights[i] = weights[i] - learning_rate * grads[i];
    return;
  }
  MOE_CHECK(velocity.size() == n && new_velocity.size() == n);
  const float momentum = options.momentum;
  for (size_t i = 0; i < n; ++i) {
    const float v = momentum * velocity[i] + grads[i];
    new_velocity[i] = v;
    new_weights[i] = weights[i] - learning_rate * v;
  }
}

void ApplySgd(const OptimizerOptions& options, float learning_rate,
              const FloatTensor& grads, FloatTensor& weights, FloatTensor* velocity) {
  MOE_CHECK(grads.shape() == weights.shape());
  absl::Span<float> v;
  if (options.type != OptimizerType::kSgd) {
    MOE_CHECK(velocity != nullptr && velocity->shape() == weights.shape());
    v = velocity->mutable_values();
  }
  SgdUpdate(options, learning_rate, grads.values(), weights.values(), v,
            weights.mutable_values(), v);
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
