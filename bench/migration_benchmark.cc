// Rebalance under load on a real local cluster (router and expert servers,
// each its own process): a gate that routes Zipf-skewed (s = 1.2 over the
// experts, the hottest on the first server), clients sending Forwards all
// along, then Rebalance to the plan the router makes from what it measured.
// Prints, side by side: server max/mean load (measured from the servers'
// own token counters, and their seconds in the forward kernels), tokens/s
// and Forward p50/p99 before and after; both placements; the
// change's bytes, pull, drain and whole time; Forward p99 during the change
// against before; and the longest gap between served requests during it.
//
//   bazel run -c opt //bench:migration_benchmark -- [--d_model=1024 ...]
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "bench/latency.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/placement.h"
#include "common/placement_proto.h"
#include "common/placement_solver.h"
#include "common/tensor_codec.h"
#include "common/transport_credentials.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "proto/router.grpc.pb.h"

ABSL_FLAG(int, d_model, 1024, "Model width.");
ABSL_FLAG(int, d_ff, 4096, "Expert hidden width.");
ABSL_FLAG(int, experts, 16, "Experts.");
ABSL_FLAG(int, servers, 4, "Expert servers (MODEL_PARALLEL to start with).");
ABSL_FLAG(int, tokens, 64, "Tokens per Forward.");
ABSL_FLAG(int, clients, 4, "Concurrent clients.");
ABSL_FLAG(double, zipf, 1.2, "Zipf exponent of the experts' routing share.");
ABSL_FLAG(absl::Duration, phase, absl::Seconds(8), "Length of the before and after phases.");
ABSL_FLAG(std::string, work_dir, "/tmp/moe_migration_benchmark", "Config and checkpoint.");
ABSL_FLAG(std::vector<std::string>, router_flags, {},
          "More router flags (e.g. --migration_bytes_per_second=0).");

