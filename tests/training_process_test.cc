// Training on a real cluster: Forward(training) / Backward / Step, 20 times,
// against the same 20 steps of the in-process reference with the shared
// optimizer; replicas' digests equal after every step. Then faults: a server
// killed or stopped during the step's all-reduce makes Step fail within its
// deadline naming it, leaves every surviving server's weights as they were,
// and the next Step after it is back succeeds. A ring segment of a step that
// is over is rejected.
#include <csignal>
#include <map>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/deterministic_init.h"
#include "common/placement.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "common/transport_credentials.h"
#include "expert_service/weight_transfer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/collective.grpc.pb.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr int kDModel = 32;
constexpr int kTokens = 64;

// expert id -> digest, checking that every replica reports the same one.
std::map<int, uint64_t> ReplicaDigests(ProcessCluster& cluster, const std::vector<int>& servers) {
  std::map<int, uint64_t> digests;
  for (int s : servers) {
    v1::InfoResponse info;
    grpc::Status status = cluster.Info(s, &info);
    EXPECT_TRUE(status.ok()) << "e" << s << ": " << status.error_message();
    for (const v1::ExpertDigest& d : info.experts()) {
      auto [it, first] = digests.emplace(d.expert_id(), d.weights_digest());
      EXPECT_EQ(it->second, d.weights_digest())
          << "replicas of expert " << d.expert_id() << " differ (server e" << s << ")";
    }
  }
  return digests;
}

std::vector<int> AllServers(const ProcessCluster& cluster) {
  std::vector<int> servers(cluster.config().cluster.servers.size());
  for (size_t s = 0; s < servers.size(); ++s) servers[s] = static_cast<int>(s);
  return servers;
}

ExpertWeights FetchExpert(ProcessCluster& cluster, int server, int expert) {
  v1::GetExpertWeightsRequest request;
  request.set_expert_id(expert);
  grpc::ClientContext context;
  auto reader = cluster.server_stub(server).GetExpertWeights(&context, request);
  expert::ExpertAssembler assembler(cluster.config().model);
  v1::ExpertWeightsChunk chunk;
  while (reader->Read(&chunk)) MOE_CHECK(assembler.Add(chunk).ok());
  MOE_CHECK(reader->Finish().ok());
  return assembler.Finish()->weights;
}

struct TrainingCase {
  std::string strategy;
  std::string optimizer;
  // Small enough that 20 steps stay tame: the loss (y . dy, dy random) has
  // no minimum, and a run-away layer amplifies the last bits of summation
  // order (momentum 0.9 at 0.05 runs away after ~12 steps, in the reference
  // as much as in the cluster).
  float learning_rate;
  // More ModelConfig fields (text format).
  std::string model_extra = "";
};

class TrainingTest : public ::testing::TestWithParam<TrainingCase> {};

TEST_P(TrainingTest, TwentyStepsEqualTheReferenceAndReplicasStayIdentical) {
  ProcessClusterOptions options;
  options.model =
      absl::StrCat("d_model: ", kDModel, " d_ff: 64 num_experts: 6 top_k: 2 seed: 9 optimizer { ",
                   GetParam().optimizer, " } ", GetParam().model_extra);
  options.strategy = GetParam().strategy;
  options.num_servers = 3;
  ProcessCluster cluster(options);
  const ModelConfig& model = cluster.config().model;
  const float lr = GetParam().learning_rate;

  ReferenceTraining reference(model, InitAllWeights(model));

  for (int step = 1; step <= 20; ++step) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 100 + step);
    const FloatTensor dy = RandomTensor({kTokens, kDModel}, 200 + step);
    const ReferenceTraining::Step expected = reference.Train(x, dy, lr);
    // The cluster's.
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
    ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5))
        << "step " << step;
    v1::BackwardResponse dx;
    ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
    v1::StepResponse stepped;
    const grpc::Status status = cluster.Step(lr, absl::Seconds(30), &stepped);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    EXPECT_EQ(stepped.step(), static_cast<uint64_t>(step));
    ReplicaDigests(cluster, AllServers(cluster));
  }

  // The experts' weights, from every server that holds them.
  const Placement placement = *ComputePlacement(model, cluster.config().cluster);
  for (int e = 0; e < model.num_experts; ++e) {
    for (int s : placement.ServersOf(ExpertKey(0, e))) {
      const ExpertWeights served = FetchExpert(cluster, s, e);
      for (ExpertTensor which : kAllExpertTensors) {
        EXPECT_TRUE(TensorNear(served.tensor(which),
                               reference.weights().experts.at(e).tensor(which), 1e-5))
            << "expert " << e << " on e" << s << ", tensor " << static_cast<int>(which);
      }
    }
  }
  // The gate, through what it does: routing and output on fresh tokens.
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 999);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y).ok());
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
  ASSERT_EQ(y.routing().expert_ids_size(), static_cast<int>(expected.routing.expert_ids.size()));
  for (int i = 0; i < y.routing().expert_ids_size(); ++i) {
    EXPECT_EQ(y.routing().expert_ids(i), expected.routing.expert_ids[i]) << "pair " << i;
  }
}

