#include "common/stream_set.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

class FakeStream : public DrainableStream {
 public:
  void Drain() override { ++drains; }
  int drains = 0;
};

TEST(StreamSetTest, RefusesStreamsBeyondTheLimitAndWhileDraining) {
  int gauge = -1;
  StreamSet set({/*max_streams=*/2}, [&](int open) { gauge = open; });
  FakeStream a, b, c;
  a.Ref();  // the test keeps its own reference: Unref must not delete it
  EXPECT_TRUE(set.Register(&a).ok());
  EXPECT_TRUE(set.Register(&b).ok());
  EXPECT_EQ(gauge, 2);
  const absl::Status third = set.Register(&c);
  EXPECT_EQ(third.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.message(), HasSubstr("2 streams open, its limit"));
  set.Unregister(&b);
  EXPECT_EQ(gauge, 1);
  set.BeginDrain();
  EXPECT_EQ(a.drains, 1);
  EXPECT_EQ(set.Register(&c).code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(set.WaitForStreams(absl::Now() + absl::Milliseconds(10)));
  set.Unregister(&a);
  EXPECT_TRUE(set.WaitForStreams(absl::Now()));
  EXPECT_EQ(set.open_streams(), 0);
}

TEST(StreamSetTest, SharedByteBudgetAlwaysAdmitsOneRequest) {
  StreamBounds bounds;
  bounds.max_buffered_bytes = 100;
  StreamSet set(bounds);
  EXPECT_TRUE(set.TryReserve(500));  // alone, however large
  EXPECT_FALSE(set.TryReserve(1));
  set.Release(500);
  EXPECT_TRUE(set.TryReserve(60));
  EXPECT_TRUE(set.TryReserve(40));
  EXPECT_FALSE(set.TryReserve(1));
  EXPECT_EQ(set.buffered_bytes(), 100);
  set.Release(100);
  EXPECT_EQ(set.buffered_bytes(), 0);
}

}  // namespace
}  // namespace moe
