// Generated all-reduce inputs and the check of a result, shared by the
// all-reduce node (our ring) and the Gloo node of the benchmark: rank r's
// element i comes from a counter-based hash, so any rank can generate every
// rank's input and check every element of the sum.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_ALLREDUCE_INPUTS_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_ALLREDUCE_INPUTS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/types/span.h"

namespace moe::allreduce {

// Rank r's element i: uniform in [-1, 1).
inline float AllReduceInput(uint64_t seed, int rank, int64_t i) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + (static_cast<uint64_t>(rank) << 40) +
               static_cast<uint64_t>(i);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) / static_cast<double>(1ull << 23) - 1.0);
}

inline void FillAllReduceInput(uint64_t seed, int rank, absl::Span<float> buffer) {
  for (size_t i = 0; i < buffer.size(); ++i) {
    buffer[i] = AllReduceInput(seed, rank, static_cast<int64_t>(i));
  }
}

struct AllReduceCheck {
  int64_t wrong = 0;
  // Largest |error| / bound: <= 1 when right.
  double max_error_ratio = 0;
};

// Each element against the float64 sum of all `n` ranks' inputs; fp32
// rounding of an n-term sum is within n * 2^-23 * sum |x|.
inline AllReduceCheck CheckAllReduce(absl::Span<const float> result, uint64_t seed, int n) {
  AllReduceCheck out;
  const double eps = std::ldexp(1.0, -23);
  for (int64_t i = 0; i < static_cast<int64_t>(result.size()); ++i) {
    double sum = 0, sum_abs = 0;
    for (int r = 0; r < n; ++r) {
      const double v = AllReduceInput(seed, r, i);
      sum += v;
      sum_abs += std::fabs(v);
    }
    const double ratio = std::fabs(result[i] - sum) / (n * eps * sum_abs + 1e-30);
    out.max_error_ratio = std::max(out.max_error_ratio, ratio);
    if (!(ratio <= 1.0)) ++out.wrong;
  }
  return out;
}

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_ALLREDUCE_INPUTS_H_
