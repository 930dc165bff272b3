// Several MoE layers in one real cluster (router and expert-server
// processes): a 4-layer model on 3 servers, experts of different layers on
// one server, serves 4 clients whose streams interleave the layers, every
// answer equal to its own layer's reference (no cross-talk); training
// through two layers equals two reference layers, replicas stay identical
// per (layer, expert), and a checkpoint of the trained cluster holds every
// layer's tensors as trained; Qwen2-MoE's shared expert is served and
// trained in every layer.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/expert_key.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/router.grpc.pb.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

constexpr int kDModel = 32;
constexpr int kLayers = 4;

// Layer 0 spread over the servers, layer 1 kept on server 0, layer 2
// replicated on servers 1 and 2, layer 3 on every server.
std::string MixedPlacement() {
  std::string text = "  explicit_placement {\n";
  for (int l = 0; l < kLayers; ++l) {
    for (int e = 0; e < 6; ++e) {
      std::string servers;
      switch (l) {
        case 0:
          servers = absl::StrCat("\"e", e % 3, "\"");
          break;
        case 1:
          servers = "\"e0\"";
          break;
        case 2:
          servers = "\"e1\", \"e2\"";
          break;
        default:
          servers = "\"e0\", \"e1\", \"e2\"";
      }
      absl::StrAppend(&text, "    experts { layer: ", l, " expert_id: ", e, " servers: [", servers,
                      "] }\n");
    }
  }
  return text + "  }\n";
}

TEST(LayersProcessTest, FourClientsInterleaveFourLayersWithoutCrossTalk) {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 64 num_experts: 6 top_k: 2 seed: 3 num_layers: ", kLayers);
  options.strategy = "EXPLICIT";
  options.num_servers = 3;
  options.cluster_extra = MixedPlacement();
  ProcessCluster cluster(options);
  // Server 0 holds experts of layers 0, 1 and 3.
  v1::InfoResponse info;
  ASSERT_TRUE(cluster.Info(0, &info).ok());
  std::map<int, int> layers_on_0;
  for (const v1::ExpertDigest& d : info.experts()) ++layers_on_0[d.layer()];
  EXPECT_EQ(layers_on_0, (std::map<int, int>{{0, 2}, {1, 6}, {3, 6}}));

  std::vector<ReferenceMoe> reference;
  for (int l = 0; l < kLayers; ++l) reference.push_back(cluster.Reference(l));
  constexpr int kClients = 4;
  constexpr int kRequests = 24;
  std::atomic<int> checked{0};
  absl::Mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      // Each client its own connection and stream, all requests in flight.
      auto channel =
          grpc::CreateChannel(cluster.router_address(), grpc::InsecureChannelCredentials());
      auto stub = v1::Router::NewStub(channel);
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
      auto stream = stub->ForwardStream(&context);
      std::vector<FloatTensor> inputs;
      for (int i = 0; i < kRequests; ++i) {
        inputs.push_back(RandomTensor({3 + (i * 7 + c) % 29, kDModel}, 1000 * c + i));
        v1::ForwardRequest request;
        request.set_client_id(i);
        request.set_layer((c + i) % kLayers);
        request.set_return_routing(true);
        EncodeFloats(inputs[i].values(), inputs[i].shape(), DType::kFloat32, request.mutable_x());
        stream->Write(request);
      }
      stream->WritesDone();
      v1::ForwardResponse response;
      std::vector<std::string> mine;
      int answered = 0;
      while (stream->Read(&response)) {
        ++answered;
        const int i = static_cast<int>(response.client_id());
        const int layer = (c + i) % kLayers;
        const std::string what = absl::StrCat("client ", c, " request ", i, " (layer ", layer, ")");
        if (response.has_error() && response.error().code() != 0) {
          mine.push_back(absl::StrCat(what, ": ", response.error().message()));
          continue;
        }
        const ReferenceForward expected = *reference[layer].Forward(inputs[i]);
        if (!TensorNear(Decoded(response.y(), kDModel), expected.y, 1e-5)) {
          mine.push_back(what + ": y differs from its layer's reference");
        }
        if (std::vector<int32_t>(response.routing().expert_ids().begin(),
                                 response.routing().expert_ids().end()) !=
            expected.routing.expert_ids) {
          mine.push_back(what + ": routing differs from its layer's");
        }
        ++checked;
      }
      const grpc::Status status = stream->Finish();
      if (!status.ok() || answered != kRequests) {
        mine.push_back(
            absl::StrCat("client ", c, ": ", answered, " answers, ", status.error_message()));
      }
      absl::MutexLock lock(&mu);
      failures.insert(failures.end(), mine.begin(), mine.end());
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_THAT(failures, ::testing::IsEmpty());
  EXPECT_EQ(checked.load(), kClients * kRequests);
  // A layer the model does not have is named.
  v1::ForwardResponse refused;
  const grpc::Status missing =
      cluster.Forward(RandomTensor({2, kDModel}, 1), &refused, false, kLayers);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(missing.error_message(), ::testing::HasSubstr("layer 4 is out of range [0, 4)"));
  // The cluster state names each expert's layer.
  v1::ClusterState state;
  grpc::ClientContext context;
  ASSERT_TRUE(cluster.stub().GetClusterState(&context, v1::GetClusterStateRequest(), &state).ok());
  ASSERT_EQ(state.experts_size(), kLayers * 6);
  EXPECT_EQ(state.experts(6).layer(), 1);
  EXPECT_THAT(state.experts(6).servers(), ::testing::ElementsAre("e0"));
  EXPECT_EQ(state.servers(0).expert_layers_size(), state.servers(0).expert_ids_size());
}

