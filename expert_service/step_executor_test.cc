// What a server does with a step its router left undecided: it commits or
// aborts as its peers did (DecideFromPeers), stays prepared while a peer
// that may have committed is silent, commits a prepared step the next step
// says was committed, and syncs before training when it is behind.
#include "expert_service/step_executor.h"

#include <limits>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/deterministic_init.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/reference_expert_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::testing::HasSubstr;

PeerAnswer Answered(uint64_t committed, uint64_t prepared = 0, uint64_t aborted = 0) {
  return {"server e1", PeerSteps{committed, prepared, aborted}};
}
PeerAnswer Silent() { return {"server e2", absl::UnavailableError("connection refused")}; }

TEST(DecideFromPeersTest, CommittedAnywhereWinsThenAbortedThenOnlyACompleteCensusAborts) {
  EXPECT_EQ(DecideFromPeers(3, {Answered(2, 3), Silent(), Answered(3)}).outcome,
            StepVerdict::kCommitted);
  EXPECT_EQ(DecideFromPeers(3, {Answered(4)}).outcome, StepVerdict::kCommitted);
  EXPECT_EQ(DecideFromPeers(3, {Silent(), Answered(2, 0, 3)}).outcome, StepVerdict::kAborted);
  // Every peer answered and none committed it: nobody can have.
  const StepVerdict none = DecideFromPeers(3, {Answered(2, 3), Answered(2)});
  EXPECT_EQ(none.outcome, StepVerdict::kAborted);
  EXPECT_THAT(none.why, HasSubstr("none of the 2 peers committed it"));
  EXPECT_EQ(DecideFromPeers(3, {}).outcome, StepVerdict::kAborted);
  // A silent peer may have committed it.
  const StepVerdict doubt = DecideFromPeers(3, {Answered(2, 3), Silent()});
  EXPECT_EQ(doubt.outcome, StepVerdict::kInDoubt);
  EXPECT_THAT(doubt.why, HasSubstr("server e2 (connection refused)"));
}

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 8;
  model.d_ff = 16;
  model.num_experts = 2;
  model.top_k = 1;
  model.seed = 5;
  return model;
}

// One server hosting expert 0, no replicas (no rings).
class StepExecutorTest : public ::testing::Test {
 protected:
  std::unique_ptr<StepExecutor> Executor(StepExecutor::Options options) {
    std::map<ExpertKey, ExpertWeights> weights;
    weights.emplace(ExpertKey(0, 0), InitExpert(Model(), ExpertKey(0, 0)));
    store_ = *ExpertStore::Create(
        {Model(), "server", {}}, std::move(weights),
        [](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
          return std::make_unique<ReferenceExpertKernel>(w);
        });
    options.optimizer = Model().optimizer;
    options.server_name = "e0";
    return std::make_unique<StepExecutor>(std::move(options), *store_, collectives_);
  }
  // Answers of the peers, settable while the executor asks.
  std::vector<PeerAnswer> Ask() {
    absl::MutexLock lock(&mu_);
    ++asked_;
    return answers_;
  }
  void Answer(std::vector<PeerAnswer> answers) {
    absl::MutexLock lock(&mu_);
    answers_ = std::move(answers);
  }
  // Waits (for real events, bounded) until `done`.
  template <typename Done>
  bool Eventually(Done done) {
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (!done()) {
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(2));
    }
    return true;
  }
  int asked() {
    absl::MutexLock lock(&mu_);
    return asked_;
  }

  allreduce::CollectiveRegistry collectives_;
  std::unique_ptr<ExpertStore> store_;
  absl::Mutex mu_;
  std::vector<PeerAnswer> answers_ ABSL_GUARDED_BY(mu_);
  int asked_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST_F(StepExecutorTest, APreparedStepWithoutWordStaysInDoubtThenCommitsAsAPeerDid) {
  StepExecutor::Options options;
  options.prepared_timeout = absl::Milliseconds(20);
  options.ask_peers = [this] { return Ask(); };
  std::vector<uint64_t> resolved;
  absl::Mutex resolved_mu;
  options.on_resolved = [&](uint64_t step, bool committed) {
    absl::MutexLock lock(&resolved_mu);
    resolved.push_back(committed ? step : 1000 + step);
  };
  Answer({Answered(0, 1), Silent()});
  std::unique_ptr<StepExecutor> steps = Executor(std::move(options));
  ASSERT_TRUE(steps->Prepare({1, 0.1f, absl::Now()}).ok());
  // Asked, in doubt (a peer is silent): still prepared, asked again.
  ASSERT_TRUE(Eventually([&] { return asked() >= 2; }));
  EXPECT_EQ(steps->steps().prepared, 1u);
  EXPECT_EQ(steps->last_committed(), 0u);
  // The silent peer turns out to have committed it.
  Answer({Answered(0, 1), Answered(1)});
  // The commit is whole once the weights are swapped in and it is reported
  // (last_committed moves first).
  ASSERT_TRUE(Eventually([&] {
    absl::MutexLock lock(&resolved_mu);
    return !resolved.empty();
  }));
  EXPECT_EQ(steps->last_committed(), 1u);
  EXPECT_EQ(steps->steps().prepared, 0u);
  EXPECT_EQ(*store_->Step(ExpertKey(0, 0)), 1u);
  absl::MutexLock lock(&resolved_mu);
  EXPECT_EQ(resolved, std::vector<uint64_t>({1}));
}

