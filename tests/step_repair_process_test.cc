// Atomic steps with repair, across real processes. A step is decided once
// every server has prepared it; a server that then misses its commit (the
// router died between two CommitSteps, or the server died before its
// commit) ends at the committed step: the one still prepared commits on its
// peers' word, the one that died syncs from a committed replica when it
// comes back. Either way no gradient is applied twice: after the repair the
// cluster equals the reference, and the next 5 steps do too. The test plays
// the router for the step it breaks (PrepareStep everywhere, CommitStep to
// one server).
#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/deterministic_init.h"
#include "common/tensor_codec.h"
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
constexpr float kLr = 0.05f;

ProcessClusterOptions TwoReplicas() {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel, " d_ff: 64 num_experts: 4 top_k: 2 seed: 9");
  options.strategy = "DATA_PARALLEL";
  options.num_servers = 2;
  // A prepared step that hears nothing asks its peers 1 s after its
  // deadline.
  options.server_flags = {"--step_prepared_timeout=1s"};
  return options;
}

// Step 1's Forward and Backward through the router, and the same step in
// the reference.
void TrainStepOne(ProcessCluster& cluster, ReferenceTraining& reference) {
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 11);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, 12);
  reference.Train(x, dy, kLr);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
  v1::BackwardResponse dx;
  ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
}

// PrepareStep(1) on every server at once (each blocks for the all-reduce).
void PrepareStepOne(ProcessCluster& cluster) {
  const int n = static_cast<int>(cluster.config().cluster.servers.size());
  std::vector<grpc::Status> statuses(n);
  std::vector<std::thread> threads;
  for (int s = 0; s < n; ++s) {
    threads.emplace_back([&, s] {
      v1::PrepareStepRequest request;
      request.set_step(1);
      request.set_learning_rate(kLr);
      request.set_deadline_unix_micros(absl::ToUnixMicros(absl::Now() + absl::Seconds(3)));
      request.set_committed_step(0);
      request.set_coordinator("test-router");
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
      v1::PrepareStepResponse response;
      statuses[s] = cluster.server_stub(s).PrepareStep(&context, request, &response);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int s = 0; s < n; ++s) {
    ASSERT_TRUE(statuses[s].ok()) << "e" << s << ": " << statuses[s].error_message();
  }
}

// CommitStep(1) on server `s` only, with the reference's gate of step 1.
void CommitStepOneOn(ProcessCluster& cluster, int s, const ReferenceTraining& reference) {
  v1::CommitStepRequest request;
  request.set_step(1);
  const FloatTensor& gate = *reference.weights().gate;
  EncodeFloats(gate.values(), gate.shape(), DType::kFloat32, request.mutable_gate());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  v1::CommitStepResponse response;
  const grpc::Status status = cluster.server_stub(s).CommitStep(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
}

// AbortStep(1) on server `s` only, as a router that gave up on it would.
void AbortStepOneOn(ProcessCluster& cluster, int s) {
  v1::AbortStepRequest request;
  request.set_step(1);
  request.set_coordinator("test-router");
  grpc::ClientContext context;
  v1::AbortStepResponse response;
  const grpc::Status status = cluster.server_stub(s).AbortStep(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
}

// The step of the gate server `s` keeps (GetGate), 0 when it has none.
uint64_t GateStepOn(ProcessCluster& cluster, int s) {
  grpc::ClientContext context;
  v1::GetGateResponse gate;
  return cluster.server_stub(s).GetGate(&context, v1::GetGateRequest(), &gate).ok() ? gate.step()
                                                                                     : 0;
}

// Every server at `step`, replicas bit-identical.
void ExpectConverged(ProcessCluster& cluster, uint64_t step) {
  std::map<int, uint64_t> digests;
  for (int s = 0; s < static_cast<int>(cluster.config().cluster.servers.size()); ++s) {
    v1::InfoResponse info;
    ASSERT_TRUE(cluster.Info(s, &info).ok());
    EXPECT_EQ(info.step(), step) << "e" << s << "\n" << cluster.ServerLog(s);
    EXPECT_EQ(info.prepared_step(), 0u) << "e" << s;
    for (const v1::ExpertDigest& d : info.experts()) {
      EXPECT_EQ(d.step(), step);
      auto [it, first] = digests.emplace(d.expert_id(), d.weights_digest());
      EXPECT_EQ(it->second, d.weights_digest()) << "replicas of expert " << d.expert_id();
    }
  }
}

// The cluster serves the reference's layer, then 5 more steps through the
// router (from `first`) equal the reference's.
void ExpectReferenceFromHereOn(ProcessCluster& cluster, ReferenceTraining& reference,
                               int first = 2) {
  for (int step = first; step < first + 5; ++step) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 100 + step);
    const FloatTensor dy = RandomTensor({kTokens, kDModel}, 200 + step);
    const ReferenceTraining::Step expected = reference.Train(x, dy, kLr);
    v1::ForwardResponse y;
    grpc::Status status = cluster.Forward(x, &y, /*training=*/true);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5)) << "step " << step;
    v1::BackwardResponse dx;
    ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
    v1::StepResponse stepped;
    status = cluster.Step(kLr, absl::Seconds(30), &stepped);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    EXPECT_EQ(stepped.step(), static_cast<uint64_t>(step));
    EXPECT_EQ(stepped.servers_behind_size(), 0);
    ExpectConverged(cluster, step);
  }
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 999);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y).ok());
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
}

