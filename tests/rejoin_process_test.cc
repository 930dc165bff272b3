// Rejoin by sync on a real cluster: train, SIGKILL an expert server, start
// it again with the same flags. Before it listens it pulls the committed
// weights (and momentum) of every expert a live replica holds; the cluster
// then equals the reference at the committed step, and training goes on
// equal to the reference. An expert with no replica to sync from is never
// served stale: calls for it fail naming it and both steps, and Step
// refuses to stamp a new step on its old weights; with a checkpoint of the
// latest step, a restarted server (and router) resume from it, and with an
// older one the experts left behind are named.
#include <map>

#include "absl/strings/str_cat.h"
#include "common/deterministic_init.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr int kDModel = 32;
constexpr int kTokens = 64;
constexpr float kLearningRate = 0.01f;

ProcessClusterOptions Cluster(const std::string& strategy) {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 64 num_experts: 4 top_k: 2 seed: 13 optimizer { "
                               "type: OPTIMIZER_TYPE_SGD_MOMENTUM momentum: 0.9 }");
  options.strategy = strategy;
  options.num_servers = 2;
  return options;
}

// One training step on the cluster and on the reference; the forward must
// agree. Step is retried while a restarted peer's ring link backs off (a
// failed step aborts everywhere and restores every accumulator).
void TrainStep(ProcessCluster& cluster, ReferenceTraining& reference, int seed) {
  const FloatTensor x = RandomTensor({kTokens, kDModel}, seed);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, seed + 1);
  const ReferenceTraining::Step expected = reference.Train(x, dy, kLearningRate);
  v1::ForwardResponse y;
  const grpc::Status forward = cluster.Forward(x, &y, /*training=*/true);
  ASSERT_TRUE(forward.ok()) << forward.error_message();
  ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5)) << "seed " << seed;
  v1::BackwardResponse dx;
  ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
  v1::StepResponse stepped;
  grpc::Status status;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    status = cluster.Step(kLearningRate, absl::Seconds(10), &stepped);
  } while (!status.ok() && absl::Now() < deadline);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
}

// A Forward once the router's stream to a restarted server is back (after
// its back-off, UNAVAILABLE means "no live replica" still).
grpc::Status ForwardOnceReconnected(ProcessCluster& cluster, const FloatTensor& x,
                                    v1::ForwardResponse* y) {
  grpc::Status status;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    status = cluster.Forward(x, y);
  } while (status.error_code() == grpc::StatusCode::UNAVAILABLE && absl::Now() < deadline);
  return status;
}

// expert id -> (step, digest) as server `s` reports them.
std::map<int, std::pair<uint64_t, uint64_t>> Experts(ProcessCluster& cluster, int s) {
  v1::InfoResponse info;
  EXPECT_TRUE(cluster.Info(s, &info).ok());
  std::map<int, std::pair<uint64_t, uint64_t>> experts;
  for (const v1::ExpertDigest& d : info.experts()) {
    experts[d.expert_id()] = {d.step(), d.weights_digest()};
  }
  return experts;
}

TEST(RejoinTest, ARestartedDataParallelReplicaSyncsAndTrainingGoesOn) {
  ProcessCluster cluster(Cluster("DATA_PARALLEL"));
  ReferenceTraining reference(cluster.config().model, InitAllWeights(cluster.config().model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }

  cluster.KillServer(1);
  cluster.StartServer(1);
  EXPECT_THAT(cluster.ServerLog(1),
              HasSubstr("1 of 1 peer(s) answered; cluster at step 2; synced 4 expert(s)"));
  v1::InfoResponse info;
  ASSERT_TRUE(cluster.Info(1, &info).ok());
  EXPECT_EQ(info.step(), 2u);
  // Every expert at step 2, bit-identical to the live replica.
  EXPECT_EQ(Experts(cluster, 1), Experts(cluster, 0));
  for (const auto& [expert, version] : Experts(cluster, 1)) {
    EXPECT_EQ(version.first, 2u) << "expert " << expert;
  }

  // Inference equals the reference at step 2, whichever replica serves.
  for (int i = 0; i < 6; ++i) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 500 + i);
    v1::ForwardResponse y;
    const grpc::Status status = cluster.Forward(x, &y);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Layer().Forward(x)->y, 1e-5));
  }
  // The next 5 steps go on equal to the reference (momentum included: it
  // was synced with the weights), replicas identical.
  for (int step = 3; step <= 7; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }
  EXPECT_EQ(Experts(cluster, 1), Experts(cluster, 0));
}

TEST(RejoinTest, AnExpertWithNoReplicaToSyncFromIsNamedNeverServedStale) {
  // HYBRID on 2 servers, 4 experts: 0 and 1 on both, 2 on e0, 3 on e1.
  ProcessCluster cluster(Cluster("HYBRID"));
  ReferenceTraining reference(cluster.config().model, InitAllWeights(cluster.config().model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }
  cluster.KillServer(1);
  cluster.StartServer(1);
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr("synced 2 expert(s) [0,1]"));
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr("behind: [3]"));
  std::map<int, std::pair<uint64_t, uint64_t>> experts = Experts(cluster, 1);
  EXPECT_EQ(experts[0].first, 2u);
  EXPECT_EQ(experts[1].first, 2u);
  EXPECT_EQ(experts[3].first, 0u);

  // Tokens routed to expert 3 cannot be served at step 2: the call fails
  // naming it, rather than mixing in its initial weights.
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 77);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  bool uses_expert_3 = false;
  for (int e : expected.routing.expert_ids) uses_expert_3 |= e == 3;
  ASSERT_TRUE(uses_expert_3);
  v1::ForwardResponse y;
  const grpc::Status status = ForwardOnceReconnected(cluster, x, &y);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("expert 3"));
  EXPECT_THAT(status.error_message(), HasSubstr("expert 3 here has the weights of step 0"));

  // Step refuses to label expert 3's old weights with step 3.
  v1::StepResponse stepped;
  const grpc::Status step = cluster.Step(kLearningRate, absl::Seconds(10), &stepped);
  EXPECT_FALSE(step.ok());
  EXPECT_THAT(step.error_message(),
              HasSubstr("holds expert 3 at step 0, not the committed step 2"));
  EXPECT_EQ(Experts(cluster, 1)[3].first, 0u);
}

