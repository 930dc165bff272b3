// The expert_server binary as a real process on loopback: it starts from a
// config file, logs its ports, serves Dispatch and /metrics, rejects bad
// flags with a message, and exits 0 on SIGTERM.
#include <csignal>
#include <fstream>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "common/deterministic_init.h"
#include "common/model_config.h"
#include "common/reference_expert.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "common/transport_credentials.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/expert.grpc.pb.h"
#include "proto/health.grpc.pb.h"
#include "deploy/local/child_process.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::HttpGet;
using ::moe::local::NumberAfter;
using ::moe::local::PickFreePort;
using ::moe::local::RunfilePath;

using ::testing::HasSubstr;

constexpr char kConfig[] = R"pb(
  model { d_model: 64 d_ff: 128 num_experts: 6 top_k: 2 seed: 21 }
  cluster {
    servers { name: "e0" address: "127.0.0.1:1" }
    servers { name: "e1" address: "127.0.0.1:2" }
    strategy: PLACEMENT_STRATEGY_HYBRID
  }
)pb";

std::string WriteConfig() {
  const std::string path = absl::StrCat(::testing::TempDir(), "/serving.pbtxt");
  std::ofstream(path) << kConfig;
  return path;
}

std::string Binary() { return RunfilePath("expert_service/expert_server"); }

TEST(ExpertServerProcessTest, ServesThenDrainsOnSigterm) {
  ChildProcess server(Binary(), {"--config=" + WriteConfig(), "--name=e1", "--port=0",
                                 "--metrics_port=0", "--host=127.0.0.1"});
  const std::optional<std::string> line =
      server.WaitForLine("serving gRPC on port", absl::Seconds(60));
  ASSERT_TRUE(line.has_value()) << server.output();
  const int port = NumberAfter(*line, "serving gRPC on port ");
  const int metrics_port = NumberAfter(*line, "/metrics on port ");
  ASSERT_GT(port, 0);
  ASSERT_GT(metrics_port, 0);
  EXPECT_THAT(server.output(), HasSubstr("HYBRID placement gives experts [0,1,2,5]"));

  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                     TransportCredentials::Plaintext().ForChannel());
  {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckResponse health;
    ASSERT_TRUE(grpc::health::v1::Health::NewStub(channel)->Check(&context, {}, &health).ok());
    EXPECT_EQ(health.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  auto stub = v1::ExpertServer::NewStub(channel);
  const ModelConfig model = ParseServingConfig(kConfig)->model;
  const FloatTensor x = RandomTensor({3, 64}, 5);
  {
    grpc::ClientContext context;
    auto stream = stub->Dispatch(&context);
    v1::DispatchRequest request;
    request.set_sequence_id(1);
    request.set_expert_id(5);
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_tokens());
    ASSERT_TRUE(stream->Write(request));
    v1::DispatchResponse response;
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_FALSE(response.has_error()) << response.error().message();
    FloatTensor expected({3, 64});
    std::vector<float> hidden(3 * 128);
    ReferenceExpertForward(InitExpert(model, ExpertKey(0, 5)), x.values(), 3,
                           absl::MakeSpan(hidden), expected.mutable_values());
    EXPECT_TRUE(TensorNear(
        ToFloatTensor(*DecodeTensor(response.output(), TokenBatchSpec("y", 64, 0))), expected,
        1e-5));
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
  const std::string metrics = HttpGet(metrics_port, "/metrics");
  EXPECT_THAT(metrics, HasSubstr("moe_expert_tokens_total{expert=\"5\"} 3"));
  EXPECT_THAT(metrics, HasSubstr("moe_expert_kernel_seconds_count{op=\"forward\"} 1"));

  EXPECT_EQ(server.Stop(SIGTERM, absl::Seconds(30)), 0);
  EXPECT_THAT(server.output(), HasSubstr("received SIGTERM"));
  EXPECT_THAT(server.output(), HasSubstr("stopped"));
}

TEST(ExpertServerProcessTest, BadFlagsAreNamed) {
  ChildProcess bad_dtype(Binary(), {"--config=" + WriteConfig(), "--name=e0", "--dtype=fp16"});
  EXPECT_EQ(bad_dtype.Stop(0, absl::Seconds(30)), 2);
  EXPECT_THAT(bad_dtype.output(), HasSubstr("--dtype must be fp32 or bf16, got \"fp16\""));

  ChildProcess bad_name(Binary(), {"--config=" + WriteConfig(), "--name=e7", "--port=0",
                                   "--metrics_port=-1"});
  EXPECT_EQ(bad_name.Stop(0, absl::Seconds(30)), 1);
  EXPECT_THAT(bad_name.output(), HasSubstr("--name=e7 is not a server of the config"));

  ChildProcess no_config(Binary(), {"--name=e0"});
  EXPECT_EQ(no_config.Stop(0, absl::Seconds(30)), 2);
  EXPECT_THAT(no_config.output(), HasSubstr("--config is required"));
}

}  // namespace
}  // namespace moe::testing
