// moe_local: a moe-serve cluster on this machine. Starts the router and N
// expert servers as separate processes on free loopback ports, waits until
// they serve, runs a load through the router, prints what happened, and
// shuts everything down (or, with --serve, keeps it up until Ctrl-C).
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "clients/cpp/load_generator.h"
#include "clients/cpp/moe_client.h"
#include "common/expert_key.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/mutex_checks.h"
#include "common/placement.h"
#include "common/stop_signals.h"
#include "common/test_ca.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "proto/expert.grpc.pb.h"

ABSL_FLAG(std::string, config, "",
          "A serving config to run (its server addresses are replaced by free ports); "
          "empty: built from the flags below.");
ABSL_FLAG(std::string, strategy, "HYBRID",
          "DATA_PARALLEL, MODEL_PARALLEL, HYBRID or DYNAMIC (without --config).");
ABSL_FLAG(int, servers, 2, "Expert servers (without --config).");
ABSL_FLAG(int, experts, 8, "Experts per layer (without --config).");
ABSL_FLAG(int, shared_expert_d_ff, 0,
          "With --activation=silu_gated: a Qwen2-MoE shared expert of this hidden width (a "
          "multiple of --d_ff) in every layer; 0: none.");
ABSL_FLAG(int, layers, 1,
          "MoE layers served by the one cluster (without --config); the load and the training "
          "steps run every layer.");
ABSL_FLAG(int, d_model, 256, "Model width (without --config).");
ABSL_FLAG(int, d_ff, 1024, "Expert hidden width (without --config).");
ABSL_FLAG(int, top_k, 2, "Experts per token (without --config).");
ABSL_FLAG(std::string, activation, "relu",
          "Experts: relu (ReLU(x W1 + b1) W2 + b2) or silu_gated ((SiLU(x W1) * x W3) W2, "
          "Mixtral's) (without --config).");
ABSL_FLAG(double, capacity_factor, 1.25,
          "Capacity factor with OVERFLOW_POLICY_DROP; 0 means DROPLESS (without --config).");
ABSL_FLAG(std::string, checkpoint, "",
          "Checkpoint to serve: a safetensors file or a sharded step-N directory; empty: "
          "seeded init.");
ABSL_FLAG(bool, tls, false,
          "Mutual TLS between every process and the load's clients, with a throwaway CA made "
          "at run time in the work directory (openssl); overrides --transport_security.");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "If set, the processes save checkpoints here (Router.SaveCheckpoint), and one is "
          "saved after the training steps.");
ABSL_FLAG(std::string, dtype, "fp32", "Expert kernel dtype: fp32 or bf16.");
ABSL_FLAG(int, onednn_threads, 1,
          "oneDNN threads per expert server (0: every CPU the server may use; with "
          "--pin_cpus, its block).");
ABSL_FLAG(bool, pin_cpus, false,
          "Pin each process to CPUs of its own, from the CPUs moe_local may use in order: "
          "the router --router_cpus, then each expert server --server_cpus (the load "
          "generator, this process, is not pinned). Fewer CPUs than asked: the blocks wrap "
          "around and share (a warning says so).");
ABSL_FLAG(int, router_cpus, 1, "With --pin_cpus: the router's CPUs.");
ABSL_FLAG(int, server_cpus, 0,
          "With --pin_cpus: each expert server's CPUs (0: what the router leaves, split "
          "evenly, at least one each).");
ABSL_FLAG(int, concurrency, 4, "Clients, each with one request in flight.");
ABSL_FLAG(int64_t, batch, 256, "Tokens per request.");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(5), "How long to run the load.");
ABSL_FLAG(int, train_steps, 3,
          "After the load, training steps to run (Forward, Backward, Step); 0: none.");
ABSL_FLAG(float, learning_rate, 0.01f, "Learning rate of those steps.");
ABSL_FLAG(bool, serve, false, "After the load, keep the cluster up until Ctrl-C.");
ABSL_FLAG(std::vector<std::string>, server_flags, {},
          "More flags for every expert server, comma-separated, e.g. "
          "--server_flags=--batch_window=2ms,--max_batch_rows=8192 (expert_server --help); "
          "not the ones moe_local sets (--config, --port, --dtype, ...).");
ABSL_FLAG(std::vector<std::string>, router_flags, {},
          "More flags for the router, comma-separated (router --help).");
ABSL_FLAG(std::string, prometheus_targets, "",
          "Also write the processes' /metrics addresses to this Prometheus file_sd "
          "file (deploy/prometheus/prometheus.yml reads /tmp/moe-serve/targets.json).");

