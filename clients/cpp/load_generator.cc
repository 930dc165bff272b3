#include "clients/cpp/load_generator.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <thread>

#include "absl/synchronization/mutex.h"

namespace moe::client {
namespace {

// Different batches per client, so routing varies between requests.
constexpr int kDistinctInputs = 4;

}  // namespace

double LoadReport::Percentile(double p) const {
  if (latencies.empty()) return 0;
  // Nearest rank: the smallest value with at least p% of values <= it.
  const double rank = std::ceil(p / 100.0 * latencies.size());
  const size_t index = static_cast<size_t>(std::clamp(rank, 1.0, double(latencies.size()))) - 1;
  return latencies[index];
}

absl::StatusOr<LoadReport> RunLoad(const std::string& router_address, const LoadOptions& options,
                                   int num_experts) {
  if (options.concurrency < 1 || options.batch_tokens < 0 || options.d_model < 1) {
    return absl::InvalidArgumentError("load: need concurrency >= 1, batch >= 0, d_model >= 1");
  }
  LoadReport report;
  report.expert_tokens.assign(num_experts, 0);
  absl::Mutex mu;
  std::atomic<int64_t> started{0};
  // Set by the last client to finish its warm-up; the others wait for it.
  int warmed_up = 0;
  absl::Time start, end;
  std::vector<std::thread> clients;
  for (int c = 0; c < options.concurrency; ++c) {
    clients.emplace_back([&, c] {
      auto client = MoeClient::Connect(router_address, options.credentials);
      std::unique_ptr<ForwardStreamClient> stream;
      if (options.streaming) stream = client->OpenForwardStream();
      // Made before the clock starts and sent in turn: drawing a batch of
      // random tokens costs the client about as much as the router's
      // work on it, and a closed loop would count that as the cluster's.
      std::mt19937_64 rng(options.seed * 1000 + c);
      std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
      std::vector<FloatTensor> inputs;
      for (int i = 0; i < kDistinctInputs; ++i) {
        FloatTensor& x = inputs.emplace_back(Shape{options.batch_tokens, options.d_model});
        for (float& v : x.mutable_values()) v = dist(rng);
      }
      size_t next_input = 0;
      ForwardOptions forward;
      forward.return_routing = true;
      forward.wire_dtype = options.wire_dtype;
      std::vector<double> latencies;
      std::vector<int64_t> expert_tokens(num_experts, 0);
      int64_t ok = 0, failed = 0, dropped = 0;
      size_t next_layer = static_cast<size_t>(c);
      std::string error;
      // One request; `seconds` is its latency.
      auto send = [&](double& seconds) -> absl::StatusOr<ForwardOutput> {
        const FloatTensor& x = inputs[next_input++ % inputs.size()];
        forward.layer = options.layers[next_layer++ % options.layers.size()];
        const absl::Time sent = absl::Now();
        absl::StatusOr<ForwardOutput> out =
            stream != nullptr ? stream->Forward(x, forward) : client->Forward(x, forward);
        seconds = absl::ToDoubleSeconds(absl::Now() - sent);
        if (!out.ok()) {
          ++failed;
          if (error.empty()) error = out.status().ToString();
        }
        return out;
      };
      double seconds = 0;
      for (int w = 0; w < options.warm_up_requests; ++w) (void)send(seconds);
      {
        absl::MutexLock lock(&mu);
        if (++warmed_up == options.concurrency) {
          start = absl::Now();
          end = start + options.duration;
        }
        auto all_warm = [&]() { return warmed_up == options.concurrency; };
        mu.Await(absl::Condition(&all_warm));
      }
      while (true) {
        if (options.requests > 0 ? started.fetch_add(1) >= options.requests : absl::Now() >= end) {
          break;
        }
        absl::StatusOr<ForwardOutput> out = send(seconds);
        if (!out.ok()) continue;
        ++ok;
        latencies.push_back(seconds);
        dropped += out->dropped_pairs;
        for (size_t p = 0; p < out->expert_ids.size(); ++p) {
          const int32_t e = out->expert_ids[p];
          if (!out->dropped[p] && e >= 0 && e < num_experts) ++expert_tokens[e];
        }
      }
      absl::MutexLock lock(&mu);
      report.requests += ok;
      report.failures += failed;
      if (report.first_error.empty()) report.first_error = error;
      report.tokens += ok * options.batch_tokens;
      report.dropped_pairs += dropped;
      report.latencies.insert(report.latencies.end(), latencies.begin(), latencies.end());
      for (int e = 0; e < num_experts; ++e) report.expert_tokens[e] += expert_tokens[e];
    });
  }
  for (std::thread& t : clients) t.join();
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::sort(report.latencies.begin(), report.latencies.end());
  return report;
}

absl::StatusOr<LoadReport> RunRoundTrips(const std::string& router_address, absl::Duration duration,
                                         const TransportCredentials& credentials) {
  auto client = MoeClient::Connect(router_address, credentials);
  // The connection's setup is not a round trip.
  if (absl::Status first = client->HealthCheck(); !first.ok()) return first;
  LoadReport report;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < duration || report.latencies.size() < 3) {
    const absl::Time sent = absl::Now();
    if (absl::Status status = client->HealthCheck(); !status.ok()) {
      ++report.failures;
      if (report.first_error.empty()) report.first_error = status.ToString();
      if (report.failures > 100) return status;
      continue;
    }
    report.latencies.push_back(absl::ToDoubleSeconds(absl::Now() - sent));
    ++report.requests;
  }
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::sort(report.latencies.begin(), report.latencies.end());
  return report;
}

}  // namespace moe::client
