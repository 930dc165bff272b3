#include "common/tensor.h"

#include "absl/strings/str_join.h"

namespace moe {

absl::string_view DTypeName(DType dtype) {
  return dtype == DType::kFloat32 ? "fp32" : "bf16";
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace moe
