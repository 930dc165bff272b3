// How many cores this process may use: the CPUs of its affinity mask,
// capped by its cgroup's CPU quota. In a Kubernetes pod with a CPU limit
// the affinity mask still shows every core of the node; the limit is only
// in the quota, and sizing thread pools from the mask oversubscribes the
// pod (a 2-core limit on a 64-core node would get 64 oneDNN threads).
// Thread-safe (reads files; no state).
#ifndef MOE_COMMON_CPU_BUDGET_H_
#define MOE_COMMON_CPU_BUDGET_H_

#include <optional>

#include "absl/strings/string_view.h"

namespace moe {

// min(affinity CPUs, ceil(cgroup quota / period)), at least 1. The quota
// is read from the container's cgroup root: /sys/fs/cgroup/cpu.max
// (cgroup v2), else /sys/fs/cgroup/cpu/cpu.cfs_quota_us and
// cpu.cfs_period_us (v1).
int CpuBudget();

// Cores a quota allows, nullopt when unlimited or unreadable.
// cgroup v2 cpu.max: "max 100000" or "<quota> <period>".
std::optional<double> CgroupV2Cores(absl::string_view cpu_max);
// cgroup v1: cfs_quota_us ("-1" when unlimited) and cfs_period_us.
std::optional<double> CgroupV1Cores(absl::string_view quota, absl::string_view period);

}  // namespace moe

#endif  // MOE_COMMON_CPU_BUDGET_H_
