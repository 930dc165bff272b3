#include "common/tensor_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/base/config.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/bfloat16.h"
#include "common/status_macros.h"

static_assert(ABSL_IS_LITTLE_ENDIAN, "the wire format is little-endian");

namespace moe {
namespace {

std::string DimName(const TensorSpec& spec, size_t i) {
  if (i < spec.dim_names.size()) return std::string(spec.dim_names[i]);
  return absl::StrCat("dim ", i);
}

absl::Status CheckShape(const v1::Tensor& tensor, const TensorSpec& spec) {
  const auto& shape = tensor.shape();
  if (static_cast<size_t>(shape.size()) != spec.dims.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        spec.name, ": expected rank ", spec.dims.size(), " ",
        ShapeString(spec.dims), ", got rank ", shape.size(), " ",
        ShapeString(shape)));
  }
  for (size_t i = 0; i < spec.dims.size(); ++i) {
    const int64_t got = shape[i];
    if (got < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          spec.name, ": ", DimName(spec, i), " is negative (", got, ")"));
    }
    if (spec.dims[i] >= 0 && got != spec.dims[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat(spec.name, ": expected ", DimName(spec, i), " = ",
                       spec.dims[i], ", got ", got, " (shape ",
                       ShapeString(shape), ")"));
    }
  }
  if (spec.max_dim0 > 0 && !shape.empty() && shape[0] > spec.max_dim0) {
    return absl::InvalidArgumentError(absl::StrCat(
        spec.name, ": ", DimName(spec, 0), " = ", shape[0],
        " exceeds the limit of ", spec.max_dim0));
  }
  return absl::OkStatus();
}

// Number of elements, or an error if the product would overflow the bytes a
// message can hold (messages are < 2 GiB, so anything above is wrong).
absl::StatusOr<int64_t> CheckedNumElements(const v1::Tensor& tensor,
                                           absl::string_view name) {
  constexpr int64_t kLimit = int64_t{1} << 40;
  int64_t n = 1;
  for (int64_t d : tensor.shape()) {
    if (d != 0 && n > kLimit / d) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": shape ", ShapeString(tensor.shape()), " is too large"));
    }
    n *= d;
  }
  return n;
}

std::string SizeBreakdown(const v1::Tensor& tensor, const TensorSpec& spec,
                          DType dtype) {
  std::string out;
  for (int i = 0; i < tensor.shape_size(); ++i) {
    absl::StrAppend(&out, tensor.shape(i), " ", DimName(spec, i), " x ");
  }
  absl::StrAppend(&out, DTypeName(dtype));
  return out;
}

// A value's bits as fp32 bits (a bf16 value is the top half of one).
inline uint32_t Fp32Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline uint32_t Fp32Bits(uint16_t bf16) { return static_cast<uint32_t>(bf16) << 16; }

// Whether any of n values is NaN or Inf. No early exit and no Span
// indexing (Debian's abseil checks every index), so it vectorises; the
// caller scans blocks and looks closer only at a bad one.
template <typename T>
bool AnyNonFinite(const T* values, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= NonFiniteBits(Fp32Bits(values[i]));
  return bad != 0;
}

template <typename T, typename ToFloat>
absl::Status CheckFinite(absl::Span<const T> values, int64_t row_width, absl::string_view name,
                         ToFloat to_float) {
  constexpr size_t kBlock = 4096;
  size_t first = values.size();
  for (size_t start = 0; start < values.size(); start += kBlock) {
    const size_t n = std::min(kBlock, values.size() - start);
    if (AnyNonFinite(values.data() + start, n)) {
      first = start;
      break;
    }
  }
  for (size_t i = first; i < values.size(); ++i) {
    const float v = to_float(values[i]);
    if (!std::isfinite(v)) {
      std::string where = absl::StrCat("element ", i);
      if (row_width > 0) {
        where = absl::StrCat("row ", i / row_width, ", column ", i % row_width);
      }
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": ", std::isnan(v) ? "NaN" : "Inf", " at ", where));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DType> FromProtoDType(v1::DType dtype, absl::string_view name) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return DType::kFloat32;
    case v1::DTYPE_BF16:
      return DType::kBFloat16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": dtype ", v1::DType_Name(dtype),
                       " is not supported (want DTYPE_FP32 or DTYPE_BF16)"));
  }
}

