// A real cluster on loopback: expert_server processes and a router process,
// started from one config. The router's answers must equal the in-process
// reference layer for every strategy, top_k and overflow policy, and survive
// or name a dead server.
#include <atomic>
#include <csignal>
#include <thread>
#include <fstream>
#include <map>
#include <tuple>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/deterministic_init.h"
#include "common/model_config.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/router.grpc.pb.h"
#include "deploy/local/child_process.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::HttpGet;
using ::moe::local::NumberAfter;
using ::moe::local::PickFreePort;
using ::moe::local::RunfilePath;

using ::testing::HasSubstr;

// The cluster of these tests: d_model 48, 8 experts.
class LocalCluster : public ProcessCluster {
 public:
  LocalCluster(const std::string& strategy, int top_k, bool drop, int num_servers = 2,
               std::vector<std::string> router_flags = {})
      : ProcessCluster(Options(strategy, top_k, drop, num_servers, std::move(router_flags))) {}

 private:
  static ProcessClusterOptions Options(const std::string& strategy, int top_k, bool drop,
                                       int num_servers, std::vector<std::string> router_flags) {
    ProcessClusterOptions options;
    options.router_flags = std::move(router_flags);
    options.model = absl::StrCat(
        "d_model: 48 d_ff: 96 num_experts: 8 top_k: ", top_k, " seed: 5",
        drop ? " overflow_policy: OVERFLOW_POLICY_DROP capacity_factor: 0.5" : "");
    options.strategy = strategy;
    options.num_servers = num_servers;
    if (strategy == "DYNAMIC") {
      options.cluster_extra = "  load_profile { expert_load: [8, 1, 1, 1, 2, 1, 1, 1] }\n";
    }
    return options;
  }
};

FloatTensor Decoded(const v1::Tensor& t) { return testing::Decoded(t, 48); }

using Case = std::tuple<std::string, int, bool>;
class ClusterMatrixTest : public ::testing::TestWithParam<Case> {};