TEST(LayersProcessTest, TwoLayersTrainAsTheReferenceAndCheckpointEveryLayer) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/layer_checkpoints");
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 48 num_experts: 4 top_k: 2 seed: 11 num_layers: 2 "
                               "optimizer { type: OPTIMIZER_TYPE_SGD_MOMENTUM momentum: 0.9 }");
  options.strategy = "HYBRID";
  options.num_servers = 2;
  options.server_flags = {"--checkpoint_dir=" + dir};
  options.router_flags = {"--checkpoint_dir=" + dir};
  ProcessCluster cluster(options);
  const ModelConfig& model = cluster.config().model;
  std::vector<ReferenceTraining> reference;
  for (int l = 0; l < 2; ++l) reference.emplace_back(model, InitAllWeights(model, l));
  constexpr float kLearningRate = 0.05f;
  for (int step = 1; step <= 3; ++step) {
    for (int l = 0; l < 2; ++l) {
      const FloatTensor x = RandomTensor({40, kDModel}, 10 * step + l);
      const FloatTensor dy = RandomTensor({40, kDModel}, 100 * step + l);
      const ReferenceTraining::Step expected = reference[l].Train(x, dy, kLearningRate);
      v1::ForwardResponse y;
      ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true, l).ok());
      ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5))
          << "layer " << l << " step " << step;
      v1::BackwardResponse dx;
      ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
      ASSERT_TRUE(TensorNear(Decoded(dx.grad_input(), kDModel), expected.grads.dx, 1e-5))
          << "layer " << l << " step " << step;
    }
    v1::StepResponse stepped;
    const grpc::Status status = cluster.Step(kLearningRate, absl::Seconds(30), &stepped);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  // Replicas of each (layer, expert) hold the same bits.
  std::map<ExpertKey, uint64_t> digests;
  for (int s = 0; s < 2; ++s) {
    v1::InfoResponse info;
    ASSERT_TRUE(cluster.Info(s, &info).ok());
    for (const v1::ExpertDigest& d : info.experts()) {
      auto [it, first] = digests.emplace(ExpertKeyOf(d), d.weights_digest());
      EXPECT_EQ(it->second, d.weights_digest()) << ExpertKeyOf(d) << " on server " << s;
    }
  }
  EXPECT_EQ(digests.size(), 8u);
  // Fresh tokens through each trained layer are its reference's.
  for (int l = 0; l < 2; ++l) {
    const FloatTensor x = RandomTensor({16, kDModel}, 999 + l);
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, false, l).ok());
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference[l].Layer().Forward(x)->y, 1e-5))
        << "layer " << l;
  }
  // The checkpoint of step 3 holds both layers as trained.
  v1::SaveCheckpointResponse saved;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  const grpc::Status status =
      cluster.stub().SaveCheckpoint(&context, v1::SaveCheckpointRequest(), &saved);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(saved.step(), 3u);
  for (int l = 0; l < 2; ++l) {
    absl::StatusOr<MoeWeights> loaded =
        LoadCheckpoint(saved.directory(), model, {true, std::nullopt, l});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_TRUE(TensorNear(*loaded->gate, *reference[l].weights().gate, 1e-5)) << "layer " << l;
    for (int e = 0; e < 4; ++e) {
      EXPECT_TRUE(
          TensorNear(loaded->experts.at(e).w1, reference[l].weights().experts.at(e).w1, 1e-5))
          << ExpertKey(l, e);
    }
  }
}

