// Tensors from the wire: DecodeTensor either refuses a message with a named
// INVALID_ARGUMENT or returns a view whose every byte lies inside the
// message (read here in full, so ASan sees any overrun) and whose shape
// matches the spec.
#include <cstdint>

#include "common/tensor_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::v1::Tensor tensor;
  if (!tensor.ParseFromArray(data, static_cast<int>(size))) return 0;
  for (const moe::TensorSpec& spec :
       {moe::TokenBatchSpec("x", 4, 1024), moe::TokenBatchSpec("x", 1, 0),
        moe::TensorSpec{"w", {3, -1}, {}, 0, /*require_finite=*/false}}) {
    absl::StatusOr<moe::ConstTensorView> view = moe::DecodeTensor(tensor, spec);
    if (!view.ok()) {
      if (view.status().code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
      continue;
    }
    const size_t bytes = view->num_elements() * moe::DTypeSize(view->dtype);
    if (bytes != tensor.data().size()) __builtin_trap();
    if (view->shape.size() != spec.dims.size()) __builtin_trap();
    volatile uint8_t sum = 0;
    const auto* p = reinterpret_cast<const uint8_t*>(view->data);
    for (size_t i = 0; i < bytes; ++i) sum = sum + p[i];
  }
  return 0;
}
