#include "router_service/load_stats.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::router {
namespace {

using ::testing::ElementsAre;

const absl::Time kT0 = absl::FromUnixSeconds(1'000'000);

TEST(LoadStatsTest, SumsOverTheWindowOnly) {
  LoadStats stats(3, 2, absl::Seconds(10));
  stats.Record(0, {1, 2, 3}, {4, 2}, 1, kT0);
  stats.Record(0, {1, 0, 0}, {1, 0}, 0, kT0 + absl::Milliseconds(500));
  stats.Record(0, {0, 0, 6}, {0, 6}, 2, kT0 + absl::Seconds(5));
  LoadStats::Snapshot s = stats.Get(kT0 + absl::Seconds(9));
  EXPECT_THAT(s.expert_tokens, ElementsAre(2, 2, 9));
  EXPECT_THAT(s.server_tokens, ElementsAre(5, 8));
  EXPECT_EQ(s.dropped_pairs, 3);
  EXPECT_DOUBLE_EQ(s.expert_imbalance, 9.0 / (13.0 / 3));
  EXPECT_EQ(s.window, absl::Seconds(10));
  // Ten seconds later the first second has left the window.
  s = stats.Get(kT0 + absl::Seconds(10));
  EXPECT_THAT(s.expert_tokens, ElementsAre(0, 0, 6));
  // And its bucket is reused cleanly.
  stats.Record(0, {5, 0, 0}, {5, 0}, 0, kT0 + absl::Seconds(10));
  s = stats.Get(kT0 + absl::Seconds(10));
  EXPECT_THAT(s.expert_tokens, ElementsAre(5, 0, 6));
  EXPECT_EQ(stats.Get(kT0 + absl::Seconds(100)).expert_imbalance, 1.0);
}

}  // namespace
}  // namespace moe::router
