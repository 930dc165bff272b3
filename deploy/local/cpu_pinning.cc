#include "deploy/local/cpu_pinning.h"

#include <sched.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe::local {
namespace {

// `count` CPUs of `available` from position `first`, wrapping around; sorted.
std::vector<int> Block(const std::vector<int>& available, size_t first, size_t count) {
  count = std::min(count, available.size());
  std::vector<int> block;
  block.reserve(count);
  for (size_t i = 0; i < count; ++i) block.push_back(available[(first + i) % available.size()]);
  std::sort(block.begin(), block.end());
  return block;
}

}  // namespace

absl::StatusOr<CpuPinning> PlanCpuPinning(const std::vector<int>& available, int servers,
                                          int router_cpus, int server_cpus) {
  if (available.empty()) return absl::InvalidArgumentError("no CPUs to pin to");
  if (servers < 0 || router_cpus < 1 || server_cpus < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CPU pinning needs servers >= 0, router CPUs >= 1 and server CPUs >= 0, got ",
                     servers, ", ", router_cpus, " and ", server_cpus));
  }
  const size_t n = available.size();
  const size_t router = std::min<size_t>(router_cpus, n);
  size_t each = static_cast<size_t>(server_cpus);
  if (each == 0) each = servers == 0 ? 1 : std::max<size_t>(1, (n - router) / servers);
  each = std::min(each, n);
  CpuPinning pinning;
  pinning.router = Block(available, 0, router);
  for (int s = 0; s < servers; ++s) {
    pinning.servers.push_back(Block(available, router + s * each, each));
  }
  pinning.shared = router + static_cast<size_t>(servers) * each > n;
  return pinning;
}

std::vector<int> AffinityCpus(int pid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(pid, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

std::string CpuList(const std::vector<int>& cpus) {
  std::string list;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!list.empty()) list += ',';
    absl::StrAppend(&list, cpus[i]);
    if (j > i) absl::StrAppend(&list, "-", cpus[j]);
    i = j + 1;
  }
  return list;
}

}  // namespace moe::local
