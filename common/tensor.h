// In-memory tensors: element types, shapes, non-owning views and an owning
// fp32 tensor. All are dense and row-major. Views are cheap to copy and never
// own data: the caller keeps the bytes alive. Thread-compatible.
#ifndef MOE_COMMON_TENSOR_H_
#define MOE_COMMON_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/log.h"

namespace moe {

enum class DType : uint8_t { kFloat32, kBFloat16 };

inline constexpr size_t DTypeSize(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 2;
}
// "fp32" or "bf16".
absl::string_view DTypeName(DType dtype);

using Shape = absl::InlinedVector<int64_t, 4>;

// Product of the dimensions (1 for a scalar). REQUIRES: dims >= 0 and the
// product fits in int64 (decoders check both first).
int64_t NumElements(absl::Span<const int64_t> shape);
// "[4, 256]".
std::string ShapeString(absl::Span<const int64_t> shape);

// A view of `NumElements(shape)` elements of `dtype` at `data`. `Byte` is
// `const std::byte` (ConstTensorView) or `std::byte` (TensorView).
template <typename Byte>
struct BasicTensorView {
  DType dtype = DType::kFloat32;
  Shape shape;
  Byte* data = nullptr;

  int64_t num_elements() const { return NumElements(shape); }
  size_t size_bytes() const { return num_elements() * DTypeSize(dtype); }
  // For matrices: shape[0] and shape[1].
  int64_t rows() const { return shape.at(0); }
  int64_t cols() const { return shape.at(1); }

  // The elements as fp32 / bf16 bits. REQUIRES: the matching dtype.
  auto floats() const {
    MOE_CHECK(dtype == DType::kFloat32);
    using Float = std::conditional_t<std::is_const_v<Byte>, const float, float>;
    return absl::Span<Float>(reinterpret_cast<Float*>(data), num_elements());
  }
  auto bf16s() const {
    MOE_CHECK(dtype == DType::kBFloat16);
    using Bits = std::conditional_t<std::is_const_v<Byte>, const uint16_t, uint16_t>;
    return absl::Span<Bits>(reinterpret_cast<Bits*>(data), num_elements());
  }
};

using ConstTensorView = BasicTensorView<const std::byte>;
using TensorView = BasicTensorView<std::byte>;

// An owning, contiguous fp32 tensor: weights, activations, gradients.
class FloatTensor {
 public:
  FloatTensor() = default;
  // Zero-filled.
  explicit FloatTensor(Shape shape)
      : shape_(std::move(shape)), values_(NumElements(shape_), 0.0f) {}
  // REQUIRES: values.size() == NumElements(shape).
  FloatTensor(Shape shape, std::vector<float> values)
      : shape_(std::move(shape)), values_(std::move(values)) {
    MOE_CHECK(static_cast<int64_t>(values_.size()) == NumElements(shape_),
              ShapeString(shape_), " vs ", values_.size(), " values");
  }

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i); }
  int64_t num_elements() const { return static_cast<int64_t>(values_.size()); }

  absl::Span<const float> values() const { return values_; }
  absl::Span<float> mutable_values() { return absl::MakeSpan(values_); }
  // Row `r` of a matrix.
  absl::Span<const float> row(int64_t r) const {
    return values().subspan(r * shape_.at(1), shape_.at(1));
  }
  absl::Span<float> mutable_row(int64_t r) {
    return mutable_values().subspan(r * shape_.at(1), shape_.at(1));
  }

  ConstTensorView view() const {
    return {DType::kFloat32, shape_,
            reinterpret_cast<const std::byte*>(values_.data())};
  }
  TensorView mutable_view() {
    return {DType::kFloat32, shape_, reinterpret_cast<std::byte*>(values_.data())};
  }

  friend bool operator==(const FloatTensor& a, const FloatTensor& b) {
    return a.shape_ == b.shape_ && a.values_ == b.values_;
  }

 private:
  Shape shape_;
  std::vector<float> values_;
};

}  // namespace moe

#endif  // MOE_COMMON_TENSOR_H_
