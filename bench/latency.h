// Forwards sent to a router while something else happens (a placement
// change, a checkpoint save), timed one by one: what that costs serving.
#ifndef MOE_BENCH_LATENCY_H_
#define MOE_BENCH_LATENCY_H_

#include <atomic>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/tensor.h"

namespace moe::bench {

// One request: when it ended, how long it took, whether it succeeded.
struct Sample {
  absl::Time done;
  double ms;
  bool ok;
};

// The q-quantile (0..1) of `v`; 0 when empty.
double Percentile(std::vector<double> v, double q);

// `clients` clients, each on its own channel, sending Forwards of
// `make_input(rng)` (rng seeded per client) one after another until Stop.
class ForwardLoad {
 public:
  using MakeInput = std::function<FloatTensor(std::mt19937& rng)>;
  ForwardLoad(const std::string& router_address, int clients, MakeInput make_input);
  ~ForwardLoad() { Stop(); }

  // Stops the clients (each finishes its request); every sample, by the
  // time it ended.
  std::vector<Sample> Stop() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  std::atomic<bool> stop_{false};
  absl::Mutex mu_;
  std::vector<Sample> samples_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> clients_;
};

}  // namespace moe::bench

#endif  // MOE_BENCH_LATENCY_H_
