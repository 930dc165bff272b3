// moe_loadgen: load against a running router, in the spirit of Triton's
// perf_analyzer. For each concurrency x batch size, closed-loop clients send
// Forward requests (unary, or with --streaming over one ForwardStream each)
// for a duration and the tool prints throughput and
// latency percentiles; --compare_local runs the same layer in this process
// (same gate, same oneDNN kernels, no network) on the same shapes in the
// same run, alternating with the cluster in --rounds rounds, and prints the
// median remote/local and its spread.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "clients/cpp/load_generator.h"
#include "clients/cpp/local_moe_layer.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/mutex_checks.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, router, "127.0.0.1:50051", "The router's host:port.");
ABSL_FLAG(std::string, config, "", "The cluster's serving config (required).");
ABSL_FLAG(std::string, checkpoint, "", "The cluster's checkpoint (for --compare_local).");
ABSL_FLAG(std::string, concurrency, "1,4", "Comma-separated client counts.");
ABSL_FLAG(std::string, batch, "1,64,512", "Comma-separated tokens per request.");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(5), "Time per measurement.");
ABSL_FLAG(int64_t, requests, 0, "With > 0: requests per measurement instead of --duration.");
ABSL_FLAG(std::string, dtype, "fp32", "Wire dtype, and the local layer's kernels: fp32 or bf16.");
ABSL_FLAG(bool, streaming, false,
          "Each client sends over one long-lived ForwardStream instead of unary Forward calls.");
ABSL_FLAG(std::string, layer, "0",
          "Comma-separated MoE layers; each client's requests cycle through them.");
ABSL_FLAG(bool, compare_local, false, "Also run the in-process layer and print remote/local.");
ABSL_FLAG(std::string, local_dtype, "",
          "The local layer's kernels when they differ from --dtype (fp32 clients of bf16 "
          "servers: --dtype=fp32 --local_dtype=bf16); empty: --dtype.");
ABSL_FLAG(int, local_threads, 0, "oneDNN threads of the local layer; 0: all cores.");
ABSL_FLAG(int, rounds, 5,
          "With --compare_local: rounds per point, each the local layer then the cluster for "
          "--duration; the point is the rounds' median (and the ratio's spread).");
ABSL_FLAG(bool, rpc_floor, true,
          "At batch 1, also measure gRPC's own unary round trip to the router (health Checks, "
          "after each round's load) and print the p50 against 2 round trips + 50 us.");
ABSL_FLAG(int, warm_up_requests, 1,
          "Requests each client sends before a measurement's clock starts, not counted (the "
          "local layer's first call is not counted either).");
ABSL_FLAG(std::string, json, "", "Also write the results to this JSON file.");

namespace moe::client {
namespace {

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& text, const char* flag) {
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": bad value \"", part, "\""));
    }
    values.push_back(v);
  }
  if (values.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return values;
}

// The median of `values` (the mean of the middle two for an even count).
double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

struct LocalFigures {
  double tokens_per_second = 0;
  double p50 = 0, p99 = 0;
};

LocalFigures MeasureLocal(const LocalMoeLayer& layer, int64_t batch, int64_t d_model,
                          absl::Duration duration) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  FloatTensor x({batch, d_model});
  for (float& v : x.mutable_values()) v = dist(rng);
  (void)layer.Forward(x);  // warm up: primitives, caches
  std::vector<double> latencies;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < duration || latencies.size() < 3) {
    const absl::Time t = absl::Now();
    (void)layer.Forward(x);
    latencies.push_back(absl::ToDoubleSeconds(absl::Now() - t));
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::sort(latencies.begin(), latencies.end());
  LoadReport as_report;
  as_report.latencies = latencies;
  return {latencies.size() * batch / seconds, as_report.Percentile(50), as_report.Percentile(99)};
}