TensorSpec TokenBatchSpec(absl::string_view name, int64_t d_model,
                          int64_t max_tokens) {
  TensorSpec spec;
  spec.name = name;
  spec.dims = {-1, d_model};
  spec.dim_names = {"tokens", "d_model"};
  spec.max_dim0 = max_tokens;
  return spec;
}

absl::StatusOr<DType> CheckTensorHeader(const v1::Tensor& tensor, const TensorSpec& spec,
                                        size_t data_bytes) {
  MOE_ASSIGN_OR_RETURN(const DType dtype,
                       FromProtoDType(tensor.dtype(), spec.name));
  MOE_RETURN_IF_ERROR(CheckShape(tensor, spec));
  MOE_ASSIGN_OR_RETURN(const int64_t num_elements,
                       CheckedNumElements(tensor, spec.name));
  const size_t expected_bytes = num_elements * DTypeSize(dtype);
  if (data_bytes != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(spec.name, ": expected ", expected_bytes,
                                                   " bytes (", SizeBreakdown(tensor, spec, dtype),
                                                   "), got ", data_bytes));
  }
  return dtype;
}

absl::StatusOr<ConstTensorView> DecodeTensor(const v1::Tensor& tensor, const TensorSpec& spec) {
  MOE_ASSIGN_OR_RETURN(const DType dtype, CheckTensorHeader(tensor, spec, tensor.data().size()));
  const auto* data = reinterpret_cast<const std::byte*>(tensor.data().data());
  // std::string storage is at least 8-byte aligned; this guards the
  // reinterpret_cast in floats()/bf16s() should that ever change.
  if (reinterpret_cast<uintptr_t>(data) % DTypeSize(dtype) != 0) {
    return absl::InternalError(
        absl::StrCat(spec.name, ": tensor bytes are misaligned"));
  }
  ConstTensorView view{dtype, Shape(tensor.shape().begin(), tensor.shape().end()),
                       data};
  if (spec.require_finite) {
    const int64_t row_width = view.shape.size() == 2 ? view.shape[1] : 0;
    if (dtype == DType::kFloat32) {
      MOE_RETURN_IF_ERROR(CheckFinite(view.floats(), row_width, spec.name,
                                      [](float v) { return v; }));
    } else {
      MOE_RETURN_IF_ERROR(CheckFinite(view.bf16s(), row_width, spec.name,
                                      Bf16ToFloat));
    }
  }
  return view;
}

v1::DType ToProtoDType(DType dtype) {
  return dtype == DType::kFloat32 ? v1::DTYPE_FP32 : v1::DTYPE_BF16;
}

void EncodeTensor(const ConstTensorView& view, v1::Tensor* out) {
  out->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
  out->set_dtype(ToProtoDType(view.dtype));
  out->set_data(reinterpret_cast<const char*>(view.data), view.size_bytes());
}

void EncodeFloats(absl::Span<const float> values, absl::Span<const int64_t> shape,
                  DType wire_dtype, v1::Tensor* out) {
  MOE_CHECK(static_cast<int64_t>(values.size()) == NumElements(shape));
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  out->set_dtype(ToProtoDType(wire_dtype));
  std::string* data = out->mutable_data();
  if (wire_dtype == DType::kFloat32) {
    data->assign(reinterpret_cast<const char*>(values.data()),
                 values.size() * sizeof(float));
    return;
  }
  data->resize(values.size() * sizeof(uint16_t));
  FloatsToBf16(values, absl::MakeSpan(reinterpret_cast<uint16_t*>(data->data()),
                                      values.size()));
}

FloatTensor ToFloatTensor(const ConstTensorView& view) {
  FloatTensor out(view.shape);
  if (view.size_bytes() == 0) return out;  // memcpy must not see null
  if (view.dtype == DType::kFloat32) {
    std::memcpy(out.mutable_values().data(), view.data, view.size_bytes());
  } else {
    Bf16ToFloats(view.bf16s(), out.mutable_values());
  }
  return out;
}

}  // namespace moe
