// When micro-batching pays: 8 clients, each with its own Dispatch stream and
// one request in flight, send M-row requests for the same expert (fp32,
// d_model 1024, d_ff 4096, one compute thread) to servers that differ only
// in merging: off (--nomerge_requests, -1 below), merging what queues up
// (the default, window 0) and windows of 100 and 500 us. Prints requests/s
// and mean latency per setting, side by side.
#include <algorithm>
#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "bench/ratio_reporter.h"
#include "benchmark/benchmark.h"
#include "common/model_config.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "expert_service/expert_server.h"
#include "proto/expert.grpc.pb.h"

namespace moe::bench {
namespace {

constexpr char kConfig[] = R"pb(
  model { d_model: 1024 d_ff: 4096 num_experts: 1 top_k: 1 seed: 1 }
  cluster {
    servers { name: "bench" address: "127.0.0.1:0" }
    strategy: PLACEMENT_STRATEGY_MODEL_PARALLEL
  }
)pb";
constexpr int kClients = 8;
constexpr int64_t kWindowsUs[] = {-1, 0, 100, 500};  // -1: no merging
constexpr int64_t kRows[] = {1, 16, 256};

std::map<int64_t, expert::ExpertServer*>& Servers() {
  static auto* servers = new std::map<int64_t, expert::ExpertServer*>;
  return *servers;
}

void StartServers() {
  for (int64_t window_us : kWindowsUs) {
    expert::ExpertServer::Options options;
    options.config = *ParseServingConfig(kConfig);
    options.name = "bench";
    options.listen_address = "127.0.0.1:0";
    options.metrics_port = -1;
    options.merge_requests = window_us >= 0;
    options.batch_window = absl::Microseconds(std::max<int64_t>(window_us, 0));
    Servers()[window_us] = expert::ExpertServer::Create(options)->release();
  }
}

void BM_ConcurrentDispatch(benchmark::State& state) {
  const int64_t window_us = state.range(0);
  const int64_t rows = state.range(1);
  auto stub = v1::ExpertServer::NewStub(Servers().at(window_us)->InProcessChannel());
  grpc::ClientContext context;
  auto stream = stub->Dispatch(&context);
  v1::DispatchRequest request;
  const FloatTensor x = testing::RandomTensor({rows, 1024}, state.thread_index());
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_tokens());
  v1::DispatchResponse response;
  uint64_t sequence = 0;
  for (auto _ : state) {
    request.set_sequence_id(++sequence);
    if (!stream->Write(request) || !stream->Read(&response) || response.has_error()) {
      state.SkipWithError("dispatch failed");
      break;
    }
  }
  stream->WritesDone();
  (void)stream->Finish();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ConcurrentDispatch)
    ->ArgsProduct({{kWindowsUs[0], kWindowsUs[1], kWindowsUs[2], kWindowsUs[3]},
                   {kRows[0], kRows[1], kRows[2]}})
    ->Threads(kClients)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  moe::bench::StartServers();
  moe::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\n%6s %-14s %12s %14s %10s\n", "M", "merging", "requests/s", "mean latency us",
              "vs off");
  for (int64_t rows : moe::bench::kRows) {
    double off = 0;
    for (int64_t window : moe::bench::kWindowsUs) {
      const auto* r = reporter.Find(absl::StrCat("BM_ConcurrentDispatch/", window, "/", rows,
                                                 "/real_time/threads:", moe::bench::kClients));
      if (r == nullptr) continue;
      const double rate = r->counters.count("items_per_second")
                              ? r->counters.at("items_per_second")
                              : 0.0;
      if (window < 0) off = rate;
      // Closed loop: each client has one request in flight.
      const double latency_us = rate > 0 ? 1e6 * moe::bench::kClients / rate : 0;
      const std::string merging = window < 0    ? "off"
                                  : window == 0 ? "queued"
                                                : absl::StrCat(window, " us window");
      std::printf("%6ld %-14s %12.0f %14.0f %9.2fx\n", static_cast<long>(rows), merging.c_str(),
                  rate, latency_us, off > 0 ? rate / off : 0.0);
    }
  }
  for (auto& [window, server] : moe::bench::Servers()) server->Shutdown();
  return 0;
}