// One gate for every router: a router that did not run the step, or that
// started (or restarted) after it, serves the gate of the latest committed
// step, which the servers keep.
TEST(TrainingRoutersTest, EveryRouterServesTheGateOfTheLatestStep) {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel, " d_ff: 64 num_experts: 6 top_k: 2 seed: 9");
  options.strategy = "HYBRID";
  ProcessCluster cluster(options);
  ProcessCluster::OtherRouter other = cluster.StartAnotherRouter();
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  for (int step = 1; step <= 2; ++step) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 300 + step);
    const FloatTensor dy = RandomTensor({kTokens, kDModel}, 400 + step);
    reference.Train(x, dy, 0.05f);
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
    v1::BackwardResponse dx;
    ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
    v1::StepResponse stepped;
    ASSERT_TRUE(cluster.Step(0.05f, absl::Seconds(30), &stepped).ok());
  }
  auto forward = [&](v1::Router::Stub& stub, const FloatTensor& x, v1::ForwardResponse* y) {
    v1::ForwardRequest request;
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub.Forward(&context, request, y);
  };
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 999);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  // The other router, which ran no step.
  v1::ForwardResponse y;
  grpc::Status status = forward(*other.stub, x, &y);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << other.process->output();
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
  v1::ClusterState state;
  grpc::ClientContext context;
  ASSERT_TRUE(other.stub->GetClusterState(&context, {}, &state).ok());
  EXPECT_EQ(state.step(), 2u);
  // The stepping router restarted: it takes the servers' gate, not the
  // initial one its config would load.
  cluster.KillRouter();
  cluster.StartRouter();
  EXPECT_THAT(cluster.RouterLog(), HasSubstr("learnt the gate of step 2 from the servers"));
  status = forward(cluster.stub(), x, &y);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, TrainingTest,
    ::testing::Values(
        TrainingCase{"HYBRID", "type: OPTIMIZER_TYPE_SGD_MOMENTUM momentum: 0.9", 0.01f},
        TrainingCase{"HYBRID", "type: OPTIMIZER_TYPE_SGD", 0.05f},
        TrainingCase{"DATA_PARALLEL", "type: OPTIMIZER_TYPE_SGD_MOMENTUM momentum: 0.9", 0.01f},
        TrainingCase{"DATA_PARALLEL", "type: OPTIMIZER_TYPE_SGD", 0.05f},
        TrainingCase{"HYBRID", "type: OPTIMIZER_TYPE_ADAMW max_grad_norm: 1.0", 0.01f},
        // Gated SiLU experts: W3, its gradient and AdamW's state for it
        // travel the same paths.
        TrainingCase{"HYBRID", "type: OPTIMIZER_TYPE_ADAMW", 0.01f,
                     "activation: EXPERT_ACTIVATION_SILU_GATED"}),
    [](const auto& info) {
      const std::string& optimizer = info.param.optimizer;
      return absl::StrCat(info.param.strategy, "_",
                          absl::StrContains(optimizer, "MOMENTUM")        ? "momentum"
                          : absl::StrContains(optimizer, "max_grad_norm") ? "adamw_clipped"
                          : absl::StrContains(optimizer, "ADAMW")         ? "adamw"
                                                                          : "sgd",
                          info.param.model_extra.empty() ? "" : "_silu_gated");
    });

// A cluster whose step all-reduces take a while (small ring segments, one in
// flight), so a fault can land in the middle of one.
ProcessClusterOptions SlowRingCluster() {
  ProcessClusterOptions options;
  options.model = "d_model: 64 d_ff: 256 num_experts: 4 top_k: 2 seed: 4";
  options.strategy = "DATA_PARALLEL";
  options.num_servers = 3;
  options.server_flags = {"--ring_segment_elements=256", "--ring_window_segments=1"};
  return options;
}

void Train(ProcessCluster& cluster, int seed) {
  const FloatTensor x = RandomTensor({kTokens, 64}, seed);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y, true).ok());
  v1::BackwardResponse dx;
  ASSERT_TRUE(cluster.Backward(y.request_id(), RandomTensor({kTokens, 64}, seed + 1), &dx).ok());
}

// Runs Step on another thread and, once server `victim` has begun its
// all-reduce, does `fault` to it. Returns the step's status.
grpc::Status StepWithFault(ProcessCluster& cluster, int victim, absl::Duration timeout,
                           const std::function<void()>& fault) {
  grpc::Status status;
  v1::StepResponse response;
  std::thread step([&] { status = cluster.Step(0.1f, timeout, &response); });
  EXPECT_TRUE(cluster.WaitForServerLine(victim, "all-reducing", absl::Seconds(30)))
      << cluster.ServerLog(victim);
  fault();
  step.join();
  return status;
}