TEST_P(ClusterMatrixTest, OutputsEqualTheReference) {
  const auto& [strategy, top_k, drop] = GetParam();
  LocalCluster cluster(strategy, top_k, drop);
  const ReferenceMoe reference = cluster.Reference();
  for (int64_t tokens : {0, 1, 7, 1000}) {
    const FloatTensor x = RandomTensor({tokens, 48}, 1000 + tokens);
    v1::ForwardResponse response;
    const grpc::Status status = cluster.Forward(x, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    const ReferenceForward expected = *reference.Forward(x);
    EXPECT_TRUE(TensorNear(Decoded(response.y()), expected.y, 1e-5)) << tokens << " tokens";
    EXPECT_TRUE(std::equal(response.routing().expert_ids().begin(),
                           response.routing().expert_ids().end(),
                           expected.routing.expert_ids.begin()));
    EXPECT_EQ(response.dropped_pairs(), expected.routing.dropped_pairs);
    EXPECT_EQ(response.aux_loss(), expected.routing.aux_loss);
    EXPECT_EQ(response.z_loss(), expected.routing.z_loss);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, ClusterMatrixTest,
    ::testing::Combine(::testing::Values("DATA_PARALLEL", "MODEL_PARALLEL", "HYBRID", "DYNAMIC"),
                       ::testing::Values(1, 2, 4), ::testing::Bool()));

TEST(ClusterTest, TrainingBackwardEqualsTheReference) {
  LocalCluster cluster("HYBRID", 2, false);
  const ReferenceMoe reference = cluster.Reference();
  const FloatTensor x = RandomTensor({33, 48}, 3), dy = RandomTensor({33, 48}, 4);
  v1::ForwardResponse forward;
  ASSERT_TRUE(cluster.Forward(x, &forward, true).ok());
  v1::BackwardResponse backward;
  const grpc::Status status = cluster.Backward(forward.request_id(), dy, &backward);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const ReferenceForward ref_forward = *reference.Forward(x);
  const ReferenceGradients expected = *reference.Backward(x, ref_forward, dy);
  EXPECT_TRUE(TensorNear(Decoded(backward.grad_input()), expected.dx, 1e-5));
}

TEST(ClusterTest, SurvivesAKilledReplicaAndNamesUnreplicatedExperts) {
  {
    LocalCluster replicated("DATA_PARALLEL", 2, false);
    const ReferenceMoe reference = replicated.Reference();
    const FloatTensor x = RandomTensor({200, 48}, 5);
    v1::ForwardResponse response;
    ASSERT_TRUE(replicated.Forward(x, &response).ok());
    replicated.KillServer(1);
    for (int i = 0; i < 5; ++i) {
      v1::ForwardResponse after;
      const grpc::Status status = replicated.Forward(x, &after);
      ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << replicated.RouterLog();
      EXPECT_TRUE(TensorNear(Decoded(after.y()), reference.Forward(x)->y, 1e-5));
    }
  }
  LocalCluster split("MODEL_PARALLEL", 2, false);
  const FloatTensor x = RandomTensor({200, 48}, 6);
  v1::ForwardResponse response;
  ASSERT_TRUE(split.Forward(x, &response).ok());
  split.KillServer(1);  // holds experts 4-7
  const grpc::Status down = split.Forward(x, &response);
  EXPECT_EQ(down.error_code(), grpc::StatusCode::UNAVAILABLE) << down.error_message();
  EXPECT_THAT(down.error_message(), HasSubstr("no live replica"));
  split.StartServer(1);
  // Back once the router re-opens its stream (after its back-off, 100 ms
  // doubling): poll, bounded by a deadline.
  grpc::Status status;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    status = split.Forward(x, &response);
  } while (!status.ok() && absl::Now() < deadline);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// The router's expert calls whole (one per expert and replica), or split
// into micro-batches of 3 rows (d_model 48, fp32), several in flight per
// expert.
class KilledReplicaTest : public ::testing::TestWithParam<int> {};

TEST_P(KilledReplicaTest, ClientsUnderSustainedLoadSurviveAReplicaKilledAmongThem) {
  // Six clients keep requests in flight while a DATA_PARALLEL replica is
  // SIGKILLed: every request, including those the dead server held, ends
  // with the reference output (re-sent to the live replica).
  std::vector<std::string> router_flags;
  if (GetParam() > 0) router_flags.push_back(absl::StrCat("--micro_batch_bytes=", GetParam()));
  LocalCluster cluster("DATA_PARALLEL", 2, false, 2, router_flags);
  const ReferenceMoe reference = cluster.Reference();
  constexpr int kClients = 6, kRequests = 40;
  std::atomic<int> done{0}, correct{0};
  absl::Notification quarter_done;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; i < kRequests; ++i) {
        const FloatTensor x = RandomTensor({64 + (c * 5 + i) % 64, 48}, 5000 + c * 100 + i);
        v1::ForwardResponse response;
        const grpc::Status status = cluster.Forward(x, &response);
        if (status.ok() && TensorNear(Decoded(response.y()), reference.Forward(x)->y, 1e-5)) {
          ++correct;
        } else {
          ADD_FAILURE() << "client " << c << " request " << i << ": " << status.error_message();
        }
        if (++done == kClients * kRequests / 4) quarter_done.Notify();
      }
    });
  }
  // Kill once the load is going (a quarter of the requests answered).
  quarter_done.WaitForNotification();
  cluster.KillServer(1);
  for (auto& t : clients) t.join();
  EXPECT_EQ(correct.load(), kClients * kRequests) << cluster.RouterLog();
}

INSTANTIATE_TEST_SUITE_P(WholeAndMicroBatched, KilledReplicaTest, ::testing::Values(0, 3 * 48 * 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 0 ? std::string("WholeCalls")
                                                  : std::string("MicroBatches");
                         });

