#include "common/cpu_budget.h"

#include <sched.h>

#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(CpuBudgetTest, ReadsCgroupV2Quotas) {
  EXPECT_EQ(CgroupV2Cores("max 100000\n"), std::nullopt);
  EXPECT_EQ(CgroupV2Cores("200000 100000\n"), 2.0);
  EXPECT_EQ(CgroupV2Cores("150000 100000"), 1.5);
  for (absl::string_view bad : {"", "200000", "x 100000", "200000 0", "-5 100000", "1 2 3"}) {
    EXPECT_EQ(CgroupV2Cores(bad), std::nullopt) << bad;
  }
}

TEST(CpuBudgetTest, ReadsCgroupV1Quotas) {
  EXPECT_EQ(CgroupV1Cores("-1\n", "100000\n"), std::nullopt);
  EXPECT_EQ(CgroupV1Cores("50000\n", "100000\n"), 0.5);
  EXPECT_EQ(CgroupV1Cores("400000", "100000"), 4.0);
  EXPECT_EQ(CgroupV1Cores("400000", ""), std::nullopt);
}

TEST(CpuBudgetTest, NeverMoreThanTheAffinityMaskNorLessThanOne) {
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const int budget = CpuBudget();
  EXPECT_GE(budget, 1);
  EXPECT_LE(budget, CPU_COUNT(&set));
}

}  // namespace
}  // namespace moe
