// ExpertKernel on oneDNN: layer 1 is one matmul with bias and a fused ReLU
// post-op, layer 2 a matmul with bias. Gated SiLU experts run x W3 first,
// then x W1 + b1 with fused SiLU and multiply-by-(x W3) post-ops (inference),
// or both plain and the gating in a loop when training keeps them for the
// backward. Weights are reordered once (at
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
  // The fp32 backward matmuls of this shape: dy W2^T, dh W1^T (W3^T),
  // dW2 += h^T dy, dW1 (dW3) += x^T dh.
  struct BackwardMatmuls {
    const CachedMatmul* times_w2t = nullptr;
    const CachedMatmul* times_w1t = nullptr;
    const CachedMatmul* grad_w2 = nullptr;
    const CachedMatmul* grad_w1 = nullptr;
  };
  absl::StatusOr<BackwardMatmuls> FindBackwardMatmuls();
  // Forward and Backward of gated SiLU experts, shapes checked.
  absl::Status GatedForward(const ConstTensorView& x, const TensorView& y,
                            const TensorView* activations);
  absl::Status GatedBackward(absl::Span<const float> x32, absl::Span<const float> a32,
                             const ConstTensorView& dy, const TensorView& dx, ExpertWeights& grads);
  int64_t activation_width() const { return gated_ ? 2 * d_ff_ : d_ff_; }

  const ExpertWeights& master_;
  const DType dtype_;
  OnednnRuntime& runtime_;
  const int64_t d_model_;
  const int64_t d_ff_;
  const bool gated_;
  // ReLU: ReLU(x W1 + b1). Gated: SiLU(x W1 + b1) * (x W3).
  ForwardLayer layer1_;
  ForwardLayer layer2_;
  // x W + b without an epilogue (gated only: x W3, and x W1 + b1 when
  // training).
  ForwardLayer plain1_;
  // Reordered weights and fp32 biases, owned by oneDNN; w3_ (and the zero
  // bias b3_) only when gated.
  dnnl::memory w1_, b1_, w2_, b2_, w3_, b3_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_ONEDNN_EXPERT_KERNEL_H_
