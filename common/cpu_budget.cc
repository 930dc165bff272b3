#include "common/cpu_budget.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace moe {
namespace {

std::optional<double> Cores(absl::string_view quota, absl::string_view period) {
  int64_t q = 0, p = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(quota), &q) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(period), &p) || q <= 0 || p <= 0) {
    return std::nullopt;
  }
  return static_cast<double>(q) / static_cast<double>(p);
}

std::optional<std::string> ReadSmallFile(const char* path) {
  std::ifstream file(path);
  if (!file) return std::nullopt;
  std::string text(256, '\0');
  file.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(file.gcount()));
  return text;
}

}  // namespace

std::optional<double> CgroupV2Cores(absl::string_view cpu_max) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::StripAsciiWhitespace(cpu_max), ' ', absl::SkipEmpty());
  if (fields.size() != 2 || fields[0] == "max") return std::nullopt;
  return Cores(fields[0], fields[1]);
}

std::optional<double> CgroupV1Cores(absl::string_view quota, absl::string_view period) {
  return Cores(quota, period);  // "-1": unlimited, refused as q <= 0
}

int CpuBudget() {
  int cores = 1;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = std::max(1, CPU_COUNT(&set));
  std::optional<double> quota;
  if (std::optional<std::string> v2 = ReadSmallFile("/sys/fs/cgroup/cpu.max")) {
    quota = CgroupV2Cores(*v2);
  } else {
    std::optional<std::string> q = ReadSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
    std::optional<std::string> p = ReadSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    if (q && p) quota = CgroupV1Cores(*q, *p);
  }
  if (quota) cores = std::min(cores, std::max(1, static_cast<int>(std::ceil(*quota))));
  return cores;
}

}  // namespace moe
