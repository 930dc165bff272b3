// ExpertKernel on oneDNN: layer 1 is one matmul with bias and a fused ReLU
// post-op, layer 2 a matmul with bias. Weights are reordered once (at
// creation and after each optimizer step) into the layout oneDNN picks, and
// converted to bf16 when the kernel computes in bf16 (fp32 accumulation).
// Inputs are read in place from the caller's bytes, in row blocks whose
// primitives come from the shared OnednnRuntime cache. Backward runs in fp32
// on the master weights with runtime-sized oneDNN matmuls.
// Thread-safe as ExpertKernel says; no dnnl::error escapes (InternalError).
#ifndef MOE_EXPERT_SERVICE_ONEDNN_EXPERT_KERNEL_H_
#define MOE_EXPERT_SERVICE_ONEDNN_EXPERT_KERNEL_H_

#include <memory>

#include "absl/status/statusor.h"
#include "expert_service/expert_kernel.h"
#include "expert_service/onednn_runtime.h"

namespace moe::expert {

class OnednnExpertKernel : public ExpertKernel {
 public:
  // `master` (fp32) and `runtime` must outlive the kernel.
  static absl::StatusOr<std::unique_ptr<OnednnExpertKernel>> Create(
      const ExpertWeights& master, DType dtype, OnednnRuntime& runtime);

  DType dtype() const override { return dtype_; }
  absl::Status Forward(const ConstTensorView& x, const TensorView& y,
                       const TensorView* activations) override;
  absl::Status Backward(const ConstTensorView& x, const ConstTensorView& activations,
                        const ConstTensorView& dy, const TensorView& dx,
                        ExpertWeights& grads) override;
  absl::Status ReloadWeights() override;

 private:
  OnednnExpertKernel(const ExpertWeights& master, DType dtype, OnednnRuntime& runtime);

  absl::Status Init();
  absl::Status CheckForwardShapes(const ConstTensorView& x, const TensorView& y,
                                  const TensorView* activations) const;

  const ExpertWeights& master_;
  const DType dtype_;
  OnednnRuntime& runtime_;
  const int64_t d_model_;
  const int64_t d_ff_;
  ForwardLayer layer1_;
  ForwardLayer layer2_;
  // Reordered weights and fp32 biases, owned by oneDNN.
  dnnl::memory w1_, b1_, w2_, b2_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_ONEDNN_EXPERT_KERNEL_H_