namespace moe::local {
namespace {

absl::StatusOr<ServingConfig> ConfigFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_config);
  if (!path.empty()) return LoadServingConfig(path);
  v1::ServingConfig proto;
  v1::ModelConfig* model = proto.mutable_model();
  model->set_d_model(absl::GetFlag(FLAGS_d_model));
  model->set_d_ff(absl::GetFlag(FLAGS_d_ff));
  model->set_num_experts(absl::GetFlag(FLAGS_experts));
  model->set_num_layers(absl::GetFlag(FLAGS_layers));
  model->set_shared_expert_d_ff(absl::GetFlag(FLAGS_shared_expert_d_ff));
  model->set_top_k(absl::GetFlag(FLAGS_top_k));
  model->set_seed(42);
  const std::string activation = absl::GetFlag(FLAGS_activation);
  if (activation == "silu_gated") {
    model->set_activation(v1::EXPERT_ACTIVATION_SILU_GATED);
  } else if (activation != "relu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--activation: relu or silu_gated, got \"", activation, "\""));
  }
  if (absl::GetFlag(FLAGS_capacity_factor) > 0) {
    model->set_overflow_policy(v1::OVERFLOW_POLICY_DROP);
    model->set_capacity_factor(absl::GetFlag(FLAGS_capacity_factor));
  }
  v1::ClusterConfig* cluster = proto.mutable_cluster();
  for (int s = 0; s < absl::GetFlag(FLAGS_servers); ++s) {
    v1::ServerSpec* server = cluster->add_servers();
    server->set_name(absl::StrCat("expert-", s));
    server->set_address("127.0.0.1:0");  // replaced by a free port
  }
  const std::string strategy = absl::GetFlag(FLAGS_strategy);
  v1::PlacementStrategy value;
  if (!v1::PlacementStrategy_Parse("PLACEMENT_STRATEGY_" + strategy, &value) ||
      value == v1::PLACEMENT_STRATEGY_EXPLICIT || value == v1::PLACEMENT_STRATEGY_UNSPECIFIED) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--strategy: \"", strategy, "\" (want DATA_PARALLEL, MODEL_PARALLEL, HYBRID or DYNAMIC)"));
  }
  cluster->set_strategy(value);
  if (value == v1::PLACEMENT_STRATEGY_DYNAMIC) {
    // A skewed profile: expert 0 is hot (and a shared expert's slices, which
    // every token visits, hotter).
    const int shared_slices = model->d_ff() > 0 ? model->shared_expert_d_ff() / model->d_ff() : 0;
    for (int e = 0; e < model->num_experts() + shared_slices; ++e) {
      cluster->mutable_load_profile()->add_expert_load(e >= model->num_experts() ? 8.0
                                                       : e == 0                  ? 4.0
                                                                                 : 1.0);
    }
  }
  // Distinct names need distinct (placeholder) addresses to validate.
  for (int s = 0; s < cluster->servers_size(); ++s) {
    cluster->mutable_servers(s)->set_address(absl::StrCat("127.0.0.1:", 1 + s));
  }
  return ServingConfigFromProto(proto);
}

// Sum of moe_expert_tokens_total over an expert server's /metrics.
double ServerTokens(int metrics_port) {
  double total = 0;
  for (absl::string_view line : absl::StrSplit(HttpGet(metrics_port, "/metrics"), '\n')) {
    if (!absl::StartsWith(line, "moe_expert_tokens_total{")) continue;
    double value = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &value)) total += value;
  }
  return total;
}

// Each server's expert digests (expert -> digest); false if replicas of an
// expert differ or a server does not answer.
// One certificate for every process (one identity per role would do as
// well here: everything is local), from a CA made now.
absl::StatusOr<TransportCredentials> TestCaCredentials(const std::string& work_dir) {
  absl::StatusOr<TestCertificateAuthority> ca = TestCertificateAuthority::Create(work_dir);
  if (!ca.ok()) return ca.status();
  absl::StatusOr<TlsFiles> files = ca->Issue("moe-serve");
  if (!files.ok()) return files.status();
  return TransportCredentials::Tls(*files, /*require_client_cert=*/true);
}

bool ReplicasIdentical(const ServingConfig& running, const TransportCredentials& credentials,
                       std::map<ExpertKey, uint64_t>& digests) {
  bool identical = true;
  for (const ServerSpec& server : running.cluster.servers) {
    auto stub = v1::ExpertServer::NewStub(NewChannel(server.address, credentials, 4 << 20));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::InfoResponse info;
    if (!stub->Info(&context, v1::InfoRequest(), &info).ok()) return false;
    for (const v1::ExpertDigest& d : info.experts()) {
      auto [it, first] = digests.emplace(ExpertKeyOf(d), d.weights_digest());
      identical = identical && it->second == d.weights_digest();
    }
  }
  return identical;
}

