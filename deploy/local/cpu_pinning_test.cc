#include "deploy/local/cpu_pinning.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::local {
namespace {

using ::testing::ElementsAre;

TEST(CpuPinningTest, GivesTheRouterThenEachServerItsOwnBlock) {
  // 16 CPUs, router 2, 6 servers of 2 (scaling-16core.md's layout).
  std::vector<int> all(16);
  for (int i = 0; i < 16; ++i) all[i] = i;
  const CpuPinning pinning = *PlanCpuPinning(all, 6, 2, 2);
  EXPECT_THAT(pinning.router, ElementsAre(0, 1));
  ASSERT_EQ(pinning.servers.size(), 6u);
  EXPECT_THAT(pinning.servers[0], ElementsAre(2, 3));
  EXPECT_THAT(pinning.servers[5], ElementsAre(12, 13));
  EXPECT_FALSE(pinning.shared);
}

TEST(CpuPinningTest, SplitsWhatTheRouterLeavesEvenly) {
  const CpuPinning pinning = *PlanCpuPinning({0, 1, 2, 3, 4, 5, 6, 7}, 3, 1, 0);
  EXPECT_THAT(pinning.router, ElementsAre(0));
  ASSERT_EQ(pinning.servers.size(), 3u);
  EXPECT_THAT(pinning.servers[0], ElementsAre(1, 2));
  EXPECT_THAT(pinning.servers[1], ElementsAre(3, 4));
  EXPECT_THAT(pinning.servers[2], ElementsAre(5, 6));
  EXPECT_FALSE(pinning.shared);
}

TEST(CpuPinningTest, UsesTheCpusItMayUseInTheirOrder) {
  const CpuPinning pinning = *PlanCpuPinning({4, 5, 9, 10}, 1, 1, 3);
  EXPECT_THAT(pinning.router, ElementsAre(4));
  EXPECT_THAT(pinning.servers[0], ElementsAre(5, 9, 10));
}

TEST(CpuPinningTest, WrapsAroundAndSaysSoOnASmallMachine) {
  // 2 CPUs, a router and 2 servers of one each: the second server shares
  // the router's CPU.
  const CpuPinning pinning = *PlanCpuPinning({0, 1}, 2, 1, 1);
  EXPECT_THAT(pinning.router, ElementsAre(0));
  EXPECT_THAT(pinning.servers[0], ElementsAre(1));
  EXPECT_THAT(pinning.servers[1], ElementsAre(0));
  EXPECT_TRUE(pinning.shared);
  // A block larger than the machine is all of it, each CPU once.
  const CpuPinning big = *PlanCpuPinning({0, 1}, 1, 5, 3);
  EXPECT_THAT(big.router, ElementsAre(0, 1));
  EXPECT_THAT(big.servers[0], ElementsAre(0, 1));
  EXPECT_TRUE(big.shared);
  // The router takes all: the even split still gives each server one.
  const CpuPinning rest = *PlanCpuPinning({0, 1}, 2, 2, 0);
  EXPECT_THAT(rest.servers[0], ElementsAre(0));
  EXPECT_THAT(rest.servers[1], ElementsAre(1));
}

TEST(CpuPinningTest, RefusesCountsOutOfRange) {
  EXPECT_FALSE(PlanCpuPinning({}, 1, 1, 1).ok());
  EXPECT_FALSE(PlanCpuPinning({0}, -1, 1, 1).ok());
  EXPECT_FALSE(PlanCpuPinning({0}, 1, 0, 1).ok());
  EXPECT_FALSE(PlanCpuPinning({0}, 1, 1, -2).ok());
}

TEST(CpuPinningTest, ListsCpusAsLinuxDoes) {
  EXPECT_EQ(CpuList({0, 1, 2, 3, 6}), "0-3,6");
  EXPECT_EQ(CpuList({1}), "1");
  EXPECT_EQ(CpuList({0, 2, 4, 5}), "0,2,4-5");
  EXPECT_EQ(CpuList({}), "");
  EXPECT_FALSE(AffinityCpus().empty());
}

}  // namespace
}  // namespace moe::local
