// ExpertKernel with the reference loops of common/reference_expert.h: fp32
// only, real arithmetic, the oracle the oneDNN kernel is checked against.
// Thread-safe as ExpertKernel says.
#ifndef MOE_EXPERT_SERVICE_REFERENCE_EXPERT_KERNEL_H_
#define MOE_EXPERT_SERVICE_REFERENCE_EXPERT_KERNEL_H_

#include "expert_service/expert_kernel.h"

namespace moe::expert {

class ReferenceExpertKernel : public ExpertKernel {
 public:
  // `weights` are the master weights; they must outlive the kernel.
  explicit ReferenceExpertKernel(const ExpertWeights& weights) : weights_(weights) {}

  DType dtype() const override { return DType::kFloat32; }
  absl::Status Forward(const ConstTensorView& x, const TensorView& y,
                       const TensorView* activations) override;
  absl::Status Backward(const ConstTensorView& x, const ConstTensorView& activations,
                        const ConstTensorView& dy, const TensorView& dx,
                        ExpertWeights& grads) override;
  absl::Status ReloadWeights() override { return absl::OkStatus(); }

 private:
  const ExpertWeights& weights_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_REFERENCE_EXPERT_KERNEL_H_
