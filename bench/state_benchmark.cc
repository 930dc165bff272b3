// The weights as managed state, on a real local cluster (router and expert
// servers, each its own process): DATA_PARALLEL over 2 servers, every server
// holding every expert (8 experts of d_model 1024, d_ff 4096 by default: 32
// MiB each, 256 MiB per server), plain SGD.
//  1. Rejoin by sync: after one training step, server 1 is killed and
//     started again; the time its sync took (from its log) against the raw
//     weight bytes at the one-way gRPC bandwidth measured in the same run
//     (the same experts streamed from server 0 into this process with
//     GetExpertWeights, the RPC the sync uses). Goal: within 1.5x.
//  2. SaveCheckpoint under load: clients send Forwards all along; their p50
//     and p99 before and during a SaveCheckpoint, the save's time and size.
//
//   bazel run //bench:state_benchmark -- [--d_model=1024 ...]
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "bench/latency.h"
#include "common/log.h"
#include "common/tensor_codec.h"
#include "common/transport_credentials.h"
#include "deploy/local/local_cluster.h"
#include "proto/expert.grpc.pb.h"
#include "proto/router.grpc.pb.h"

ABSL_FLAG(int, d_model, 1024, "Model width.");
ABSL_FLAG(int, d_ff, 4096, "Expert hidden width.");
ABSL_FLAG(int, experts, 8, "Experts (every server holds each).");
ABSL_FLAG(int, tokens, 64, "Tokens per Forward.");
ABSL_FLAG(int, clients, 2, "Concurrent clients during the save.");
ABSL_FLAG(absl::Duration, phase, absl::Seconds(5), "Length of the phase before the save.");
ABSL_FLAG(std::string, work_dir, "/tmp/moe_state_benchmark", "Config and checkpoints.");

namespace moe {
namespace {

using bench::Percentile;
using bench::Sample;

// "..., 256 MiB in 392.637753ms" in the restarted server's log: the sync's
// time.
absl::Duration SyncTime(const std::string& log) {
  const size_t at = log.find("synced ");
  MOE_CHECK(at != std::string::npos, "no sync line in the log:\n" + log);
  const size_t in = log.find(" MiB in ", at);
  const size_t end = log.find_first_of(";\n", in);
  absl::Duration took;
  MOE_CHECK(absl::ParseDuration(log.substr(in + 8, end - in - 8), &took), log.substr(at, end - at));
  return took;
}

int Run() {
  ModelConfig model;
  model.d_model = absl::GetFlag(FLAGS_d_model);
  model.d_ff = absl::GetFlag(FLAGS_d_ff);
  model.num_experts = absl::GetFlag(FLAGS_experts);
  model.top_k = 2;
  model.seed = 1;
  const std::string dir = absl::GetFlag(FLAGS_work_dir);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/checkpoints");

  local::LocalClusterOptions options;
  options.config.model = model;
  for (int s = 0; s < 2; ++s) {
    options.config.cluster.servers.push_back({absl::StrCat("e", s), "127.0.0.1:0"});
  }
  options.config.cluster.strategy = PlacementStrategy::kDataParallel;
  options.onednn_threads = 1;
  options.work_dir = dir;
  options.checkpoint_dir = dir + "/checkpoints";
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  MOE_CHECK(cluster.ok(), cluster.status().ToString());
  auto router = v1::Router::NewStub(
      NewChannel((*cluster)->router_address(), TransportCredentials::Plaintext(), 256 << 20));
  const int tokens = absl::GetFlag(FLAGS_tokens);
  auto input = [&](std::mt19937& rng) {
    std::uniform_real_distribution<float> uniform(-1, 1);
    FloatTensor x({tokens, model.d_model});
    for (float& v : x.mutable_values()) v = uniform(rng);
    return x;
  };

  // One training step: the cluster is at step 1, a restarted server is
  // behind it.
  {
    std::mt19937 rng(1);
    v1::ForwardRequest forward;
    forward.set_training(true);
    const FloatTensor x = input(rng);
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, forward.mutable_x());
    v1::ForwardResponse y;
    grpc::ClientContext c1;
    MOE_CHECK(router->Forward(&c1, forward, &y).ok());
    v1::BackwardRequest backward;
    backward.set_request_id(y.request_id());
    *backward.mutable_grad_output() = y.y();
    v1::BackwardResponse dx;
    grpc::ClientContext c2;
    MOE_CHECK(router->Backward(&c2, backward, &dx).ok());
    v1::StepRequest step;
    step.set_learning_rate(0.01f);
    v1::StepResponse stepped;
    grpc::ClientContext c3;
    const grpc::Status status = router->Step(&c3, step, &stepped);
    MOE_CHECK(status.ok(), status.error_message());
  }

