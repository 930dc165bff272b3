// Closed-loop load against a router, in the spirit of Triton's
// perf_analyzer: `concurrency` clients each keep one Forward of
// `batch_tokens` random tokens in flight (unary, or on one ForwardStream
// each) for `duration` (or until `requests` are done). Collects latencies,
// token throughput and the routing the router reports. The clock starts
// once every client has drawn its batches (a few, sent in turn), connected
// and sent its warm-up requests: none of that is the cluster's time.
// Thread-compatible.
#ifndef MOE_CLIENTS_CPP_LOAD_GENERATOR_H_
#define MOE_CLIENTS_CPP_LOAD_GENERATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/cpp/moe_client.h"

namespace moe::client {

struct LoadOptions {
  int concurrency = 4;
  int64_t batch_tokens = 256;
  int64_t d_model = 0;  // required
  absl::Duration duration = absl::Seconds(5);
  // > 0: stop after this many requests in all instead.
  int64_t requests = 0;
  DType wire_dtype = DType::kFloat32;
  // Each client sends over one long-lived ForwardStream instead of unary
  // Forward calls.
  bool streaming = false;
  // The MoE layers requests go to: each client's requests cycle through
  // them, starting at a different one per client, so layers interleave.
  std::vector<int> layers = {0};
  // Requests each client sends before the clock starts, not counted (as a
  // local layer's first call is not: it builds primitives, touches pages).
  int warm_up_requests = 1;
  uint64_t seed = 1;
  TransportCredentials credentials = TransportCredentials::Plaintext();
};

struct LoadReport {
  int64_t requests = 0;
  int64_t failures = 0;
  std::string first_error;
  int64_t tokens = 0;
  double seconds = 0;
  // Sorted latencies of successful requests, in seconds.
  std::vector<double> latencies;
  // Pairs served per expert, from the routing the router returned
  // (summed over the layers).
  std::vector<int64_t> expert_tokens;
  int64_t dropped_pairs = 0;

  double Percentile(double p) const;
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
  double requests_per_second() const { return seconds > 0 ? requests / seconds : 0; }
};

// Runs the load; every client has its own connection.
absl::StatusOr<LoadReport> RunLoad(const std::string& router_address, const LoadOptions& options,
                                   int num_experts);

// gRPC's own floor beside the load: one client's back-to-back health Checks
// (no payload, no work behind them) for `duration`, on a connection of its
// own; the report's latencies are their round trips (tokens stay 0).
absl::StatusOr<LoadReport> RunRoundTrips(const std::string& router_address, absl::Duration duration,
                                         const TransportCredentials& credentials);

}  // namespace moe::client

#endif  // MOE_CLIENTS_CPP_LOAD_GENERATOR_H_