// Qwen2-MoE's shared expert across processes, in two layers: its slices
// are experts 4 and 5 of each layer, placed on the servers like the routed
// ones; forwards and a training step equal each layer's reference.
TEST(LayersProcessTest, TheSharedExpertIsServedAndTrainedInEveryLayer) {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 24 num_experts: 4 top_k: 2 seed: 23 num_layers: 2 "
                               "activation: EXPERT_ACTIVATION_SILU_GATED shared_expert_d_ff: 48 "
                               "gate { weights: WEIGHTS_PROBABILITIES }");
  options.strategy = "MODEL_PARALLEL";
  options.num_servers = 2;
  ProcessCluster cluster(options);
  const ModelConfig& model = cluster.config().model;
  ASSERT_EQ(model.experts_per_layer(), 6);
  v1::InfoResponse info;
  ASSERT_TRUE(cluster.Info(1, &info).ok());
  std::vector<ExpertKey> hosted;
  for (const v1::ExpertDigest& d : info.experts()) hosted.push_back(ExpertKeyOf(d));
  EXPECT_THAT(hosted, ::testing::Contains(ExpertKey(1, 5)));  // a slice of layer 1
  std::vector<ReferenceTraining> reference;
  for (int l = 0; l < 2; ++l) reference.emplace_back(model, InitAllWeights(model, l));
  for (int l = 0; l < 2; ++l) {
    const FloatTensor x = RandomTensor({20, kDModel}, 40 + l);
    const FloatTensor dy = RandomTensor({20, kDModel}, 50 + l);
    const ReferenceTraining::Step expected = reference[l].Train(x, dy, 0.05f);
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true, l).ok());
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5)) << "layer " << l;
    // Each token's top-2, then the shared expert's two slices.
    ASSERT_EQ(y.routing().top_k(), 4);
    EXPECT_EQ(y.routing().expert_ids(2), 4);
    EXPECT_EQ(y.routing().expert_ids(3), 5);
    v1::BackwardResponse dx;
    ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
    EXPECT_TRUE(TensorNear(Decoded(dx.grad_input(), kDModel), expected.grads.dx, 1e-5))
        << "layer " << l;
  }
  v1::StepResponse stepped;
  const grpc::Status status = cluster.Step(0.05f, absl::Seconds(30), &stepped);
  ASSERT_TRUE(status.ok()) << status.error_message();
  for (int l = 0; l < 2; ++l) {
    const FloatTensor x = RandomTensor({16, kDModel}, 60 + l);
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, false, l).ok());
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference[l].Layer().Forward(x)->y, 1e-5))
        << "layer " << l << " after the step";
  }
}

}  // namespace
}  // namespace moe::testing