// Servers and a router that save a checkpoint after every N-th step.
ProcessClusterOptions CheckpointingCluster(const std::string& strategy, const std::string& dir,
                                           int every_steps) {
  ProcessClusterOptions options = Cluster(strategy);
  options.server_flags = {"--checkpoint_dir=" + dir};
  options.router_flags = {"--checkpoint_dir=" + dir,
                          absl::StrCat("--checkpoint_every_steps=", every_steps)};
  return options;
}

// SIGKILLs server 1 and starts it again with the same flags: it loads
// `dir`/step-`step` (the latest complete checkpoint there) and holds every
// expert at that step.
void RestartServerFromCheckpoint(ProcessCluster& cluster, const std::string& dir, uint64_t step) {
  cluster.KillServer(1);
  cluster.StartServer(1);
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr(absl::StrCat(dir, "/step-", step, ", step ", step)));
  for (const auto& [expert, version] : Experts(cluster, 1)) {
    EXPECT_EQ(version.first, step) << "expert " << expert;
  }
}

// MODEL_PARALLEL: no replica to sync from, but a checkpoint after every
// step (--checkpoint_every_steps=1): a restarted server, and a restarted
// router, resume from the latest one, and the cluster equals the reference.
TEST(RejoinTest, ModelParallelServerAndRouterResumeFromTheLatestCheckpoint) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/rejoin_checkpoints");
  ProcessClusterOptions options = CheckpointingCluster("MODEL_PARALLEL", dir, 1);
  // Plain SGD (the HYBRID case below resumes momentum from a checkpoint).
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 64 num_experts: 4 top_k: 2 seed: 13 optimizer { "
                               "type: OPTIMIZER_TYPE_SGD }");
  ProcessCluster cluster(options);
  ReferenceTraining reference(cluster.config().model, InitAllWeights(cluster.config().model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }
  EXPECT_TRUE(cluster.WaitForServerLine(1, "of step 2 to", absl::Seconds(10)));

  cluster.KillServer(1);
  cluster.KillRouter();
  cluster.StartServer(1);
  cluster.StartRouter();
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr(dir + "/step-2, step 2"));
  EXPECT_THAT(cluster.RouterLog(), HasSubstr("gate from " + dir + "/step-2 at step 2"));
  for (const auto& [expert, version] : Experts(cluster, 1)) {
    EXPECT_EQ(version.first, 2u) << "expert " << expert;
  }
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 91);
  v1::ForwardResponse y;
  const grpc::Status status = ForwardOnceReconnected(cluster, x, &y);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Layer().Forward(x)->y, 1e-5));
  ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 30));
}

// HYBRID with a checkpoint of the latest step: the restarted server's
// unreplicated expert comes back from it (its replicated ones too), the
// cluster equals the reference, and the next 5 steps do.
TEST(RejoinTest, ARestartedHybridServerResumesFromTheLatestCheckpointAndTrainsOn) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/hybrid_checkpoints");
  ProcessCluster cluster(CheckpointingCluster("HYBRID", dir, 1));
  ReferenceTraining reference(cluster.config().model, InitAllWeights(cluster.config().model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }
  EXPECT_TRUE(cluster.WaitForServerLine(1, "of step 2 to", absl::Seconds(10)));

  RestartServerFromCheckpoint(cluster, dir, 2);
  for (int i = 0; i < 4; ++i) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 600 + i);
    v1::ForwardResponse y;
    const grpc::Status status = ForwardOnceReconnected(cluster, x, &y);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Layer().Forward(x)->y, 1e-5));
  }
  for (int step = 3; step <= 7; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }
  // The replicated experts stay bit-identical across the two servers.
  std::map<int, std::pair<uint64_t, uint64_t>> e0 = Experts(cluster, 0), e1 = Experts(cluster, 1);
  EXPECT_EQ(e0[0], e1[0]);
  EXPECT_EQ(e0[1], e1[1]);
}

// MODEL_PARALLEL without a checkpoint of the latest step (one every 2
// steps, the cluster at step 3): the restarted server loads step 2, has no
// replica to bring its experts to step 3, and names them; nothing is served
// or trained on step 2's weights.
TEST(RejoinTest, WithoutACheckpointOfTheLatestStepTheExpertsLeftBehindAreNamed) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/older_checkpoints");
  ProcessCluster cluster(CheckpointingCluster("MODEL_PARALLEL", dir, 2));
  ReferenceTraining reference(cluster.config().model, InitAllWeights(cluster.config().model));
  for (int step = 1; step <= 3; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }

  RestartServerFromCheckpoint(cluster, dir, 2);
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr("behind: [2,3]"));
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 88);
  v1::ForwardResponse y;
  const grpc::Status status = ForwardOnceReconnected(cluster, x, &y);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("here has the weights of step 2"));
  v1::StepResponse stepped;
  const grpc::Status step = cluster.Step(kLearningRate, absl::Seconds(10), &stepped);
  EXPECT_FALSE(step.ok());
  EXPECT_THAT(step.error_message(), HasSubstr("at step 2, not the committed step 3"));
}

}  // namespace
}  // namespace moe::testing
