#include "common/optimizer.h"

#include <cmath>
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

int OptimizerStateTensors(OptimizerType type) {
  switch (type) {
    case OptimizerType::kSgd:
      return 0;
    case OptimizerType::kSgdMomentum:
      return 1;
    case OptimizerType::kAdamW:
      return 2;
  }
  return 0;
}

bool OptimizerUpdate(const OptimizerOptions& options, const UpdateStep& update,
                     absl::Span<const float> grads, absl::Span<const float> weights,
                     absl::Span<const float> first, absl::Span<const float> second,
                     absl::Span<float> new_weights, absl::Span<float> new_first,
                     absl::Span<float> new_second) {
  const size_t n = weights.size();
  MOE_CHECK(grads.size() == n && new_weights.size() == n);
  const float lr = update.learning_rate;
  const float scale = update.grad_scale;
  // Element by element, each input read before its output is written: an
  // output may be its own input. Non-finite outputs are ORed into a flag
  // (integer, so the loop still vectorises). Without clipping the scale is
  // 1 and g * 1 is g: the same bits as before clipping existed.
  uint32_t bad = 0;
  switch (options.type) {
    case OptimizerType::kSgd:
      for (size_t i = 0; i < n; ++i) {
        const float w = weights[i] - lr * (grads[i] * scale);
        new_weights[i] = w;
        bad |= NonFinite(w);
      }
      return bad == 0;
    case OptimizerType::kSgdMomentum: {
      MOE_CHECK(first.size() == n && new_first.size() == n);
      const float momentum = options.momentum;
      for (size_t i = 0; i < n; ++i) {
        const float v = momentum * first[i] + grads[i] * scale;
        const float w = weights[i] - lr * v;
        new_first[i] = v;
        new_weights[i] = w;
        bad |= NonFinite(v) | NonFinite(w);
      }
      return bad == 0;
    }
    case OptimizerType::kAdamW: {
      MOE_CHECK(first.size() == n && new_first.size() == n && second.size() == n &&
                new_second.size() == n);
      // As PyTorch: scalars from the double hyper-parameters, then per
      // element in float.
      const double t = static_cast<double>(update.step);
      const double bias1 = 1.0 - std::pow(options.beta1, t);
      const double bias2 = 1.0 - std::pow(options.beta2, t);
      const float step_size = static_cast<float>(lr / bias1);
      const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
      const float decay = static_cast<float>(1.0 - lr * options.weight_decay);
      const float one_minus_b1 = static_cast<float>(1.0 - options.beta1);
      const float b2 = static_cast<float>(options.beta2);
      const float one_minus_b2 = static_cast<float>(1.0 - options.beta2);
      const float eps = static_cast<float>(options.eps);
      for (size_t i = 0; i < n; ++i) {
        const float g = grads[i] * scale;
        const float m = first[i] + one_minus_b1 * (g - first[i]);
        const float v = second[i] * b2 + one_minus_b2 * (g * g);
        const float denom = std::sqrt(v) / bias2_sqrt + eps;
        const float w = weights[i] * decay - step_size * (m / denom);
        new_first[i] = m;
        new_second[i] = v;
        new_weights[i] = w;
        bad |= NonFinite(m) | NonFinite(v) | NonFinite(w);
      }
      return bad == 0;
    }
  }
  return false;
}

bool ApplyOptimizer(const OptimizerOptions& options, const UpdateStep& update,
                    const FloatTensor& grads, FloatTensor& weights, FloatTensor* first,
                    FloatTensor* second) {
  MOE_CHECK(grads.shape() == weights.shape());
  const int state = OptimizerStateTensors(options.type);
  absl::Span<float> m, v;
  if (state >= 1) {
    MOE_CHECK(first != nullptr && first->shape() == weights.shape());
    m = first->mutable_values();
  }
  if (state >= 2) {
    MOE_CHECK(second != nullptr && second->shape() == weights.shape());
    v = second->mutable_values();
  }
  return OptimizerUpdate(options, update, grads.values(), weights.values(), m, v,
                         weights.mutable_values(), m, v);
}

bool ApplyOptimizer(const OptimizerOptions& options, const UpdateStep& update,
                    const ExpertWeights& grads, ExpertWeights& weights, ExpertWeights* first,
                    ExpertWeights* second) {
  bool finite = true;
  for (ExpertTensor which : kAllExpertTensors) {
    finite &= ApplyOptimizer(options, update, grads.tensor(which), weights.tensor(which),
                             first != nullptr ? &first->tensor(which) : nullptr,
                             second != nullptr ? &second->tensor(which) : nullptr);
  }
  return finite;
}

double SquaredNorm(absl::Span<const float> values) {
  double sum = 0.0;
  for (float x : values) sum += static_cast<double>(x) * x;
  return sum;
}

float ClipScale(const OptimizerOptions& options, double squared_norm) {
  if (options.max_grad_norm <= 0.0f) return 1.0f;
  if (!std::isfinite(squared_norm)) return 0.0f;
  const double scale = options.max_grad_norm / (std::sqrt(squared_norm) + 1e-6);
  return scale < 1.0 ? static_cast<float>(scale) : 1.0f;
}

}  // namespace moe
