#include "tests/process_cluster.h"

#include <algorithm>
#include <csignal>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/tensor_codec.h"
#include "common/transport_credentials.h"
#include "gtest/gtest.h"

namespace moe::testing {

using ::moe::local::ChildProcess;
using ::moe::local::NumberAfter;
using ::moe::local::PickFreePort;
using ::moe::local::RunfilePath;

ProcessCluster::ProcessCluster(ProcessClusterOptions options) : options_(std::move(options)) {
  for (int s = 0; s < options_.num_servers; ++s) ports_.push_back(PickFreePort());
  std::string text = absl::StrCat("model { ", options_.model, " }\ncluster {\n");
  for (int s = 0; s < options_.num_servers; ++s) {
    absl::StrAppend(&text, "  servers { name: \"e", s, "\" address: \"127.0.0.1:", ports_[s],
                    "\" }\n");
  }
  absl::StrAppend(&text, "  strategy: PLACEMENT_STRATEGY_", options_.strategy, "\n",
                  options_.cluster_extra, "}\n");
  // Unique per cluster: several may run in one test process.
  static int instance = 0;
  config_path_ = absl::StrCat(::testing::TempDir(), "/cluster_", ++instance, ".pbtxt");
  std::ofstream(config_path_) << text;
  absl::StatusOr<ServingConfig> config = ParseServingConfig(text);
  MOE_CHECK(config.ok(), config.status().ToString());
  config_ = *std::move(config);
  servers_.resize(options_.num_servers);
  for (int s = 0; s < options_.num_servers; ++s) {
    if (std::find(options_.not_started.begin(), options_.not_started.end(), s) ==
        options_.not_started.end()) {
      StartServer(s);
    }
    server_channels_.push_back(grpc::CreateChannel(absl::StrCat("127.0.0.1:", ports_[s]),
                                                   TransportCredentials::Plaintext().ForChannel()));
    server_stubs_.push_back(v1::ExpertServer::NewStub(server_channels_.back()));
  }
  StartRouter();
}

void ProcessCluster::KillRouter() { router_->Stop(SIGKILL, absl::Seconds(10)); }

namespace {

// A router process of the cluster's config, its channel and metrics port.
std::unique_ptr<ChildProcess> LaunchRouter(const std::string& config_path,
                                           const std::vector<std::string>& flags,
                                           std::shared_ptr<grpc::Channel>* channel,
                                           std::string* address, int* metrics_port) {
  std::vector<std::string> args = {"--config=" + config_path, "--port=0", "--metrics_port=0",
                                   "--host=127.0.0.1"};
  args.insert(args.end(), flags.begin(), flags.end());
  auto router = std::make_unique<ChildProcess>(RunfilePath("router_service/router"), args);
  const auto line = router->WaitForLine("router serving gRPC on port", absl::Seconds(60));
  MOE_CHECK(line.has_value(), router->output());
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(256 << 20);
  *metrics_port = NumberAfter(*line, "/metrics on port ");
  *address = absl::StrCat("127.0.0.1:", NumberAfter(*line, "on port "));
  *channel = grpc::CreateCustomChannel(*address, TransportCredentials::Plaintext().ForChannel(),
                                       channel_args);
  return router;
}

}  // namespace

void ProcessCluster::StartRouter() {
  router_ = LaunchRouter(config_path_, options_.router_flags, &router_channel_, &router_address_,
                         &router_metrics_port_);
  stub_ = v1::Router::NewStub(router_channel_);
}

ProcessCluster::OtherRouter ProcessCluster::StartAnotherRouter() {
  std::shared_ptr<grpc::Channel> channel;
  OtherRouter other;
  other.process = LaunchRouter(config_path_, options_.router_flags, &channel, &other.address,
                               &other.metrics_port);
  other.stub = v1::Router::NewStub(channel);
  return other;
}

ProcessCluster::~ProcessCluster() {
  // A stopped server would ignore SIGTERM (and ChildProcess's SIGKILL is
  // enough); continue it so every process can end.
  for (auto& s : servers_) {
    // pid() is -1 once stopped: kill(-1) would signal every process.
    if (s != nullptr && s->pid() > 0) kill(s->pid(), SIGCONT);
  }
}

void ProcessCluster::StartServer(int s) {
  std::vector<std::string> args = {"--config=" + config_path_, absl::StrCat("--name=e", s),
                                   absl::StrCat("--port=", ports_[s]), "--metrics_port=-1",
                                   "--host=127.0.0.1", "--onednn_threads=1"};
  args.insert(args.end(), options_.server_flags.begin(), options_.server_flags.end());
  servers_[s] = std::make_unique<ChildProcess>(RunfilePath("expert_service/expert_server"), args);
  MOE_CHECK(servers_[s]->WaitForLine("serving gRPC on port", absl::Seconds(60)).has_value(),
            servers_[s]->output());
}

void ProcessCluster::KillServer(int s) { servers_[s]->Stop(SIGKILL, absl::Seconds(10)); }
void ProcessCluster::PauseServer(int s) {
  MOE_CHECK(servers_[s]->pid() > 0);
  kill(servers_[s]->pid(), SIGSTOP);
}

void ProcessCluster::ContinueServer(int s) {
  MOE_CHECK(servers_[s]->pid() > 0);
  kill(servers_[s]->pid(), SIGCONT);
}

std::string ProcessCluster::RouterLog() { return router_->output(); }

std::string ProcessCluster::ServerLog(int s) { return servers_[s]->output(); }

bool ProcessCluster::WaitForServerLine(int s, const std::string& needle,
                                       absl::Duration timeout) {
  return servers_[s]->WaitForLine(needle, timeout).has_value();
}

grpc::Status ProcessCluster::Forward(const FloatTensor& x, v1::ForwardResponse* response,
                                     bool training, int layer) {
  v1::ForwardRequest request;
  request.set_layer(layer);
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
  request.set_training(training);
  request.set_return_routing(true);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return stub_->Forward(&context, request, response);
}

grpc::Status ProcessCluster::Backward(uint64_t id, const FloatTensor& dy,
                                      v1::BackwardResponse* response) {
  v1::BackwardRequest request;
  request.set_request_id(id);
  EncodeFloats(dy.values(), dy.shape(), DType::kFloat32, request.mutable_grad_output());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return stub_->Backward(&context, request, response);
}

grpc::Status ProcessCluster::Step(float learning_rate, absl::Duration timeout,
                                  v1::StepResponse* response) {
  v1::StepRequest request;
  request.set_learning_rate(learning_rate);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  return stub_->Step(&context, request, response);
}

grpc::Status ProcessCluster::Info(int s, v1::InfoResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return server_stubs_.at(s)->Info(&context, v1::InfoRequest(), response);
}

ReferenceMoe ProcessCluster::Reference(int layer) const {
  return *ReferenceMoe::Create(config_.model, InitAllWeights(config_.model, layer));
}

FloatTensor Decoded(const v1::Tensor& t, int64_t width) {
  return ToFloatTensor(*DecodeTensor(t, TokenBatchSpec("t", width, 0)));
}

}  // namespace moe::testing
