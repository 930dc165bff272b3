// Which CPUs each process of a local cluster may run on (moe_local
// --pin_cpus), so that a router and its expert servers on one machine stop
// trading cores the way pods with their own CPUs would not: the router a
// block of CPUs, then each server the next block, in the order of the CPUs
// moe_local itself may use. Pure functions; thread-safe.
#ifndef MOE_DEPLOY_LOCAL_CPU_PINNING_H_
#define MOE_DEPLOY_LOCAL_CPU_PINNING_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe::local {

struct CpuPinning {
  std::vector<int> router;
  std::vector<std::vector<int>> servers;
  // More CPUs asked for than `available` holds: the blocks wrapped around
  // and some processes share CPUs.
  bool shared = false;
};

// `router_cpus` (>= 1) for the router, then `server_cpus` for each of
// `servers`; `server_cpus` 0 splits what the router leaves evenly (at least
// one each). A block larger than `available` is all of it. INVALID_ARGUMENT
// for counts out of range or no CPUs.
absl::StatusOr<CpuPinning> PlanCpuPinning(const std::vector<int>& available, int servers,
                                          int router_cpus, int server_cpus);

// The CPUs process (main thread) `pid` may run on, its affinity mask as
// the kernel has it, ascending; pid 0: the calling thread. Empty when it
// cannot be read.
std::vector<int> AffinityCpus(int pid = 0);

// "0-3,6": CPU numbers as Linux lists them (/proc/<pid>/status,
// taskset -c); `cpus` ascending.
std::string CpuList(const std::vector<int>& cpus);

}  // namespace moe::local

#endif  // MOE_DEPLOY_LOCAL_CPU_PINNING_H_