// The server checks the learning rate itself too (a PrepareStep may come
// from any router, or a tool): nothing is prepared on a bad one.
TEST_F(StepExecutorTest, ABadLearningRateIsRefusedAndNothingIsPrepared) {
  std::unique_ptr<StepExecutor> steps = Executor({});
  for (float bad :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), -1.0f}) {
    const absl::Status refused = steps->Prepare({1, bad, absl::Now()}).status();
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(refused.message(), HasSubstr("must be finite and >= 0")) << bad;
    EXPECT_EQ(steps->steps().prepared, 0u);
  }
  EXPECT_TRUE(steps->Prepare({1, 0.1f, absl::Now() + absl::Seconds(5)}).ok());
  EXPECT_EQ(steps->steps().prepared, 1u);
}

TEST_F(StepExecutorTest, APreparedStepNoPeerCommittedIsAborted) {
  StepExecutor::Options options;
  options.prepared_timeout = absl::Milliseconds(20);
  options.ask_peers = [this] { return Ask(); };
  Answer({Answered(0, 1), Answered(0)});
  std::unique_ptr<StepExecutor> steps = Executor(std::move(options));
  ASSERT_TRUE(steps->Prepare({1, 0.1f, absl::Now()}).ok());
  ASSERT_TRUE(Eventually([&] { return steps->steps().aborted == 1; }));
  EXPECT_EQ(steps->last_committed(), 0u);
  EXPECT_EQ(steps->steps().prepared, 0u);
  // Step 1 stays aborted here.
  EXPECT_THAT(steps->Prepare({1, 0.1f, absl::Now()}).status().message(),
              HasSubstr("has already aborted step 1"));
}

TEST_F(StepExecutorTest, TheNextStepSaysWhetherThePreparedOneWasCommitted) {
  uint64_t behind_at = 0;
  StepExecutor::Options options;
  options.on_behind = [&](uint64_t committed) { behind_at = committed; };
  std::unique_ptr<StepExecutor> steps = Executor(std::move(options));
  const absl::Time later = absl::Now() + absl::Seconds(5);
  ASSERT_TRUE(steps->Prepare({1, 0.1f, later, 0, "router-a"}).ok());
  // Another router's abort of step 1 is not this step's.
  steps->Abort(1, "not mine", "router-b");
  EXPECT_EQ(steps->steps().prepared, 1u);
  // Step 2 says step 1 was committed: committed here first.
  ASSERT_TRUE(steps->Prepare({2, 0.1f, later, 1, "router-b"}).ok());
  EXPECT_EQ(steps->last_committed(), 1u);
  EXPECT_EQ(steps->steps().prepared, 2u);
  // Step 3 says only step 1 was: step 2 was aborted.
  ASSERT_TRUE(steps->Prepare({3, 0.1f, later, 1, "router-b"}).ok());
  EXPECT_EQ(steps->last_committed(), 1u);
  EXPECT_EQ(steps->steps().aborted, 2u);
  steps->Abort(3, "done", "router-b");
  EXPECT_EQ(steps->steps().prepared, 0u);
  // The cluster committed step 5, this server step 1: behind, it syncs
  // before any step runs here.
  const absl::Status behind = steps->Prepare({6, 0.1f, later, 5, "router-b"}).status();
  EXPECT_EQ(behind.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(behind.message(),
              HasSubstr("has committed step 1 but the cluster has committed step 5"));
  EXPECT_EQ(behind_at, 5u);
  EXPECT_EQ(steps->last_committed(), 1u);
  // A commit of a step it did not prepare (it sat the step out): the
  // cluster moved on, and this server syncs.
  const absl::Status unprepared = steps->Commit(7).status();
  EXPECT_EQ(unprepared.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(unprepared.message(), HasSubstr("no step prepared"));
  EXPECT_THAT(unprepared.message(), HasSubstr("it syncs from its peers"));
  EXPECT_EQ(behind_at, 7u);
  // A commit of a step it has already (a retry) is no news.
  behind_at = 0;
  EXPECT_FALSE(steps->Commit(1).ok());
  EXPECT_EQ(behind_at, 0u);
}

// LeaveOut only chooses links; nothing is sent here.
class UnusedLink : public allreduce::RingLink {
 public:
  void Send(const allreduce::RingHeader&, absl::Span<const float>, AckDone done) override {
    std::move(done)(absl::InternalError("not for sending"));
  }
};

// A ring of servers a, b, c, d seen from b.
StepRing RingSeenFromB() {
  static UnusedLink link;
  allreduce::RingLink* const kLink = &link;
  StepRing ring{7, {ExpertKey(0, 0)}, 1, 4, "server a", "server c", kLink};
  for (const char* name : {"a", "b", "c", "d"}) {
    ring.members.push_back(
        {name, absl::StrCat("server ", name), std::string(name) == "b" ? nullptr : kLink});
  }
  return ring;
}

TEST(LeaveOutTest, TheRingClosesOverTheOthers) {
  const StepRing full = RingSeenFromB();
  absl::StatusOr<StepRing> ring = LeaveOut(full, {});
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(ring->size, 4);
  ring = LeaveOut(full, {"c"});
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->rank, 1);
  EXPECT_EQ(ring->size, 3);
  EXPECT_EQ(ring->predecessor, "server a");
  EXPECT_EQ(ring->successor, "server d");
  EXPECT_EQ(ring->group_id, 7u);
  ring = LeaveOut(full, {"a", "c"});
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(ring->rank, 0);
  EXPECT_EQ(ring->size, 2);
  EXPECT_EQ(ring->predecessor, "server d");
  EXPECT_EQ(ring->successor, "server d");
  ring = LeaveOut(full, {"a", "c", "d", "nobody"});
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(ring->size, 1);
  // Never itself, and never a ring that does not list its members.
  EXPECT_THAT(LeaveOut(full, {"b"}).status().message(),
              HasSubstr("server b is left out of the step it was asked to run"));
  StepRing bare = full;
  bare.members.clear();
  EXPECT_EQ(LeaveOut(bare, {"c"}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moe::expert
