// The optimizer update, shared by the expert servers (expert weights) and
// the router (the gate), and by the reference training loop in tests.
// PyTorch's semantics:
// - torch.optim.SGD (dampening 0, no Nesterov, no weight decay): with
//   momentum, v = momentum * v + g (v starts at zero), w -= lr * v;
//   without, w -= lr * g.
// - torch.optim.AdamW (amsgrad off): w *= 1 - lr * weight_decay;
//   m = m + (1 - b1) (g - m); v = b2 v + (1 - b2) g^2;
//   w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
// - torch.nn.utils.clip_grad_norm_: every gradient scaled by
//   min(1, max_norm / (norm + 1e-6)) first (ClipScale).
// Thread-compatible.
#ifndef MOE_COMMON_OPTIMIZER_H_
#define MOE_COMMON_OPTIMIZER_H_

#include <cstdint>

#include "absl/types/span.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/tensor.h"

namespace moe {

// The state tensors an optimizer keeps per weight tensor: 0 for SGD, 1 for
// SGD with momentum (the momentum buffer), 2 for AdamW (exp_avg and
// exp_avg_sq).
int OptimizerStateTensors(OptimizerType type);

// What one update applies besides the gradients.
struct UpdateStep {
  float learning_rate = 0.0f;
  // The 1-based count of updates including this one (AdamW's bias
  // correction; the training step number).
  uint64_t step = 1;
  // Multiplies every gradient first (global norm clipping); 1: none.
  float grad_scale = 1.0f;
};

// The update out of place: `new_weights` (and `new_first`, `new_second`)
// from `weights`, the state (`first`: momentum or exp_avg; `second`:
// exp_avg_sq) and `grads`, with the same arithmetic as in place (outputs
// may alias their inputs). State spans the optimizer does not keep are
// unused and may be empty. Returns whether every output is finite (an
// overflowing gradient or learning rate makes some not).
// REQUIRES: equal sizes.
[[nodiscard]] bool OptimizerUpdate(const OptimizerOptions& options, const UpdateStep& update,
                                   absl::Span<const float> grads, absl::Span<const float> weights,
                                   absl::Span<const float> first, absl::Span<const float> second,
                                   absl::Span<float> new_weights, absl::Span<float> new_first,
                                   absl::Span<float> new_second);

// In place: `first` and `second` (same shape as `weights`) are the state
// the optimizer keeps, and may be null when it keeps none. Returns whether
// the results are all finite.
bool ApplyOptimizer(const OptimizerOptions& options, const UpdateStep& update,
                    const FloatTensor& grads, FloatTensor& weights, FloatTensor* first,
                    FloatTensor* second);

// The same for every tensor of an expert.
bool ApplyOptimizer(const OptimizerOptions& options, const UpdateStep& update,
                    const ExpertWeights& grads, ExpertWeights& weights, ExpertWeights* first,
                    ExpertWeights* second);

// The sum of the squares of `values`, in double.
double SquaredNorm(absl::Span<const float> values);

// The gradient scale of global norm clipping, for gradients whose squares
// sum to `squared_norm`: min(1, max_grad_norm / (sqrt(squared_norm) +
// 1e-6)); 1 when clipping is off. 0 when the norm is not finite (the
// update then fails its finite check rather than scaling by NaN).
float ClipScale(const OptimizerOptions& options, double squared_norm);

}  // namespace moe

#endif  // MOE_COMMON_OPTIMIZER_H_
