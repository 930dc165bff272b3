// Queued merging (window 0, the servers' default): requests for one expert
// that wait while the compute thread is busy run as one kernel call, each
// answer its own rows; a request its caller gave up on is answered with
// that and left out of the call; an idle pool runs a lone request at once.
#include "expert_service/micro_batcher.h"

#include <map>
#include <memory>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/deterministic_init.h"
#include "common/reference_expert.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "expert_service/testing/observed_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::moe::testing::RandomTensor;
using ::moe::testing::TensorNear;
using ::testing::ElementsAre;

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 16;
  model.d_ff = 24;
  model.num_experts = 1;
  model.top_k = 1;
  model.seed = 4;
  return model;
}

FloatTensor Expected(const FloatTensor& x) {
  FloatTensor y(x.shape());
  std::vector<float> hidden(x.dim(0) * Model().d_ff);
  ReferenceExpertForward(InitExpert(Model(), ExpertKey(0, 0)), x.values(), x.dim(0),
                         absl::MakeSpan(hidden), y.mutable_values());
  return y;
}

TEST(MicroBatcherTest, QueuedRequestsMergeAndAnIdlePoolRunsOneAtOnce) {
  std::vector<int64_t> calls;
  std::map<ExpertKey, ExpertWeights> experts;
  experts.emplace(ExpertKey(0, 0), InitExpert(Model(), ExpertKey(0, 0)));
  auto store = ExpertStore::Create(
      {Model(), "a", {1 << 20, absl::Seconds(5)}}, std::move(experts),
      [&](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
        // One compute thread: no race on `calls`.
        return std::make_unique<testing::ObservedKernel>(
            w, [&calls](int64_t rows) { calls.push_back(rows); });
      });
  ASSERT_TRUE(store.ok()) << store.status();
  ComputePool pool(1, 64);
  MicroBatcher batcher({absl::ZeroDuration(), 4096}, **store, pool, [] { return absl::Now(); });

  // The one compute thread is busy: three requests queue up behind it, the
  // second one's caller gives up before they run.
  absl::Notification busy;
  ASSERT_TRUE(pool.Submit([&] { busy.WaitForNotification(); }));
  const std::vector<FloatTensor> x = {RandomTensor({2, 16}, 1), RandomTensor({3, 16}, 2),
                                      RandomTensor({5, 16}, 3), RandomTensor({4, 16}, 4)};
  std::vector<FloatTensor> y;
  for (const FloatTensor& t : x) y.emplace_back(t.shape());
  std::vector<absl::Status> status(4);
  std::vector<absl::Duration> ran(4);
  std::vector<absl::Notification> done(4);
  auto forward = [&](int i, MicroBatcher::KeepGoing keep_going) {
    batcher.Forward(
        ExpertKey(0, 0), x[i].view(), y[i].mutable_view(), ExpertStore::kAnyStep,
        [&, i](absl::Status s, absl::Duration d) {
          status[i] = std::move(s);
          ran[i] = d;
          done[i].Notify();
        },
        std::move(keep_going));
  };
  forward(0, nullptr);
  forward(1, [] { return absl::DeadlineExceededError("deadline passed"); });
  forward(2, [] { return absl::OkStatus(); });
  // The wait for the compute thread is not the batch's running time.
  const absl::Duration waited = absl::Milliseconds(300);
  absl::SleepFor(waited);
  busy.Notify();
  for (int i = 0; i < 3; ++i) done[i].WaitForNotification();
  EXPECT_THAT(calls, ElementsAre(7));  // requests 0 and 2 in one call
  EXPECT_TRUE(status[0].ok()) << status[0];
  EXPECT_EQ(status[1].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(status[2].ok()) << status[2];
  // One batch of 2 + 5 rows: shares by rows, together less than the wait.
  EXPECT_GT(ran[0], absl::ZeroDuration());
  EXPECT_LT(absl::AbsDuration(ran[0] * 5 - ran[2] * 2), absl::Nanoseconds(10));
  EXPECT_LT(ran[0] + ran[2], waited);
  EXPECT_EQ(ran[1], absl::ZeroDuration());  // did not run
  EXPECT_TRUE(TensorNear(y[0], Expected(x[0]), 1e-5));
  EXPECT_TRUE(TensorNear(y[2], Expected(x[2]), 1e-5));

  // Idle: a lone request runs at once, on its own rows (no window to wait
  // out: the test would hang if there were one without a timer).
  forward(3, nullptr);
  done[3].WaitForNotification();
  EXPECT_THAT(calls, ElementsAre(7, 4));
  EXPECT_TRUE(TensorNear(y[3], Expected(x[3]), 1e-5));
}

}  // namespace
}  // namespace moe::expert
