// For tests: the reference kernel with a hook called before every Forward
// with its rows, to count kernel calls or hold them until a test lets them
// go.
#ifndef MOE_EXPERT_SERVICE_TESTING_OBSERVED_KERNEL_H_
#define MOE_EXPERT_SERVICE_TESTING_OBSERVED_KERNEL_H_

#include <cstdint>
#include <functional>
#include <utility>

#include "expert_service/expert_kernel.h"
#include "expert_service/reference_expert_kernel.h"

namespace moe::expert::testing {

class ObservedKernel : public ExpertKernel {
 public:
  // A null hook observes nothing.
  ObservedKernel(const ExpertWeights& weights, std::function<void(int64_t rows)> before_forward)
      : reference_(weights), before_forward_(std::move(before_forward)) {}
  DType dtype() const override { return DType::kFloat32; }
  absl::Status Forward(const ConstTensorView& x, const TensorView& y,
                       const TensorView* activations) override {
    if (before_forward_) before_forward_(x.rows());
    return reference_.Forward(x, y, activations);
  }
  absl::Status Backward(const ConstTensorView& x, const ConstTensorView& a,
                        const ConstTensorView& dy, const TensorView& dx,
                        ExpertWeights& grads) override {
    return reference_.Backward(x, a, dy, dx, grads);
  }
  absl::Status ReloadWeights() override { return absl::OkStatus(); }

 private:
  ReferenceExpertKernel reference_;
  const std::function<void(int64_t rows)> before_forward_;
};

}  // namespace moe::expert::testing

#endif  // MOE_EXPERT_SERVICE_TESTING_OBSERVED_KERNEL_H_
