// Tensor comparisons with the tolerance DESIGN.md defines: the relative
// error ||a - b|| / ||b|| over the whole tensor (L2 norms, in double).
#ifndef MOE_COMMON_TESTING_TENSOR_MATCHERS_H_
#define MOE_COMMON_TESTING_TENSOR_MATCHERS_H_

#include <cmath>

#include "absl/types/span.h"
#include "common/tensor.h"
#include "gtest/gtest.h"

namespace moe::testing {

// ||actual - expected|| / ||expected||; 0 when both are zero, and the
// absolute norm of the difference when only `expected` is zero.
inline double RelativeError(absl::Span<const float> actual,
                            absl::Span<const float> expected) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double d = static_cast<double>(actual[i]) - expected[i];
    diff += d * d;
    norm += static_cast<double>(expected[i]) * expected[i];
  }
  if (norm == 0) return std::sqrt(diff);
  return std::sqrt(diff / norm);
}

inline ::testing::AssertionResult TensorNear(const FloatTensor& actual,
                                             const FloatTensor& expected,
                                             double tolerance) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure()
           << "shape " << ShapeString(actual.shape()) << " != expected "
           << ShapeString(expected.shape());
  }
  const double error = RelativeError(actual.values(), expected.values());
  if (!(error <= tolerance)) {
    return ::testing::AssertionFailure()
           << "relative error " << error << " > " << tolerance;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace moe::testing

#endif  // MOE_COMMON_TESTING_TENSOR_MATCHERS_H_
