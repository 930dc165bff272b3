// Dispatch round trip over loopback: one expert server (fp32 oneDNN
// kernels, d_model 1024, d_ff 4096) in this process on 127.0.0.1, one
// long-lived stream, one request in flight; rows M in {1, 128, 4096}.
// Prints microseconds per call and the share of it spent in the kernel
// (the server's compute_micros).
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "bench/ratio_reporter.h"
#include "benchmark/benchmark.h"
#include "common/model_config.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/transport_credentials.h"
#include "expert_service/expert_server.h"
#include "proto/expert.grpc.pb.h"
#include "proto/health.grpc.pb.h"

namespace moe::bench {
namespace {

constexpr char kConfig[] = R"pb(
  model { d_model: 1024 d_ff: 4096 num_experts: 1 top_k: 1 seed: 1 }
  cluster {
    servers { name: "bench" address: "127.0.0.1:0" }
    strategy: PLACEMENT_STRATEGY_MODEL_PARALLEL
  }
)pb";
constexpr int64_t kRows[] = {1, 128, 4096};

expert::ExpertServer& Server() {
  static expert::ExpertServer* server = [] {
    expert::ExpertServer::Options options;
    options.config = *ParseServingConfig(kConfig);
    options.name = "bench";
    options.listen_address = "127.0.0.1:0";
    options.metrics_port = -1;
    return expert::ExpertServer::Create(options)->release();
  }();
  return *server;
}

void BM_DispatchRoundTrip(benchmark::State& state) {
  const int64_t rows = state.range(0);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(512 << 20);
  auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", Server().port()),
                                           TransportCredentials::Plaintext().ForChannel(), args);
  auto stub = v1::ExpertServer::NewStub(channel);
  grpc::ClientContext context;
  auto stream = stub->Dispatch(&context);
  v1::DispatchRequest request;
  request.set_expert_id(0);
  const FloatTensor x = testing::RandomTensor({rows, 1024}, 3);
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_tokens());
  v1::DispatchResponse response;
  int64_t compute_micros = 0;
  uint64_t sequence = 0;
  for (auto _ : state) {
    request.set_sequence_id(++sequence);
    if (!stream->Write(request) || !stream->Read(&response) || response.has_error()) {
      state.SkipWithError("dispatch failed");
      break;
    }
    compute_micros += response.compute_micros();
  }
  stream->WritesDone();
  (void)stream->Finish();
  state.counters["kernel_us"] =
      benchmark::Counter(static_cast<double>(compute_micros) / state.iterations());
  state.SetItemsProcessed(state.iterations() * rows);
}
// The floor: gRPC's own unary round trip on the same server (health Check,
// no payload, no compute).
void BM_HealthCheckRoundTrip(benchmark::State& state) {
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", Server().port()),
                                     TransportCredentials::Plaintext().ForChannel());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  for (auto _ : state) {
    grpc::ClientContext context;
    if (!stub->Check(&context, request, &response).ok()) {
      state.SkipWithError("health check failed");
      break;
    }
  }
}
BENCHMARK(BM_HealthCheckRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();

BENCHMARK(BM_DispatchRoundTrip)
    ->ArgsProduct({{kRows[0], kRows[1], kRows[2]}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  moe::bench::Server();
  moe::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\n%6s %12s %12s %12s\n", "M", "call us", "kernel us", "kernel share");
  for (int64_t rows : moe::bench::kRows) {
    const auto* r =
        reporter.Find(absl::StrCat("BM_DispatchRoundTrip/", rows, "/real_time"));
    if (r == nullptr) continue;
    const double call_us = r->seconds_per_iteration * 1e6;
    const double kernel_us = r->counters.at("kernel_us");
    std::printf("%6ld %12.1f %12.1f %11.1f%%\n", static_cast<long>(rows), call_us, kernel_us,
                100.0 * kernel_us / call_us);
  }
  moe::bench::Server().Shutdown();
  return 0;
}
