// Wire tensors (v1::Tensor) <-> in-memory views, with full validation.
// Decoding never copies: the view points into the message's bytes, so the
// message must outlive it. Every error names the tensor and says what was
// expected and what came. Thread-safe (pure functions).
#ifndef MOE_COMMON_TENSOR_CODEC_H_
#define MOE_COMMON_TENSOR_CODEC_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/tensor.h"
#include "proto/tensor.pb.h"

namespace moe {

// What a decoded tensor must look like.
struct TensorSpec {
  // Used in error messages ("x", "grad_output").
  absl::string_view name;
  // Required dimensions; -1 accepts any size. The rank is dims.size().
  absl::InlinedVector<int64_t, 4> dims;
  // Optional names of the dimensions for messages ("tokens", "d_model").
  absl::InlinedVector<absl::string_view, 4> dim_names;
  // Upper bound on dims[0] when it is free (-1); 0 means no bound.
  int64_t max_dim0 = 0;
  // Reject NaN and Inf.
  bool require_finite = true;
};

// The spec of a [num_tokens, d_model] batch with num_tokens <= max_tokens.
TensorSpec TokenBatchSpec(absl::string_view name, int64_t d_model,
                          int64_t max_tokens);

// Validates dtype, rank, dims and that `data_bytes` (the data's length,
// wherever it is held) is what they make; the dtype.
absl::StatusOr<DType> CheckTensorHeader(const v1::Tensor& tensor, const TensorSpec& spec,
                                        size_t data_bytes);

// Validates dtype, rank, dims, byte length, alignment and finiteness.
absl::StatusOr<ConstTensorView> DecodeTensor(const v1::Tensor& tensor,
                                             const TensorSpec& spec);

// Writes `view` into `out` (one copy of the bytes, which the message owns).
void EncodeTensor(const ConstTensorView& view, v1::Tensor* out);
// Writes fp32 values as `wire_dtype` (rounding to bf16 if asked).
void EncodeFloats(absl::Span<const float> values, absl::Span<const int64_t> shape,
                  DType wire_dtype, v1::Tensor* out);

// The values of a view as an owned fp32 tensor (widening bf16): a copy.
FloatTensor ToFloatTensor(const ConstTensorView& view);

v1::DType ToProtoDType(DType dtype);
// INVALID_ARGUMENT naming `name` for anything but FP32 and BF16.
absl::StatusOr<DType> FromProtoDType(v1::DType dtype, absl::string_view name);

}  // namespace moe

#endif  // MOE_COMMON_TENSOR_CODEC_H_