namespace moe {
namespace {

// The constant first feature of every token: the gate's first row turns it
// into a Zipf prior over the experts.
constexpr float kBias = 8.0f;

using bench::Percentile;
using bench::Sample;

// Sum of moe_expert_tokens_total on a server's /metrics.
// The sum of every sample of `metric` (its name, and the start of its
// labels) on the /metrics page at `metrics_port`.
double MetricSum(int metrics_port, const std::string& metric) {
  const std::string text = local::HttpGet(metrics_port, "/metrics");
  const std::string needle = "\n" + metric;
  double total = 0;
  size_t at = 0;
  while ((at = text.find(needle, at)) != std::string::npos) {
    const size_t space = text.find(' ', text.find('}', at));
    const size_t end = text.find('\n', space + 1);
    double value = 0;
    if (absl::SimpleAtod(text.substr(space + 1, end - space - 1), &value)) total += value;
    at = end;
  }
  return total;
}

double Imbalance(const std::vector<double>& loads) {
  double sum = 0, max = 0;
  for (double l : loads) {
    sum += l;
    max = std::max(max, l);
  }
  return sum > 0 ? max / (sum / loads.size()) : 1;
}

int Run() {
  ModelConfig model;
  model.d_model = absl::GetFlag(FLAGS_d_model);
  model.d_ff = absl::GetFlag(FLAGS_d_ff);
  model.num_experts = absl::GetFlag(FLAGS_experts);
  model.top_k = 2;
  model.seed = 1;
  const int num_servers = absl::GetFlag(FLAGS_servers);
  const std::string dir = absl::GetFlag(FLAGS_work_dir);
  std::filesystem::create_directories(dir);

  // The gate: the first row adds log(1 / (e + 1)^s) to expert e's logit
  // (tokens carry kBias there); the other rows add noise of about a
  // Gumbel's spread (std 1.28), so each token picks an expert with
  // roughly Zipf probabilities (the Gumbel-max trick), not always the
  // same two.
  MoeWeights weights = InitAllWeights(model);
  std::mt19937 gate_rng(7);
  const double noise = 1.28 * std::sqrt(3.0 / (model.d_model - 1));
  std::normal_distribution<float> normal(0.0f, static_cast<float>(noise));
  absl::Span<float> gate = weights.gate->mutable_values();
  for (int e = 0; e < model.num_experts; ++e) {
    gate[e] = static_cast<float>(-absl::GetFlag(FLAGS_zipf) * std::log(e + 1.0) / kBias);
  }
  for (size_t i = model.num_experts; i < gate.size(); ++i) gate[i] = normal(gate_rng);
  const std::string checkpoint = dir + "/zipf.safetensors";
  MOE_CHECK(SaveCheckpoint(checkpoint, model, weights, DType::kFloat32).ok());

  local::LocalClusterOptions options;
  options.config.model = model;
  for (int s = 0; s < num_servers; ++s) {
    options.config.cluster.servers.push_back({absl::StrCat("e", s), "127.0.0.1:0"});
  }
  options.config.cluster.strategy = PlacementStrategy::kModelParallel;
  options.checkpoint_path = checkpoint;
  options.onednn_threads = 1;
  options.work_dir = dir;
  options.router_flags = absl::GetFlag(FLAGS_router_flags);
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  MOE_CHECK(cluster.ok(), cluster.status().ToString());
  auto stub = v1::Router::NewStub(
      NewChannel((*cluster)->router_address(), TransportCredentials::Plaintext(), 256 << 20));

  // Clients, all along.
  const int tokens = absl::GetFlag(FLAGS_tokens);
  bench::ForwardLoad load((*cluster)->router_address(), absl::GetFlag(FLAGS_clients),
                          [&](std::mt19937& rng) {
                            std::uniform_real_distribution<float> uniform(-1, 1);
                            FloatTensor x({tokens, model.d_model});
                            for (int64_t t = 0; t < tokens; ++t) {
                              absl::Span<float> row = x.mutable_row(t);
                              for (float& v : row) v = uniform(rng);
                              row[0] = kBias;
                            }
                            return x;
                          });
  // Each server's tokens and seconds in its forward kernels so far.
  auto server_counts = [&](const std::string& metric) {
    std::vector<double> t;
    for (int port : (*cluster)->server_metrics_ports()) t.push_back(MetricSum(port, metric));
    return t;
  };
  const std::string kTokens = "moe_expert_tokens_total{";
  const std::string kKernelSeconds = "moe_expert_kernel_seconds_sum{op=\"forward\"";
  struct Phase {
    absl::Time start, end;
    std::vector<double> load, kernel_seconds;
  };
  auto run_phase = [&] {
    Phase p;
    const std::vector<double> tokens = server_counts(kTokens);
    const std::vector<double> seconds = server_counts(kKernelSeconds);
    p.start = absl::Now();
    absl::SleepFor(absl::GetFlag(FLAGS_phase));  // the clients run meanwhile
    p.end = absl::Now();
    const std::vector<double> tokens_after = server_counts(kTokens);
    const std::vector<double> seconds_after = server_counts(kKernelSeconds);
    for (size_t s = 0; s < tokens.size(); ++s) {
      p.load.push_back(tokens_after[s] - tokens[s]);
      p.kernel_seconds.push_back(seconds_after[s] - seconds[s]);
    }
    return p;
  };
  absl::SleepFor(absl::Seconds(2));  // warm-up, not measured
  const Phase before = run_phase();

  // What a fresh solve (EPLB re-solves from scratch) would copy for the
  // same load, against the placement serving now.
  int64_t fresh_replicas = 0;
  {
    v1::ClusterState state;
    grpc::ClientContext state_context;
    MOE_CHECK(stub->GetClusterState(&state_context, {}, &state).ok());
    PlacementProblem problem;
    problem.num_servers = num_servers;
    problem.load.emplace_back();
    for (const v1::ExpertLoad& e : state.experts()) {
      problem.load[0].push_back(static_cast<double>(e.tokens()));
    }
    const Placement current = ModelParallelPlacement(model.num_experts, num_servers);
    problem.server_slots.assign(
        num_servers,
        std::min<int>(model.num_experts, (model.num_experts + num_servers - 1) / num_servers + 1));
    absl::StatusOr<PlacementPlan> fresh = SolvePlacement(problem);
    MOE_CHECK(fresh.ok(), fresh.status().ToString());
    for (int s = 0; s < num_servers; ++s) {
      for (ExpertKey e : fresh->placement.ExpertsOn(s)) fresh_replicas += !current.Holds(s, e);
    }
  }

  v1::RebalanceRequest request;
  v1::RebalanceResponse plan;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  const absl::Time change_start = absl::Now();
  const grpc::Status status = stub->Rebalance(&context, request, &plan);
  const absl::Time change_end = absl::Now();
  MOE_CHECK(status.ok(), status.error_message());
  const Phase after = run_phase();
  const std::vector<Sample> samples = load.Stop();

  // Requests that ended in a window, and the longest time with none ending.
  auto stats = [&](absl::Time from, absl::Time to, double* p50, double* p99, double* tps,
                   double* gap, int* failed) {
    std::vector<double> ms;
    absl::Time last = from;
    double longest = 0;
    *failed = 0;
    for (const Sample& s : samples) {
      if (s.done < from || s.done > to) continue;
      ms.push_back(s.ms);
      if (!s.ok) ++*failed;
      longest = std::max(longest, absl::ToDoubleMilliseconds(s.done - last));
      last = s.done;
    }
    longest = std::max(longest, absl::ToDoubleMilliseconds(to - last));
    *p50 = Percentile(ms, 0.5);
    *p99 = Percentile(ms, 0.99);
    *tps = ms.size() * tokens / absl::ToDoubleSeconds(to - from);
    *gap = longest;
  };
  double p50[3], p99[3], tps[3], gap[3];
  int failed[3];
  stats(before.start, before.end, &p50[0], &p99[0], &tps[0], &gap[0], &failed[0]);
  stats(change_start, change_end, &p50[1], &p99[1], &tps[1], &gap[1], &failed[1]);
  stats(after.start, after.end, &p50[2], &p99[2], &tps[2], &gap[2], &failed[2]);

  std::printf(
      "%d experts (d_model %d, d_ff %d) on %d servers, top-2, Zipf s = %.2f, %d clients x "
      "%d tokens\n",
      model.num_experts, static_cast<int>(model.d_model), static_cast<int>(model.d_ff), num_servers,
      absl::GetFlag(FLAGS_zipf), absl::GetFlag(FLAGS_clients), tokens);
  auto loads = [](const std::vector<double>& l) {
    std::string out;
    for (double v : l) absl::StrAppend(&out, static_cast<int64_t>(v), " ");
    return out;
  };
  std::printf("%-8s %10s %9s %9s %9s %10s  %s\n", "phase", "tokens/s", "p50 ms", "p99 ms", "gap ms",
              "max/mean", "server tokens (measured)");
  std::printf("%-8s %10.0f %9.1f %9.1f %9.1f %10.3f  %s\n", "before", tps[0], p50[0], p99[0],
              gap[0], Imbalance(before.load), loads(before.load).c_str());
  std::printf(
      "%-8s %10.0f %9.1f %9.1f %9.1f %10s  (gap: longest time with no answer; goal "
      "<= 50 ms)\n",
      "change", tps[1], p50[1], p99[1], gap[1], "");
  std::printf("%-8s %10.0f %9.1f %9.1f %9.1f %10.3f  %s\n", "after", tps[2], p50[2], p99[2], gap[2],
              Imbalance(after.load), loads(after.load).c_str());
  // The router gives a pair to the replica with the fewest tokens
  // outstanding, which balances the servers' time rather than their tokens:
  // a server whose experts get more rows per call spends less per token.
  auto seconds = [](const std::vector<double>& l) {
    std::string out;
    for (double v : l) absl::StrAppend(&out, absl::StrFormat("%.2f ", v));
    return out;
  };
  std::printf("server kernel seconds: before %s(max/mean %.3f), after %s(max/mean %.3f)\n",
              seconds(before.kernel_seconds).c_str(), Imbalance(before.kernel_seconds),
              seconds(after.kernel_seconds).c_str(), Imbalance(after.kernel_seconds));
  std::printf(
      "plan: imbalance %.3f -> %.3f predicted; %d replicas added, %d removed, %.1f MiB "
      "pulled in %.3f s, drain %.3f s, %.3f s in all (epoch %lu)\n",
      plan.imbalance_before(), plan.imbalance_after(), plan.experts_moved(),
      plan.replicas_removed(), plan.bytes_moved() / 1048576.0, plan.pull_seconds(),
      plan.drain_seconds(), plan.seconds(), static_cast<unsigned long>(plan.placement_epoch()));
  std::printf("replicas copied: %d (a fresh solve of the same load, as EPLB re-solves: %ld)\n",
              plan.experts_moved(), static_cast<long>(fresh_replicas));
  // Both placements, as bench/scaling_model.py --placement_before/after
  // reads them: each server's experts, servers separated by '|'.
  auto experts_by_server = [&](const Placement& placement) {
    std::vector<std::string> servers;
    for (int s = 0; s < num_servers; ++s) {
      std::vector<int> experts;
      for (ExpertKey e : placement.ExpertsOn(s)) experts.push_back(e.expert);
      servers.push_back(absl::StrJoin(experts, ","));
    }
    return absl::StrJoin(servers, "|");
  };
  absl::StatusOr<Placement> planned =
      PlacementFromProto(plan.placement(), model, options.config.cluster, "placement");
  MOE_CHECK(planned.ok(), planned.status().ToString());
  std::printf("placement before: %s\nplacement after: %s\n",
              experts_by_server(ModelParallelPlacement(model.num_experts, num_servers)).c_str(),
              experts_by_server(*planned).c_str());
  std::printf(
      "p99 during the change / before: %.2f (goal <= 1.2); failed requests: %d before, %d "
      "during, %d after\n",
      p99[0] > 0 ? p99[1] / p99[0] : 0.0, failed[0], failed[1], failed[2]);
  // The routing the gate gave, from the router's counters.
  const std::string metrics = local::HttpGet((*cluster)->router_metrics_port(), "/metrics");
  std::vector<double> share(model.num_experts, 0);
  for (int e = 0; e < model.num_experts; ++e) {
    const std::string key = absl::StrCat("moe_router_expert_tokens_total{expert=\"", e, "\"} ");
    const size_t at = metrics.find(key);
    if (at != std::string::npos) {
      (void)absl::SimpleAtod(
          metrics.substr(at + key.size(), metrics.find('\n', at) - at - key.size()), &share[e]);
    }
  }
  double all = 0;
  for (double v : share) all += v;
  std::printf("routing share per expert:");
  for (double v : share) std::printf(" %.3f", all > 0 ? v / all : 0.0);
  std::printf("\n");
  return failed[0] + failed[1] + failed[2] == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moe::Run();
}