TEST(ClusterTest, ConcurrentClientsGetTheirOwnAnswers) {
  // Eight clients at once, each with its own inputs and batch sizes: every
  // answer must be the reference output of its own request (no cross-talk),
  // none lost or duplicated.
  LocalCluster cluster("HYBRID", 2, false);
  const ReferenceMoe reference = cluster.Reference();
  std::atomic<int> correct{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; i < 10; ++i) {
        const FloatTensor x = RandomTensor({1 + (c * 7 + i * 13) % 50, 48}, c * 100 + i);
        v1::ForwardResponse response;
        const grpc::Status status = cluster.Forward(x, &response);
        if (status.ok() && TensorNear(Decoded(response.y()), reference.Forward(x)->y, 1e-5)) {
          ++correct;
        } else {
          ADD_FAILURE() << "client " << c << " request " << i << ": " << status.error_message();
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(correct.load(), 80);

  // The router's window saw every pair: 2 per token, no drops.
  int64_t tokens = 0;
  for (int c = 0; c < 8; ++c) {
    for (int i = 0; i < 10; ++i) tokens += 1 + (c * 7 + i * 13) % 50;
  }
  grpc::ClientContext context;
  v1::ClusterState state;
  ASSERT_TRUE(cluster.stub().GetClusterState(&context, {}, &state).ok());
  int64_t pairs = 0, server_rows = 0;
  for (const auto& expert : state.experts()) pairs += expert.tokens();
  for (const auto& server : state.servers()) {
    EXPECT_TRUE(server.healthy()) << server.name();
    server_rows += server.tokens();
  }
  EXPECT_EQ(pairs, 2 * tokens);
  EXPECT_EQ(server_rows, 2 * tokens);
  EXPECT_EQ(state.strategy(), v1::PLACEMENT_STRATEGY_HYBRID);
  EXPECT_GE(state.expert_imbalance(), 1.0);
  EXPECT_EQ(state.servers(0).expert_ids_size(), 6);  // experts 0-3 and 4, 5
  EXPECT_EQ(state.placement_epoch(), 1u);  // the config's placement
  EXPECT_EQ(state.step(), 0u);             // no training step yet
}

// The gate a config names is the one served, and GetClusterState says
// which: DeepSeek-V2's group-limited choice, scaled, here.
TEST(ClusterTest, TheConfiguredGateIsServedAndReported) {
  ProcessClusterOptions options;
  options.model =
      "d_model: 48 d_ff: 96 num_experts: 8 top_k: 2 seed: 5 gate { weights: "
      "WEIGHTS_PROBABILITIES num_groups: 4 top_groups: 2 scaling_factor: 16 }";
  options.strategy = "HYBRID";
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  const FloatTensor x = RandomTensor({300, 48}, 77);
  v1::ForwardResponse response;
  ASSERT_TRUE(cluster.Forward(x, &response).ok());
  const ReferenceForward expected = *reference.Forward(x);
  EXPECT_TRUE(TensorNear(Decoded(response.y()), expected.y, 1e-5));
  EXPECT_EQ(response.z_loss(), expected.routing.z_loss);
  grpc::ClientContext context;
  v1::ClusterState state;
  ASSERT_TRUE(cluster.stub().GetClusterState(&context, {}, &state).ok());
  EXPECT_EQ(state.model().gate().weights(), v1::GateConfig::WEIGHTS_PROBABILITIES);
  EXPECT_EQ(state.model().gate().num_groups(), 4);
  EXPECT_EQ(state.model().gate().top_groups(), 2);
  EXPECT_EQ(state.model().gate().scaling_factor(), 16.0);
}

TEST(ClusterTest, ForwardStreamAnswersEveryRequestByClientId) {
  LocalCluster cluster("DATA_PARALLEL", 2, false);
  const ReferenceMoe reference = cluster.Reference();
  grpc::ClientContext context;
  auto stream = cluster.stub().ForwardStream(&context);
  std::map<uint64_t, FloatTensor> inputs;
  for (uint64_t id = 100; id < 120; ++id) {
    const int64_t d_model = id == 107 ? 47 : 48;  // one bad request
    inputs.emplace(id, RandomTensor({1 + static_cast<int64_t>(id % 9) * 11, d_model}, id));
    v1::ForwardRequest request;
    request.set_client_id(id);
    EncodeFloats(inputs.at(id).values(), inputs.at(id).shape(), DType::kFloat32,
                 request.mutable_x());
    ASSERT_TRUE(stream->Write(request));
  }
  stream->WritesDone();
  std::map<uint64_t, v1::ForwardResponse> answers;
  v1::ForwardResponse response;
  while (stream->Read(&response)) {
    EXPECT_TRUE(answers.emplace(response.client_id(), response).second) << response.client_id();
  }
  EXPECT_TRUE(stream->Finish().ok());
  ASSERT_EQ(answers.size(), 20u);
  for (const auto& [id, answer] : answers) {
    if (id == 107) {
      EXPECT_EQ(answer.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      EXPECT_THAT(answer.error().message(), HasSubstr("d_model = 48, got 47"));
      continue;
    }
    ASSERT_FALSE(answer.has_error()) << answer.error().message();
    EXPECT_TRUE(TensorNear(Decoded(answer.y()), reference.Forward(inputs.at(id))->y, 1e-5)) << id;
  }
}

TEST(ClusterTest, BadInputIsNamedAndTheRouterKeepsServing) {
  LocalCluster cluster("HYBRID", 2, false);
  v1::ForwardResponse response;
  grpc::Status status = cluster.Forward(RandomTensor({3, 47}, 1), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("x: expected d_model = 48, got 47"));
  v1::BackwardResponse backward;
  status = cluster.Backward(424242, RandomTensor({3, 48}, 1), &backward);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("request 424242"));
  EXPECT_TRUE(cluster.Forward(RandomTensor({3, 48}, 1), &response).ok());
}

}  // namespace
}  // namespace moe::testing
