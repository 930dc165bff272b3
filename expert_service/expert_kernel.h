// The seam between the expert server and the arithmetic: runs one expert.
// Implementations: OnednnExpertKernel (the product) and ReferenceExpertKernel
// (plain loops, the oracle). Tests and benchmarks swap them.
// Thread-safe: Forward and Backward may run concurrently on one kernel;
// ReloadWeights must not overlap them (the caller serialises it).
#ifndef MOE_EXPERT_SERVICE_EXPERT_KERNEL_H_
#define MOE_EXPERT_SERVICE_EXPERT_KERNEL_H_

#include "absl/status/status.h"
#include "common/moe_weights.h"
#include "common/tensor.h"

namespace moe::expert {

class ExpertKernel {
 public:
  virtual ~ExpertKernel() = default;

  // The dtype Forward reads and writes (activations included).
  virtual DType dtype() const = 0;

  // y[rows, d_model] = ReLU(x W1 + b1) W2 + b2 (gated SiLU experts:
  // (SiLU(x W1 + b1) * (x W3)) W2 + b2), with x and y in dtype().
  // When `activations` is not null it receives, in dtype(), what Backward
  // needs: ReLU(x W1 + b1) [rows, d_ff], or for gated experts rows of
  // [x W1 + b1 | x W3] [rows, 2 d_ff]. Views are caller-owned; x is read in
  // place. rows may be 0.
  [[nodiscard]] virtual absl::Status Forward(const ConstTensorView& x,
                                             const TensorView& y,
                                             const TensorView* activations) = 0;

  // From dy = dL/dy [rows, d_model] (fp32) and the forward's x and
  // activations (dtype()), writes dx = dL/dx [rows, d_model] (fp32) and adds
  // dW1, db1, dW2, db2 (and dW3) into `grads` (the caller serialises access
  // to it).
  // Gradients are taken with the fp32 master weights.
  [[nodiscard]] virtual absl::Status Backward(const ConstTensorView& x,
                                              const ConstTensorView& activations,
                                              const ConstTensorView& dy,
                                              const TensorView& dx,
                                              ExpertWeights& grads) = 0;

  // Re-reads the master weights after they changed (an optimizer step).
  [[nodiscard]] virtual absl::Status ReloadWeights() = 0;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_KERNEL_H_