TEST(StepRepairTest, ARouterThatDiesBetweenTwoCommitsLeavesTheOtherServerToCommitOnItsPeersWord) {
  ProcessCluster cluster(TwoReplicas());
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  TrainStepOne(cluster, reference);
  cluster.KillRouter();
  PrepareStepOne(cluster);
  CommitStepOneOn(cluster, 0, reference);
  // e1 hears nothing more; after its timeout it asks e0, which committed.
  ASSERT_TRUE(
      cluster.WaitForServerLine(1, "committed here without its router's word", absl::Seconds(30)))
      << cluster.ServerLog(1);
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr("has committed step 1"));
  ExpectConverged(cluster, 1);
  // e1 committed without its CommitStep, and takes the step's gate from e0
  // (on its catch-up thread, after the commit).
  ASSERT_TRUE(
      cluster.WaitForServerLine(1, "the gate of step 1 from server e0", absl::Seconds(30)))
      << cluster.ServerLog(1);
  EXPECT_EQ(GateStepOn(cluster, 1), 1u) << cluster.ServerLog(1);
  // A router started now serves step 1's gate and trains on.
  cluster.StartRouter();
  ExpectReferenceFromHereOn(cluster, reference);
}

TEST(StepRepairTest, AServerKilledBetweenItsPrepareAndCommitSyncsWhenItComesBack) {
  ProcessCluster cluster(TwoReplicas());
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  TrainStepOne(cluster, reference);
  PrepareStepOne(cluster);
  cluster.KillServer(1);
  CommitStepOneOn(cluster, 0, reference);
  cluster.StartServer(1);
  EXPECT_THAT(cluster.ServerLog(1), HasSubstr("cluster at step 1; synced 4 expert(s)"));
  ExpectConverged(cluster, 1);
  // The router learns step 1's gate from e0 and trains on.
  ExpectReferenceFromHereOn(cluster, reference);
  EXPECT_THAT(cluster.RouterLog(), HasSubstr("learnt the gate of step 1 from the servers"));
}

// A replica behind the committed step sits the next step out: that step
// runs over the other replicas' ring, then its commit tells the replica,
// which syncs to it (weights and gate) and trains on with the others. The
// test leaves e2 behind (step 1 committed on e0 and e1, aborted on e2) and
// starts the router anew, as the router that ran step 1 holds its gate.
TEST(StepRepairTest, AReplicaBehindSitsTheNextStepOutAndSyncsToIt) {
  ProcessClusterOptions options = TwoReplicas();
  options.num_servers = 3;
  ProcessCluster cluster(options);
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  TrainStepOne(cluster, reference);
  PrepareStepOne(cluster);
  CommitStepOneOn(cluster, 0, reference);
  CommitStepOneOn(cluster, 1, reference);
  AbortStepOneOn(cluster, 2);
  cluster.KillRouter();
  cluster.StartRouter();

  const FloatTensor x = RandomTensor({kTokens, kDModel}, 102);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, 202);
  const ReferenceTraining::Step expected = reference.Train(x, dy, kLr);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
  ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5));
  v1::BackwardResponse dx;
  ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
  v1::StepResponse stepped;
  const grpc::Status status = cluster.Step(kLr, absl::Seconds(30), &stepped);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(stepped.step(), 2u);
  EXPECT_THAT(stepped.servers_left_out(), ::testing::ElementsAre("e2"));
  EXPECT_EQ(stepped.servers_behind_size(), 0);
  ASSERT_TRUE(cluster.WaitForServerLine(2, "rolled forward to step 2", absl::Seconds(30)))
      << cluster.ServerLog(2);
  ExpectConverged(cluster, 2);
  // Its sync took the step's gate too, before it said so.
  EXPECT_THAT(cluster.ServerLog(2), HasSubstr("the gate of step 2 from server e0"));
  EXPECT_EQ(GateStepOn(cluster, 2), 2u) << cluster.ServerLog(2);
  ExpectReferenceFromHereOn(cluster, reference, 3);
}

