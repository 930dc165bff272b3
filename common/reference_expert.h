// One expert, computed with plain loops: the oracle that every kernel is
// checked against. Rows are tokens; shapes come from the weights.
// Sums over d_model and d_ff run in a fixed order, in fp32 for the
// vectorisable x W forms and in double for the dot products of backward.
// Thread-safe (pure functions).
#ifndef MOE_COMMON_REFERENCE_EXPERT_H_
#define MOE_COMMON_REFERENCE_EXPERT_H_

#include <cstdint>

#include "absl/types/span.h"
#include "common/moe_weights.h"

namespace moe {

// ReLU experts: hidden_pre = x W1 + b1;  y = ReLU(hidden_pre) W2 + b2.
// Gated SiLU experts (weights.gated()): hidden_pre rows are
// [x W1 + b1 | x W3];  y = (SiLU(x W1 + b1) * (x W3)) W2 + b2.
// x, y: [rows, d_model]; hidden_pre: [rows, d_ff], or [rows, 2 d_ff] when
// gated (kept for backward).
void ReferenceExpertForward(const ExpertWeights& weights,
                            absl::Span<const float> x, int64_t rows,
                            absl::Span<float> hidden_pre, absl::Span<float> y);

// From dy = dL/dy [rows, d_model] and the forward's x and hidden_pre, writes
// dx = dL/dx [rows, d_model] and adds dW1, db1, dW2, db2 into `grads`.
void ReferenceExpertBackward(const ExpertWeights& weights,
                             absl::Span<const float> x,
                             absl::Span<const float> hidden_pre,
                             absl::Span<const float> dy, int64_t rows,
                             absl::Span<float> dx, ExpertWeights& grads);

}  // namespace moe

#endif  // MOE_COMMON_REFERENCE_EXPERT_H_