// Training steps on random tokens: Forward(training) and Backward on every
// layer, then Step; then whether every expert's replicas hold the same
// bits. False on a failure.
bool Train(client::MoeClient& client, const ServingConfig& running,
           const TransportCredentials& credentials, int steps, int64_t batch_tokens,
           float learning_rate) {
  std::printf("\ntraining    %d steps of %ld tokens (Forward, Backward, Step), lr %g\n", steps,
              static_cast<long>(batch_tokens), learning_rate);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int64_t d_model = running.model.d_model;
  for (int i = 0; i < steps; ++i) {
    const absl::Time start = absl::Now();
    absl::Status passes;
    for (int layer = 0; passes.ok() && layer < running.model.num_layers; ++layer) {
      FloatTensor x({batch_tokens, d_model}), dy({batch_tokens, d_model});
      for (float& v : x.mutable_values()) v = normal(rng);
      for (float& v : dy.mutable_values()) v = normal(rng);
      client::ForwardOptions forward;
      forward.training = true;
      forward.layer = layer;
      absl::StatusOr<client::ForwardOutput> y = client.Forward(x, forward);
      passes = y.ok() ? client.Backward(y->request_id, dy).status() : y.status();
    }
    const absl::Time backward_done = absl::Now();
    absl::StatusOr<client::StepOutput> step =
        passes.ok() ? client.Step(learning_rate) : absl::StatusOr<client::StepOutput>(passes);
    if (!step.ok()) {
      std::printf("  step failed: %s\n", std::string(step.status().message()).c_str());
      return false;
    }
    std::printf(
        "  step %3lu   forward+backward %7.2f ms   step %7.2f ms: all-reduce %.2f, optimizer "
        "%.2f, commit %.2f\n",
        static_cast<unsigned long>(step->step), absl::ToDoubleMilliseconds(backward_done - start),
        absl::ToDoubleMilliseconds(step->step_time),
        absl::ToDoubleMilliseconds(step->allreduce_time),
        absl::ToDoubleMilliseconds(step->optimizer_time),
        absl::ToDoubleMilliseconds(step->commit_time));
    for (const std::string& behind : step->servers_behind) {
      std::printf("    not confirmed (commits on its peers' word): %s\n", behind.c_str());
    }
    for (const std::string& name : step->servers_left_out) {
      std::printf("    left out (behind the committed step; syncs to it): %s\n", name.c_str());
    }
  }
  std::map<ExpertKey, uint64_t> digests;
  const bool identical = ReplicasIdentical(running, credentials, digests);
  std::printf("  replicas    %s (weight digests of %zu experts from every server's Info)\n",
              identical ? "bit-identical" : "DIFFER", digests.size());
  return identical;
}

std::string Bar(double share, double max_share) {
  return std::string(max_share > 0 ? static_cast<int>(30 * share / max_share) : 0, '#');
}