int Run() {
  absl::StatusOr<ServingConfig> config = LoadServingConfig(absl::GetFlag(FLAGS_config));
  if (!config.ok()) {
    MOE_LOG(ERROR, "--config: ", config.status().message());
    return 2;
  }
  absl::StatusOr<std::vector<int64_t>> concurrency =
      ParseList(absl::GetFlag(FLAGS_concurrency), "concurrency");
  absl::StatusOr<std::vector<int64_t>> batches = ParseList(absl::GetFlag(FLAGS_batch), "batch");
  absl::StatusOr<std::vector<int64_t>> layers = ParseList(absl::GetFlag(FLAGS_layer), "layer");
  for (const auto* list : {&concurrency, &batches, &layers}) {
    if (!list->ok()) {
      MOE_LOG(ERROR, list->status().message());
      return 2;
    }
  }
  for (int64_t layer : *layers) {
    if (layer >= config->model.num_layers) {
      MOE_LOG(ERROR, "--layer: the model has ", config->model.num_layers, " layer(s), not ",
              layer + 1);
      return 2;
    }
  }
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  if (dtype_name != "fp32" && dtype_name != "bf16") {
    MOE_LOG(ERROR, "--dtype must be fp32 or bf16");
    return 2;
  }
  const DType dtype = dtype_name == "bf16" ? DType::kBFloat16 : DType::kFloat32;
  const std::string local_dtype_name =
      absl::GetFlag(FLAGS_local_dtype).empty() ? dtype_name : absl::GetFlag(FLAGS_local_dtype);
  if (local_dtype_name != "fp32" && local_dtype_name != "bf16") {
    MOE_LOG(ERROR, "--local_dtype must be fp32 or bf16");
    return 2;
  }
  const DType local_dtype = local_dtype_name == "bf16" ? DType::kBFloat16 : DType::kFloat32;
  const ModelConfig& model = config->model;

  std::unique_ptr<LocalMoeLayer> local;
  if (absl::GetFlag(FLAGS_compare_local)) {
    MoeWeights weights;
    if (absl::GetFlag(FLAGS_checkpoint).empty()) {
      weights = InitAllWeights(model);
    } else {
      absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(absl::GetFlag(FLAGS_checkpoint), model);
      if (!loaded.ok()) {
        MOE_LOG(ERROR, loaded.status().message());
        return 2;
      }
      weights = *std::move(loaded);
    }
    absl::StatusOr<std::unique_ptr<LocalMoeLayer>> layer = LocalMoeLayer::Create(
        model, std::move(weights), local_dtype, absl::GetFlag(FLAGS_local_threads));
    if (!layer.ok()) {
      MOE_LOG(ERROR, layer.status().message());
      return 1;
    }
    local = *std::move(layer);
  }
  absl::StatusOr<TransportCredentials> credentials = TransportCredentials::FromFlags();
  if (!credentials.ok()) {
    MOE_LOG(ERROR, credentials.status().message());
    return 2;
  }
  auto client = MoeClient::Connect(absl::GetFlag(FLAGS_router), *credentials);
  if (absl::Status healthy = client->WaitUntilHealthy(absl::Seconds(30)); !healthy.ok()) {
    MOE_LOG(ERROR, healthy.message());
    return 1;
  }

  nlohmann::json results = nlohmann::json::array();
  std::printf("%5s %6s %12s %10s %9s %9s %9s", "conc", "batch", "tokens/s", "req/s", "p50 ms",
              "p90 ms", "p99 ms");
  if (local) {
    std::printf(" %12s %8s %13s %12s %12s", "local tok/s", "ratio", "ratio spread", "+p50 us",
                "+p99 us");
  }
  std::printf("\n");
  bool failed = false;
  // With --compare_local, each point is measured in rounds, local then
  // remote, and reported by the median of the rounds (the machine's noise
  // moves single points by 10-30%).
  const int rounds = local ? std::max(1, absl::GetFlag(FLAGS_rounds)) : 1;
  for (int64_t batch : *batches) {
    for (int64_t clients : *concurrency) {
      LoadOptions load;
      load.concurrency = static_cast<int>(clients);
      load.batch_tokens = batch;
      load.d_model = model.d_model;
      load.duration = absl::GetFlag(FLAGS_duration);
      load.requests = absl::GetFlag(FLAGS_requests);
      load.wire_dtype = dtype;
      load.streaming = absl::GetFlag(FLAGS_streaming);
      load.layers.assign(layers->begin(), layers->end());
      load.credentials = *credentials;
      load.warm_up_requests = std::max(0, absl::GetFlag(FLAGS_warm_up_requests));
      std::vector<double> remote_rate, request_rate, p50, p90, p99, local_rate, local_p50,
          local_p99, ratios, round_trip_p50;
      const bool floor = batch == 1 && absl::GetFlag(FLAGS_rpc_floor);
      int64_t requests = 0, failures = 0;
      for (int round = 0; round < rounds; ++round) {
        LocalFigures local_figures;
        if (local) {
          local_figures = MeasureLocal(*local, batch, model.d_model, absl::GetFlag(FLAGS_duration));
        }
        absl::StatusOr<LoadReport> report =
            RunLoad(absl::GetFlag(FLAGS_router), load, model.num_experts);
        if (!report.ok()) {
          MOE_LOG(ERROR, report.status().message());
          return 1;
        }
        if (report->failures > 0) {
          failed = true;
          MOE_LOG(WARNING, report->failures, " failed requests: ", report->first_error);
        }
        requests += report->requests;
        failures += report->failures;
        if (floor) {
          absl::StatusOr<LoadReport> trips = RunRoundTrips(
              absl::GetFlag(FLAGS_router), absl::GetFlag(FLAGS_duration) / 4, *credentials);
          if (!trips.ok()) {
            MOE_LOG(ERROR, "health Check round trips: ", trips.status().message());
            return 1;
          }
          round_trip_p50.push_back(trips->Percentile(50));
        }
        remote_rate.push_back(report->tokens_per_second());
        request_rate.push_back(report->requests_per_second());
        p50.push_back(report->Percentile(50));
        p90.push_back(report->Percentile(90));
        p99.push_back(report->Percentile(99));
        if (local) {
          local_rate.push_back(local_figures.tokens_per_second);
          local_p50.push_back(local_figures.p50);
          local_p99.push_back(local_figures.p99);
          ratios.push_back(report->tokens_per_second() / local_figures.tokens_per_second);
        }
      }
      const double rate = Median(remote_rate);
      std::printf("%5ld %6ld %12.0f %10.1f %9.3f %9.3f %9.3f", static_cast<long>(clients),
                  static_cast<long>(batch), rate, Median(request_rate), 1e3 * Median(p50),
                  1e3 * Median(p90), 1e3 * Median(p99));
      nlohmann::json row = {
          {"concurrency", clients},       {"batch", batch},
          {"dtype", dtype_name},          {"local_dtype", local_dtype_name},
          {"streaming", load.streaming},  {"rounds", rounds},
          {"requests", requests},         {"failures", failures},
          {"tokens_per_second", rate},    {"requests_per_second", Median(request_rate)},
          {"latency_p50_s", Median(p50)}, {"latency_p90_s", Median(p90)},
          {"latency_p99_s", Median(p99)}};
      if (local) {
        const auto [low, high] = std::minmax_element(ratios.begin(), ratios.end());
        std::printf(" %12.0f %8.3f %6.3f-%-6.3f %12.0f %12.0f", Median(local_rate), Median(ratios),
                    *low, *high, 1e6 * (Median(p50) - Median(local_p50)),
                    1e6 * (Median(p99) - Median(local_p99)));
        row["local_tokens_per_second"] = Median(local_rate);
        row["remote_over_local"] = Median(ratios);
        row["remote_over_local_min"] = *low;
        row["remote_over_local_max"] = *high;
        row["remote_over_local_rounds"] = ratios;
        row["local_latency_p50_s"] = Median(local_p50);
        row["local_latency_p99_s"] = Median(local_p99);
      }
      std::printf("\n");
      if (floor) {
        // The hot path's floor: a batch-1 Forward crosses two gRPC hops
        // (client to router, router to the servers).
        const double trip = Median(round_trip_p50);
        const double goal = 2 * trip + 50e-6;
        std::printf(
            "      batch 1 (%s): p50 %.0f us; gRPC's unary round trip p50 %.0f us; "
            "2 round trips + 50 us = %.0f us (p50 %s)\n",
            load.streaming ? "ForwardStream" : "unary Forward", 1e6 * Median(p50), 1e6 * trip,
            1e6 * goal, Median(p50) <= goal ? "within" : "above");
        row["rpc_round_trip_p50_s"] = trip;
        row["rpc_round_trip_p50_rounds_s"] = round_trip_p50;
      }
      std::fflush(stdout);
      results.push_back(row);
    }
  }
  if (!absl::GetFlag(FLAGS_json).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_json)) << results.dump(2) << "\n";
  }
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace moe::client

int main(int argc, char** argv) {
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "Puts load on a moe-serve router and prints throughput and latency.\n"
      "Usage: moe_loadgen --router=host:port --config=serving.pbtxt [--compare_local]");
  absl::ParseCommandLine(argc, argv);
  return moe::client::Run();
}
