#include "expert_service/lease_table.h"

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1000);

TEST(LeaseTableTest, OneHolderAtATimeUntilItExpires) {
  LeaseTable table;
  absl::StatusOr<LeaseTable::Lease> a = table.Acquire("auto", "router-a", absl::Seconds(30), kT0);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->granted);
  EXPECT_EQ(a->expiry, kT0 + absl::Seconds(30));
  // Another holder waits; the holder renews.
  absl::StatusOr<LeaseTable::Lease> b =
      table.Acquire("auto", "router-b", absl::Seconds(30), kT0 + absl::Seconds(10));
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->granted);
  EXPECT_EQ(b->holder, "router-a");
  a = table.Acquire("auto", "router-a", absl::Seconds(30), kT0 + absl::Seconds(20));
  EXPECT_TRUE(a->granted);
  EXPECT_EQ(a->expiry, kT0 + absl::Seconds(50));
  b = table.Acquire("auto", "router-b", absl::Seconds(30), kT0 + absl::Seconds(49));
  EXPECT_FALSE(b->granted);
  // Expired: the next asker gets it.
  b = table.Acquire("auto", "router-b", absl::Seconds(30), kT0 + absl::Seconds(50));
  EXPECT_TRUE(b->granted);
  EXPECT_EQ(b->holder, "router-b");
  // Names are independent.
  EXPECT_TRUE(table.Acquire("other", "router-a", absl::Seconds(1), kT0)->granted);
}

TEST(LeaseTableTest, AHolderReleasesItsLeaseOnlyItsOwn) {
  LeaseTable table;
  ASSERT_TRUE(table.Acquire("step", "router-a", absl::Seconds(60), kT0)->granted);
  // Another holder's release changes nothing.
  absl::StatusOr<LeaseTable::Lease> b = table.Release("step", "router-b", kT0 + absl::Seconds(1));
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->granted);
  EXPECT_FALSE(
      table.Acquire("step", "router-b", absl::Seconds(60), kT0 + absl::Seconds(2))->granted);
  // The holder's frees it at once.
  ASSERT_TRUE(table.Release("step", "router-a", kT0 + absl::Seconds(3)).ok());
  EXPECT_TRUE(
      table.Acquire("step", "router-b", absl::Seconds(60), kT0 + absl::Seconds(3))->granted);
  EXPECT_FALSE(table.Release("", "router-a", kT0).ok());
  // Over the wire: release=true.
  v1::AcquireLeaseRequest request;
  request.set_name("step");
  request.set_holder("router-b");
  request.set_release(true);
  absl::StatusOr<v1::AcquireLeaseResponse> answer =
      AnswerLeaseRequest(table, request, kT0 + absl::Seconds(4));
  ASSERT_TRUE(answer.ok());
  EXPECT_FALSE(answer->granted());
  EXPECT_EQ(answer->expires_in_ms(), 0);
  request.set_release(false);
  request.set_holder("router-a");
  request.set_ttl_ms(1000);
  EXPECT_TRUE(AnswerLeaseRequest(table, request, kT0 + absl::Seconds(4))->granted());
}

TEST(LeaseTableTest, HostileRequestsAreRefusedAndBounded) {
  LeaseTable table;
  EXPECT_THAT(table.Acquire("", "h", absl::Seconds(1), kT0).status().message(),
              HasSubstr("lease name"));
  EXPECT_FALSE(table.Acquire("a/b", "h", absl::Seconds(1), kT0).ok());
  EXPECT_FALSE(table.Acquire(std::string(65, 'a'), "h", absl::Seconds(1), kT0).ok());
  EXPECT_FALSE(table.Acquire("a", "", absl::Seconds(1), kT0).ok());
  EXPECT_FALSE(table.Acquire("a", std::string(257, 'h'), absl::Seconds(1), kT0).ok());
  EXPECT_FALSE(table.Acquire("a", "h", absl::ZeroDuration(), kT0).ok());
  EXPECT_FALSE(table.Acquire("a", "h", absl::Minutes(11), kT0).ok());
  for (int i = 0; i < LeaseTable::kMaxLeases; ++i) {
    ASSERT_TRUE(table.Acquire(absl::StrCat("n", i), "h", absl::Seconds(10), kT0).ok());
  }
  const absl::Status full = table.Acquire("one-more", "h", absl::Seconds(10), kT0).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  // Expired ones make room.
  EXPECT_TRUE(table.Acquire("one-more", "h", absl::Seconds(10), kT0 + absl::Seconds(10)).ok());
}

}  // namespace
}  // namespace moe::expert
