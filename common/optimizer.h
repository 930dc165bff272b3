// The optimizer update, shared by the expert servers (expert weights) and
// the router (the gate), and by the reference training loop in tests.
// PyTorch's torch.optim.SGD semantics (dampening 0, no Nesterov, no weight
// decay): with momentum, v = momentum * v + g (v starts at zero), w -= lr * v;
// without, w -= lr * g. Thread-compatible.
#ifndef MOE_COMMON_OPTIMIZER_H_
#define MOE_COMMON_OPTIMIZER_H_

#include "absl/types/span.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/tensor.h"

namespace moe {

// The update out of place: `new_weights` (and `new_velocity`) from
// `weights`, `velocity` and `grads`, with the same arithmetic as in place
// (outputs may alias their inputs). `velocity` and `new_velocity` are
// unused, and may be empty, for plain SGD. Returns whether every output is
// finite (an overflowing gradient or learning rate makes some not).
// REQUIRES: equal sizes.
[[nodiscard]] bool SgdUpdate(const OptimizerOptions& options, float learning_rate,
               absl::Span<const float> grads, absl::Span<const float> weights,
               absl::Span<const float> velocity, absl::Span<float> new_weights,
               absl::Span<float> new_velocity);

// Updates `weights` in place with `grads`. `velocity` (same shape) is the
// momentum buffer, updated in place; it is ignored for plain SGD and may
// then be null. Returns whether the results are all finite.
// REQUIRES: equal shapes.
bool ApplySgd(const OptimizerOptions& options, float learning_rate,
              const FloatTensor& grads, FloatTensor& weights, FloatTensor* velocity);

// The same for every tensor of an expert.
bool ApplySgd(const OptimizerOptions& options, float learning_rate,
              const ExpertWeights& grads, ExpertWeights& weights,
              ExpertWeights* velocity);

}  // namespace moe

#endif  // MOE_COMMON_OPTIMIZER_H_
