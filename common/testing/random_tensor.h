// Seeded random tensors for tests and benchmarks: the same seed gives the
// same values on every run.
#ifndef MOE_COMMON_TESTING_RANDOM_TENSOR_H_
#define MOE_COMMON_TESTING_RANDOM_TENSOR_H_

#include <algorithm>
#include <cstdint>
#include <random>

#include "common/tensor.h"

namespace moe::testing {

// Uniform in [-scale, scale).
inline FloatTensor RandomTensor(Shape shape, uint64_t seed, float scale = 1.0f) {
  FloatTensor t(std::move(shape));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  for (float& v : t.mutable_values()) v = dist(rng);
  return t;
}

// The rows of `a` then those of `b` (two batches as one).
// REQUIRES: the same row width.
inline FloatTensor ConcatRows(const FloatTensor& a, const FloatTensor& b) {
  FloatTensor out({a.shape()[0] + b.shape()[0], a.shape()[1]});
  absl::Span<float> values = out.mutable_values();
  std::copy(a.values().begin(), a.values().end(), values.begin());
  std::copy(b.values().begin(), b.values().end(), values.begin() + a.values().size());
  return out;
}

}  // namespace moe::testing

#endif  // MOE_COMMON_TESTING_RANDOM_TENSOR_H_