// Two routers: Backwards through both, then a Step through each at once.
// One wins (the step lease); the other is refused naming it, or, when it
// comes second, steps with nothing left to apply. Either way the step
// applied both routers' gradients once: both routers serve the reference
// trained on both batches as one, and a step through the other router
// goes on from there.
TEST(StepRepairTest, TwoRoutersStepAtOnceAndEveryGradientIsAppliedOnce) {
  ProcessCluster cluster(TwoReplicas());
  ProcessCluster::OtherRouter other = cluster.StartAnotherRouter();
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  auto call = [](v1::Router::Stub& stub, auto method, const auto& request, auto* response) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    return (stub.*method)(&context, request, response);
  };
  auto train = [&](v1::Router::Stub& stub, const FloatTensor& x, const FloatTensor& dy) {
    v1::ForwardRequest forward;
    forward.set_training(true);
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, forward.mutable_x());
    v1::ForwardResponse y;
    ASSERT_TRUE(call(stub, &v1::Router::Stub::Forward, forward, &y).ok());
    v1::BackwardRequest backward;
    backward.set_request_id(y.request_id());
    EncodeFloats(dy.values(), dy.shape(), DType::kFloat32, backward.mutable_grad_output());
    v1::BackwardResponse dx;
    const grpc::Status status = call(stub, &v1::Router::Stub::Backward, backward, &dx);
    ASSERT_TRUE(status.ok()) << status.error_message();
  };
  const FloatTensor x0 = RandomTensor({kTokens, kDModel}, 31),
                    dy0 = RandomTensor({kTokens, kDModel}, 32);
  const FloatTensor x1 = RandomTensor({kTokens, kDModel}, 33),
                    dy1 = RandomTensor({kTokens, kDModel}, 34);
  train(cluster.stub(), x0, dy0);
  train(*other.stub, x1, dy1);
  reference.Train(ConcatRows(x0, x1), ConcatRows(dy0, dy1), kLr);

  v1::StepRequest step;
  step.set_learning_rate(kLr);
  grpc::Status statuses[2];
  v1::StepResponse stepped[2];
  {
    std::thread first(
        [&] { statuses[0] = call(cluster.stub(), &v1::Router::Stub::Step, step, &stepped[0]); });
    std::thread second(
        [&] { statuses[1] = call(*other.stub, &v1::Router::Stub::Step, step, &stepped[1]); });
    first.join();
    second.join();
  }
  int won = 0;
  for (int r = 0; r < 2; ++r) {
    if (statuses[r].ok()) {
      ++won;
      continue;
    }
    EXPECT_EQ(statuses[r].error_code(), grpc::StatusCode::ABORTED) << statuses[r].error_message();
    EXPECT_THAT(statuses[r].error_message(), HasSubstr("is running a step"));
  }
  ASSERT_GE(won, 1) << statuses[0].error_message() << "; " << statuses[1].error_message();
  // Plain SGD: a second step with nothing to apply changes nothing.
  const uint64_t last = std::max(stepped[0].step(), stepped[1].step());
  ExpectConverged(cluster, last);

  const FloatTensor fresh = RandomTensor({kTokens, kDModel}, 35);
  const ReferenceForward expected = *reference.Layer().Forward(fresh);
  for (v1::Router::Stub* stub : {&cluster.stub(), other.stub.get()}) {
    v1::ForwardRequest forward;
    EncodeFloats(fresh.values(), fresh.shape(), DType::kFloat32, forward.mutable_x());
    v1::ForwardResponse y;
    const grpc::Status status = call(*stub, &v1::Router::Stub::Forward, forward, &y);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
  }
  // The other router steps on from the committed gate.
  const FloatTensor x2 = RandomTensor({kTokens, kDModel}, 36),
                    dy2 = RandomTensor({kTokens, kDModel}, 37);
  reference.Train(x2, dy2, kLr);
  train(*other.stub, x2, dy2);
  v1::StepResponse next;
  const grpc::Status status = call(*other.stub, &v1::Router::Stub::Step, step, &next);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << other.process->output();
  EXPECT_EQ(next.step(), last + 1);
  ExpectConverged(cluster, last + 1);
  const ReferenceForward after = *reference.Layer().Forward(fresh);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(fresh, &y).ok());
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), after.y, 1e-5));
}

}  // namespace
}  // namespace moe::testing
