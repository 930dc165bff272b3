#include "common/deadline_timer.h"

#include <atomic>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(DeadlineTimerTest, FiresPastDeadlinesInOrder) {
  DeadlineTimer timer;
  absl::Mutex mu;
  std::vector<int> order;
  absl::Notification done;
  const absl::Time past = absl::Now() - absl::Seconds(1);
  // Holds the timer's thread until both are scheduled: otherwise the first,
  // already due, may fire before the second is in.
  absl::Notification scheduled;
  timer.Schedule(past, [&] { scheduled.WaitForNotification(); });
  timer.Schedule(past + absl::Milliseconds(2), [&] {
    absl::MutexLock lock(&mu);
    order.push_back(2);
    done.Notify();
  });
  timer.Schedule(past + absl::Milliseconds(1), [&] {
    absl::MutexLock lock(&mu);
    order.push_back(1);
  });
  scheduled.Notify();
  done.WaitForNotification();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST(DeadlineTimerTest, CancelledCallbacksNeverRun) {
  std::atomic<bool> ran{false};
  {
    DeadlineTimer timer;
    const uint64_t id = timer.Schedule(absl::Now() + absl::Hours(1), [&] { ran = true; });
    EXPECT_TRUE(timer.Cancel(id));
    EXPECT_FALSE(timer.Cancel(id));
  }
  EXPECT_FALSE(ran.load());
}

}  // namespace
}  // namespace moe
