#include "expert_service/reference_expert_kernel.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/reference_expert.h"

namespace moe::expert {
namespace {

absl::Status RequireFp32(const ConstTensorView& t, absl::string_view name) {
  if (t.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": the reference kernel computes in fp32, got ",
                     DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ReferenceExpertKernel::Forward(const ConstTensorView& x,
                                            const TensorView& y,
                                            const TensorView* activations) {
  if (absl::Status s = RequireFp32(x, "x"); !s.ok()) return s;
  const int64_t rows = x.rows();
  std::vector<float> hidden(rows * weights_.w1.dim(1) * (weights_.gated() ? 2 : 1));
  ReferenceExpertForward(weights_, x.floats(), rows, absl::MakeSpan(hidden), y.floats());
  if (activations != nullptr) {
    absl::Span<float> out = activations->floats();
    // ExpertKernel's activations: ReLU(x W1 + b1), or the gated pre-activations as they are.
    for (size_t i = 0; i < hidden.size(); ++i) {
      out[i] = weights_.gated() ? hidden[i] : std::max(hidden[i], 0.0f);
    }
  }
  return absl::OkStatus();
}

absl::Status ReferenceExpertKernel::Backward(const ConstTensorView& x,
                                             const ConstTensorView& activations,
                                             const ConstTensorView& dy,
                                             const TensorView& dx,
                                             ExpertWeights& grads) {
  if (absl::Status s = RequireFp32(x, "x"); !s.ok()) return s;
  if (absl::Status s = RequireFp32(activations, "activations"); !s.ok()) return s;
  // The ReLU backward needs only the sign of the pre-activation, which
  // ReLU(h) > 0 gives exactly.
  ReferenceExpertBackward(weights_, x.floats(), activations.floats(), dy.floats(),
                          x.rows(), dx.floats(), grads);
  return absl::OkStatus();
}

}  // namespace moe::expert
