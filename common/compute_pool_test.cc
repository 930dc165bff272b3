#include "common/compute_pool.h"

#include <atomic>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(ComputePoolTest, RunsEverythingSubmittedBeforeDestruction) {
  std::atomic<int> ran{0};
  {
    ComputePool pool(3, 1000);
    for (int i = 0; i < 500; ++i) {
      ASSERT_TRUE(pool.Submit([&ran] { ran.fetch_add(1); }));
    }
  }
  EXPECT_EQ(ran.load(), 500);
}

TEST(ComputePoolTest, RefusesWorkBeyondTheQueueBound) {
  absl::Notification release;
  absl::Notification started;
  ComputePool pool(1, 2);
  ASSERT_TRUE(pool.Submit([&] {
    started.Notify();
    release.WaitForNotification();
  }));
  started.WaitForNotification();  // the worker holds the first job
  EXPECT_TRUE(pool.Submit([] {}));
  EXPECT_TRUE(pool.Submit([] {}));
  EXPECT_FALSE(pool.Submit([] {}));
  EXPECT_EQ(pool.queued(), 2u);
  release.Notify();
}

TEST(ComputePoolTest, ThreadStartHookRunsOnEveryWorker) {
  std::atomic<int> started{0};
  { ComputePool pool(4, 1, [&started] { started.fetch_add(1); }); }
  EXPECT_EQ(started.load(), 4);
}

}  // namespace
}  // namespace moe
