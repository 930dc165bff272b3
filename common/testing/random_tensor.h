// Seeded random tensors for tests and benchmarks: the same seed gives the
// same values on every run.
#ifndef MOE_COMMON_TESTING_RANDOM_TENSOR_H_
#define MOE_COMMON_TESTING_RANDOM_TENSOR_H_

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

}  // namespace moe::testing

#endif  // MOE_COMMON_TESTING_RANDOM_TENSOR_H_
