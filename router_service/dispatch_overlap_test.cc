#include "router_service/dispatch_overlap.h"

#include "gtest/gtest.h"

namespace moe::router {
namespace {

absl::Time At(int ms) { return absl::UnixEpoch() + absl::Milliseconds(ms); }

TEST(DispatchOverlapTest, OneCallPerServerHidesNothing) {
  // Sent at 0, 3 ms of kernel, answered at 5: 2 ms outside the kernel, all
  // of it exposed; the same on a second server.
  const CallTiming calls[] = {{0, At(0), At(5), absl::Milliseconds(3)},
                              {1, At(0), At(7), absl::Milliseconds(4)}};
  const DispatchOverlap overlap = MeasureOverlap(calls);
  EXPECT_EQ(overlap.wait, absl::Milliseconds(5));
  EXPECT_EQ(overlap.hidden, absl::ZeroDuration());
}

TEST(DispatchOverlapTest, PipelinedCallsHideTheMiddleLegs) {
  // Two calls sent together to one server: each 1 ms there, 2 ms of kernel,
  // 1 ms back. The first is answered at 4; the second waits for the kernel
  // until 3 and is answered at 6. Outside the kernels: 2 + 4 ms; exposed:
  // the first call's way there and the second's way back, 2 ms.
  const CallTiming calls[] = {{0, At(0), At(4), absl::Milliseconds(2)},
                              {0, At(0), At(6), absl::Milliseconds(2)}};
  const DispatchOverlap overlap = MeasureOverlap(calls);
  EXPECT_EQ(overlap.wait, absl::Milliseconds(6));
  EXPECT_EQ(overlap.hidden, absl::Milliseconds(4));
}

TEST(DispatchOverlapTest, CallsOneAfterAnotherHideNothing) {
  const CallTiming calls[] = {{0, At(0), At(4), absl::Milliseconds(2)},
                              {0, At(4), At(8), absl::Milliseconds(2)}};
  EXPECT_EQ(MeasureOverlap(calls).hidden, absl::ZeroDuration());
}

TEST(DispatchOverlapTest, OverReportedComputeNeverGoesNegative) {
  const CallTiming calls[] = {{0, At(0), At(2), absl::Milliseconds(5)}};
  const DispatchOverlap overlap = MeasureOverlap(calls);
  EXPECT_EQ(overlap.wait, absl::ZeroDuration());
  EXPECT_EQ(overlap.hidden, absl::ZeroDuration());
}

}  // namespace
}  // namespace moe::router
