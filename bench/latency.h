// Latency samples of requests sent while something else happens (a
// placement change, a checkpoint save), for the benchmarks that measure
// what it costs serving.
#ifndef MOE_BENCH_LATENCY_H_
#define MOE_BENCH_LATENCY_H_

#include <algorithm>
#include <vector>

#include "absl/time/time.h"

namespace moe::bench {

// One request: when it ended, how long it took, whether it succeeded.
struct Sample {
  absl::Time done;
  double ms;
  bool ok;
};

// The q-quantile (0..1) of `v`; 0 when empty.
inline double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

}  // namespace moe::bench

#endif  // MOE_BENCH_LATENCY_H_