int Run() {
  absl::StatusOr<ServingConfig> config = ConfigFromFlags();
  if (!config.ok()) {
    MOE_LOG(ERROR, config.status().message());
    return 2;
  }
  char work_dir[] = "/tmp/moe_local.XXXXXX";
  if (mkdtemp(work_dir) == nullptr) {
    MOE_LOG(ERROR, "cannot create a work directory in /tmp");
    return 1;
  }
  LocalClusterOptions options;
  options.config = *config;
  options.checkpoint_path = absl::GetFlag(FLAGS_checkpoint);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  options.dtype = absl::GetFlag(FLAGS_dtype);
  options.onednn_threads = absl::GetFlag(FLAGS_onednn_threads);
  options.server_flags = absl::GetFlag(FLAGS_server_flags);
  options.router_flags = absl::GetFlag(FLAGS_router_flags);
  if (absl::Status extra = CheckExtraFlags(options.server_flags); !extra.ok()) {
    MOE_LOG(ERROR, "--server_flags: ", extra.message());
    return 2;
  }
  if (absl::Status extra = CheckExtraFlags(options.router_flags); !extra.ok()) {
    MOE_LOG(ERROR, "--router_flags: ", extra.message());
    return 2;
  }
  if (absl::GetFlag(FLAGS_pin_cpus)) {
    const std::vector<int> available = AffinityCpus();
    absl::StatusOr<CpuPinning> pinning =
        PlanCpuPinning(available, static_cast<int>(config->cluster.servers.size()),
                       absl::GetFlag(FLAGS_router_cpus), absl::GetFlag(FLAGS_server_cpus));
    if (!pinning.ok()) {
      MOE_LOG(ERROR, "--pin_cpus: ", pinning.status().message());
      return 2;
    }
    if (pinning->shared) {
      MOE_LOG(WARNING, "--pin_cpus: ", available.size(),
              " CPUs are fewer than the blocks asked for; some processes share CPUs");
    }
    options.pinning = *std::move(pinning);
  }
  options.work_dir = work_dir;
  absl::StatusOr<TransportCredentials> credentials =
      absl::GetFlag(FLAGS_tls) ? TestCaCredentials(work_dir) : TransportCredentials::FromFlags();
  if (!credentials.ok()) {
    MOE_LOG(ERROR, credentials.status().message());
    return 2;
  }
  options.credentials = *credentials;
  const ModelConfig& model = config->model;
  std::printf(
      "moe-serve local cluster: %d layer(s) of %d %s experts (d_model %ld, d_ff %ld, top_k %d)%s, "
      "%zu expert servers, %s placement, %s kernels, %s\nstarting...\n",
      model.num_layers, model.num_experts, model.gated() ? "gated SiLU" : "ReLU",
      static_cast<long>(model.d_model), static_cast<long>(model.d_ff), model.top_k,
      model.has_shared_expert()
          ? absl::StrCat(" and a shared expert (experts ", model.num_experts, "-",
                         model.experts_per_layer() - 1, " of each layer)")
                .c_str()
          : "",
      config->cluster.servers.size(),
      std::string(PlacementStrategyName(config->cluster.strategy)).c_str(), options.dtype.c_str(),
      credentials->name().c_str());
  std::fflush(stdout);
  absl::StatusOr<std::unique_ptr<LocalCluster>> cluster = LocalCluster::Start(options);
  if (!cluster.ok()) {
    MOE_LOG(ERROR, cluster.status().message());
    return 1;
  }
  const ServingConfig& running = (*cluster)->config();
  auto client = client::MoeClient::Connect((*cluster)->router_address(), *credentials);
  if (absl::Status healthy = client->WaitUntilHealthy(absl::Seconds(60)); !healthy.ok()) {
    MOE_LOG(ERROR, healthy.message());
    return 1;
  }
  std::printf("\nrouter      %s   metrics http://127.0.0.1:%d/metrics\n",
              (*cluster)->router_address().c_str(), (*cluster)->router_metrics_port());
  const Placement placement = *ComputePlacement(running.model, running.cluster);
  for (size_t s = 0; s < running.cluster.servers.size(); ++s) {
    const std::string experts = JoinExpertKeys(placement.ExpertsOn(s));
    std::printf("%-11s %s   metrics http://127.0.0.1:%d/metrics   experts %s\n",
                running.cluster.servers[s].name.c_str(), running.cluster.servers[s].address.c_str(),
                (*cluster)->server_metrics_ports()[s], experts.c_str());
  }

  if (const std::string targets = absl::GetFlag(FLAGS_prometheus_targets); !targets.empty()) {
    if (absl::Status written = (*cluster)->WritePrometheusTargets(targets); !written.ok()) {
      MOE_LOG(ERROR, written.message());
      return 1;
    }
    std::printf("prometheus  scrape targets in %s\n", targets.c_str());
  }

  client::LoadOptions load;
  load.credentials = *credentials;
  load.concurrency = absl::GetFlag(FLAGS_concurrency);
  load.batch_tokens = absl::GetFlag(FLAGS_batch);
  load.d_model = running.model.d_model;
  load.duration = absl::GetFlag(FLAGS_duration);
  load.layers.clear();
  for (int l = 0; l < running.model.num_layers; ++l) load.layers.push_back(l);
  std::printf("\nload        %d clients x %ld-token requests for %s%s ...\n", load.concurrency,
              static_cast<long>(load.batch_tokens), absl::FormatDuration(load.duration).c_str(),
              running.model.num_layers > 1 ? ", cycling through the layers" : "");
  std::fflush(stdout);
  std::vector<double> before(running.cluster.servers.size());
  for (size_t s = 0; s < before.size(); ++s) before[s] = ServerTokens((*cluster)->server_metrics_ports()[s]);
  absl::StatusOr<client::LoadReport> report =
      client::RunLoad((*cluster)->router_address(), load, running.model.num_experts);
  if (!report.ok()) {
    MOE_LOG(ERROR, report.status().message());
    return 1;
  }
  std::printf("requests    %ld ok, %ld failed%s%s\n", static_cast<long>(report->requests),
              static_cast<long>(report->failures), report->first_error.empty() ? "" : ": ",
              report->first_error.c_str());
  std::printf("throughput  %.0f tokens/s, %.1f requests/s\n", report->tokens_per_second(),
              report->requests_per_second());
  std::printf("latency     p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms\n",
              1e3 * report->Percentile(50), 1e3 * report->Percentile(90),
              1e3 * report->Percentile(99), 1e3 * report->Percentile(100));
  const int64_t pairs = report->tokens * running.model.top_k;
  std::printf("dropped     %ld of %ld pairs (%.2f%%) for capacity\n",
              static_cast<long>(report->dropped_pairs), static_cast<long>(pairs),
              pairs > 0 ? 100.0 * report->dropped_pairs / pairs : 0.0);

  std::printf(running.model.num_layers > 1 ? "\nper expert (pairs served, summed over the layers)\n"
                                           : "\nper expert (pairs served)\n");
  std::vector<double> expert_load(report->expert_tokens.begin(), report->expert_tokens.end());
  const double served = std::accumulate(expert_load.begin(), expert_load.end(), 0.0);
  const double max_expert = *std::max_element(expert_load.begin(), expert_load.end());
  for (size_t e = 0; e < expert_load.size(); ++e) {
    std::printf("  expert %2zu %10.0f %6.1f%%  %s\n", e, expert_load[e],
                served > 0 ? 100 * expert_load[e] / served : 0.0,
                Bar(expert_load[e], max_expert).c_str());
  }
  std::printf("  expert imbalance (max/mean) %.3f\n", Imbalance(expert_load));
  std::printf("per server (token rows run, from each server's /metrics)\n");
  std::vector<double> server_load(before.size());
  for (size_t s = 0; s < before.size(); ++s) {
    server_load[s] = ServerTokens((*cluster)->server_metrics_ports()[s]) - before[s];
  }
  const double max_server = *std::max_element(server_load.begin(), server_load.end());
  for (size_t s = 0; s < server_load.size(); ++s) {
    std::printf("  %-10s %10.0f  %s\n", running.cluster.servers[s].name.c_str(), server_load[s],
                Bar(server_load[s], max_server).c_str());
  }
  std::printf("  server imbalance (max/mean) %.3f\n", Imbalance(server_load));

  bool trained = true;
  if (absl::GetFlag(FLAGS_train_steps) > 0) {
    trained = Train(*client, running, *credentials, absl::GetFlag(FLAGS_train_steps), load.batch_tokens,
                    absl::GetFlag(FLAGS_learning_rate));
  }
  if (trained && !absl::GetFlag(FLAGS_checkpoint_dir).empty()) {
    absl::StatusOr<client::SavedCheckpoint> saved = client->SaveCheckpoint();
    if (saved.ok()) {
      std::printf("\ncheckpoint  step %llu saved to %s: %zu shards, %.1f MiB in %.0f ms\n",
                  static_cast<unsigned long long>(saved->step), saved->directory.c_str(),
                  saved->files.size(), saved->bytes / 1048576.0,
                  absl::ToDoubleMilliseconds(saved->time));
    } else {
      std::printf("\ncheckpoint  FAILED: %s\n", std::string(saved.status().message()).c_str());
      trained = false;
    }
  }

  if (absl::GetFlag(FLAGS_serve)) {
    std::printf("\nserving at %s until Ctrl-C (config %s)\n", (*cluster)->router_address().c_str(),
                (*cluster)->config_path().c_str());
    if (options.credentials.tls_files() != nullptr) {
      // What a client (moe_client, moe_loadgen) needs to connect.
      std::printf("client flags %s\n", absl::StrJoin(options.credentials.AsFlags(), " ").c_str());
    }
    std::fflush(stdout);
    WaitForStopSignal();
  }
  std::printf("\nshutting down\n");
  for (const std::string& line : (*cluster)->Stop()) std::printf("  %s\n", line.c_str());
  return report->failures == 0 && trained ? 0 : 1;
}

}  // namespace
}  // namespace moe::local

int main(int argc, char** argv) {
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "Runs a moe-serve cluster (router + expert servers) on this machine, puts a load "
      "through it and prints a summary.\nUsage: moe_local [--strategy=HYBRID] [--servers=2] "
      "[--serve]");
  absl::ParseCommandLine(argc, argv);
  // Ctrl-C goes to WaitForStopSignal (with --serve), not the default handler.
  moe::BlockStopSignals();
  return moe::local::Run();
}
