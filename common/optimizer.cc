#include "common/optimizer.h"

#include <cstdint>
#include <cstring>

#include "common/log.h"

namespace moe {
namespace {

// 1 when `x` is Inf or NaN (every exponent bit set), else 0.
inline uint32_t NonFinite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (~bits & 0x7f800000u) == 0 ? 1u : 0u;
}

}  // namespace

bool SgdUpdate(const OptimizerOptions& options, float learning_rate,
               absl::Span<const float> grads, absl::Span<const float> weights,
               absl::Span<const float> velocity, absl::Span<float> new_weights,
               absl::Span<float> new_velocity) {
  const size_t n = weights.size();
  MOE_CHECK(grads.size() == n && new_weights.size() == n);
  // Element by element, each input read before its output is written: an
  // output may be its own input. Non-finite outputs are ORed into a flag
  // (integer, so the loop still vectorises).
  uint32_t bad = 0;
  if (options.type == OptimizerType::kSgd) {
    for (size_t i = 0; i < n; ++i) {
      const float w = weights[i] - learning_rate * grads[i];
      new_weights[i] = w;
      bad |= NonFinite(w);
    }
    return bad == 0;
  }
  MOE_CHECK(velocity.size() == n && new_velocity.size() == n);
  const float momentum = options.momentum;
  for (size_t i = 0; i < n; ++i) {
    const float v = momentum * velocity[i] + grads[i];
    const float w = weights[i] - learning_rate * v;
    new_velocity[i] = v;
    new_weights[i] = w;
    bad |= NonFinite(v) | NonFinite(w);
  }
  return bad == 0;
}

bool ApplySgd(const OptimizerOptions& options, float learning_rate,
              const FloatTensor& grads, FloatTensor& weights, FloatTensor* velocity) {
  MOE_CHECK(grads.shape() == weights.shape());
  absl::Span<float> v;
  if (options.type != OptimizerType::kSgd) {
    MOE_CHECK(velocity != nullptr && velocity->shape() == weights.shape());
    v = velocity->mutable_values();
  }
  return SgdUpdate(options, learning_rate, grads.values(), weights.values(), v,
                   weights.mutable_values(), v);
}

bool ApplySgd(const OptimizerOptions& options, float learning_rate,
              const ExpertWeights& grads, ExpertWeights& weights,
              ExpertWeights* velocity) {
  bool finite = true;
  for (ExpertTensor which : kAllExpertTensors) {
    finite &= ApplySgd(options, learning_rate, grads.tensor(which), weights.tensor(which),
                       velocity != nullptr ? &velocity->tensor(which) : nullptr);
  }
  return finite;
}

}  // namespace moe