  // The one-way bandwidth of GetExpertWeights from server 0, best of 3.
  const std::string e0 = (*cluster)->config().cluster.servers[0].address;
  auto server =
      v1::ExpertServer::NewStub(NewChannel(e0, TransportCredentials::Plaintext(), 256 << 20));
  int64_t bytes = 0;
  absl::Duration best = absl::InfiniteDuration();
  for (int pass = 0; pass < 3; ++pass) {
    bytes = 0;
    const absl::Time start = absl::Now();
    for (int e = 0; e < model.num_experts; ++e) {
      v1::GetExpertWeightsRequest request;
      request.set_expert_id(e);
      grpc::ClientContext context;
      auto reader = server->GetExpertWeights(&context, request);
      v1::ExpertWeightsChunk chunk;
      while (reader->Read(&chunk)) bytes += static_cast<int64_t>(chunk.data().size());
      MOE_CHECK(reader->Finish().ok());
    }
    best = std::min(best, absl::Now() - start);
  }
  const double bandwidth = bytes / absl::ToDoubleSeconds(best);
  const absl::Duration raw = absl::Seconds(bytes / bandwidth);

  // Rejoin by sync.
  const absl::Time restart = absl::Now();
  absl::StatusOr<std::string> log = (*cluster)->RestartServer(1);
  MOE_CHECK(log.ok(), log.status().ToString());
  const absl::Duration until_serving = absl::Now() - restart;
  const absl::Duration sync = SyncTime(*log);

  // SaveCheckpoint under load.
  bench::ForwardLoad load((*cluster)->router_address(), absl::GetFlag(FLAGS_clients), input);
  absl::SleepFor(absl::Seconds(1));  // warm-up, not measured
  const absl::Time before_start = absl::Now();
  absl::SleepFor(absl::GetFlag(FLAGS_phase));  // the clients run meanwhile
  const absl::Time save_start = absl::Now();
  v1::SaveCheckpointRequest save;
  v1::SaveCheckpointResponse saved;
  grpc::ClientContext save_context;
  const grpc::Status save_status = router->SaveCheckpoint(&save_context, save, &saved);
  const absl::Time save_end = absl::Now();
  MOE_CHECK(save_status.ok(), save_status.error_message());
  const std::vector<Sample> samples = load.Stop();
  auto stats = [&](absl::Time from, absl::Time to, double* p50, double* p99, int* n, int* failed) {
    std::vector<double> ms;
    *failed = 0;
    for (const Sample& s : samples) {
      if (s.done < from || s.done > to) continue;
      ms.push_back(s.ms);
      if (!s.ok) ++*failed;
    }
    *p50 = Percentile(ms, 0.5);
    *p99 = Percentile(ms, 0.99);
    *n = static_cast<int>(ms.size());
  };
  double p50[2], p99[2];
  int n[2], failed[2];
  stats(before_start, save_start, &p50[0], &p99[0], &n[0], &failed[0]);
  stats(save_start, save_end, &p50[1], &p99[1], &n[1], &failed[1]);

  const double mib = 1048576.0;
  std::printf("%d experts (d_model %d, d_ff %d), DATA_PARALLEL over 2 servers, %.0f MiB each\n",
              model.num_experts, static_cast<int>(model.d_model), static_cast<int>(model.d_ff),
              bytes / mib);
  std::printf(
      "rejoin by sync: %.1f MiB in %.3f s (%.0f MB/s); raw bytes at the measured one-way gRPC "
      "bandwidth (%.0f MB/s): %.3f s; sync / raw = %.2f (goal <= 1.5); restart to serving %.3f "
      "s\n",
      bytes / mib, absl::ToDoubleSeconds(sync), bytes / absl::ToDoubleSeconds(sync) / 1e6,
      bandwidth / 1e6, absl::ToDoubleSeconds(raw), absl::FDivDuration(sync, raw),
      absl::ToDoubleSeconds(until_serving));
  std::printf("SaveCheckpoint of step %lu: %.1f MiB, %zu shard(s), %.3f s (router's %.3f s)\n",
              static_cast<unsigned long>(saved.step()), saved.bytes() / mib,
              static_cast<size_t>(saved.files_size()), absl::ToDoubleSeconds(save_end - save_start),
              saved.seconds());
  std::printf("%-14s %8s %9s %9s %7s\n", "Forwards", "count", "p50 ms", "p99 ms", "failed");
  std::printf("%-14s %8d %9.1f %9.1f %7d\n", "before", n[0], p50[0], p99[0], failed[0]);
  std::printf("%-14s %8d %9.1f %9.1f %7d\n", "during save", n[1], p50[1], p99[1], failed[1]);
  std::printf("p99 during the save / before: %.2f\n", p99[0] > 0 ? p99[1] / p99[0] : 0.0);
  (*cluster)->Stop();
  return failed[0] + failed[1] == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moe::Run();
}