// Retries Step until one succeeds (the back-offs of the links to a peer that
// came back run out) or `patience` passes.
::testing::AssertionResult StepsAgainWithin(ProcessCluster& cluster, absl::Duration patience) {
  grpc::Status status;
  v1::StepResponse response;
  const absl::Time deadline = absl::Now() + patience;
  do {
    status = cluster.Step(0.1f, absl::Seconds(10), &response);
  } while (!status.ok() && absl::Now() < deadline);
  if (status.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << status.error_message() << "\n--- e0\n" << cluster.ServerLog(0) << "\n--- e1\n"
         << cluster.ServerLog(1) << "\n--- e2\n" << cluster.ServerLog(2);
}

TEST(TrainingFaultTest, AKilledPeerFailsTheStepNamingItAndTheNextStepWorks) {
  ProcessCluster cluster(SlowRingCluster());
  Train(cluster, 1);
  const std::map<int, uint64_t> before = ReplicaDigests(cluster, {0, 2});
  const absl::Time start = absl::Now();
  const grpc::Status failed =
      StepWithFault(cluster, 1, absl::Seconds(10), [&] { cluster.KillServer(1); });
  EXPECT_FALSE(failed.ok());
  EXPECT_THAT(failed.error_message(), HasSubstr("e1")) << failed.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10 + 5));
  // Every surviving server's weights are as they were.
  EXPECT_EQ(ReplicaDigests(cluster, {0, 2}), before);

  cluster.StartServer(1);
  // The restarted server has the initial weights, like the others (no step
  // was committed); its ring links come back after a short back-off.
  ASSERT_TRUE(StepsAgainWithin(cluster, absl::Seconds(30)));
  const std::map<int, uint64_t> after = ReplicaDigests(cluster, {0, 1, 2});
  EXPECT_NE(after, before) << "the step changed nothing";
}

TEST(TrainingFaultTest, AStoppedPeerFailsTheStepWithinItsDeadlineAndRejoins) {
  ProcessCluster cluster(SlowRingCluster());
  Train(cluster, 3);
  const std::map<int, uint64_t> before = ReplicaDigests(cluster, {0, 1, 2});
  const absl::Time start = absl::Now();
  const grpc::Status failed =
      StepWithFault(cluster, 2, absl::Seconds(5), [&] { cluster.PauseServer(2); });
  const absl::Duration took = absl::Now() - start;
  EXPECT_FALSE(failed.ok());
  EXPECT_THAT(failed.error_message(), HasSubstr("e2")) << failed.error_message();
  EXPECT_LT(took, absl::Seconds(5 + 6)) << "the step outlived its deadline by far";
  EXPECT_EQ(ReplicaDigests(cluster, {0, 1}), before);

  cluster.ContinueServer(2);
  ASSERT_TRUE(StepsAgainWithin(cluster, absl::Seconds(60)));
  EXPECT_NE(ReplicaDigests(cluster, {0, 1, 2}), before);
}

TEST(TrainingFaultTest, ARingSegmentOfAFinishedStepIsRejected) {
  ProcessCluster cluster(SlowRingCluster());
  Train(cluster, 5);
  v1::StepResponse response;
  ASSERT_TRUE(cluster.Step(0.1f, absl::Seconds(30), &response).ok());
  const Placement placement =
      *ComputePlacement(cluster.config().model, cluster.config().cluster);
  const uint64_t group = ReplicaGroups(placement).at(0).id;

  auto channel = grpc::CreateChannel(cluster.config().cluster.servers[1].address,
                                     TransportCredentials::Plaintext().ForChannel());
  auto collective = v1::Collective::NewStub(channel);
  grpc::ClientContext context;
  auto stream = collective->Ring(&context);
  v1::RingChunk chunk;
  chunk.mutable_id()->set_step(response.step());
  chunk.mutable_id()->set_group_id(group);
  chunk.set_sender_rank(0);
  chunk.set_phase(v1::RING_PHASE_REDUCE_SCATTER);
  chunk.set_data(std::string(16, '\0'));
  ASSERT_TRUE(stream->Write(chunk));
  v1::RingAck ack;
  ASSERT_TRUE(stream->Read(&ack));
  ASSERT_TRUE(ack.has_error());
  EXPECT_EQ(ack.error().code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(ack.error().message(), HasSubstr("over")) << ack.error().message();
  // And the cluster trains on.
  Train(cluster, 7);
  ASSERT_TRUE(cluster.Step(0.1f, absl::Seconds(30), &response).ok());
}

}  // namespace
}  // namespace moe::testing
