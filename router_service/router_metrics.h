// The router's Prometheus metrics, built once against a registry. Labels are
// bounded: method names, gRPC code names, layers and expert ids (at most
// kMaxExpertSeries experts). prometheus-cpp
// metrics are thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTER_METRICS_H_
#define MOE_ROUTER_SERVICE_ROUTER_METRICS_H_

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/model_config.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moe::router {

enum class RouterMethod {
  kForward = 0,
  kBackward = 1,
  kStep = 2,
  kSaveCheckpoint = 3,
  kRebalance = 4
};
inline constexpr int kNumRouterMethods = 5;

struct RouterMetrics {
  static std::unique_ptr<RouterMetrics> Create(prometheus::Registry& registry,
                                               const ModelConfig& model);

  // moe_router_requests_total{method, code}.
  std::array<std::array<prometheus::Counter*, 17>, kNumRouterMethods> requests{};
  // moe_router_tokens_total{method} (Forward and Backward; null for Step).
  std::array<prometheus::Counter*, kNumRouterMethods> tokens{};
  // moe_router_request_seconds{method}: end to end, in the router.
  std::array<prometheus::Histogram*, kNumRouterMethods> seconds{};
  // moe_router_phase_seconds{phase="gate"|"fan_out"|"combine"}: a
  // successful Forward's time gating and planning, waiting for the expert
  // servers, and combining their answers.
  prometheus::Histogram* gate_seconds = nullptr;
  prometheus::Histogram* fan_out_seconds = nullptr;
  prometheus::Histogram* combine_seconds = nullptr;
  // moe_router_dispatch_wait_seconds_total{part="all"|"hidden"}: a
  // successful Forward's expert calls' time outside the kernels, and the
  // part of it that ran under another call's compute on the same server
  // (dispatch_overlap.h): hidden / all is the overlap.
  prometheus::Counter* dispatch_wait_seconds = nullptr;
  prometheus::Counter* dispatch_wait_hidden_seconds = nullptr;
  // moe_router_step_allreduce_seconds: a committed step's slowest server's
  // gradient all-reduces.
  prometheus::Histogram* step_allreduce_seconds = nullptr;
  // moe_router_batch_tokens: tokens per Forward.
  prometheus::Histogram* batch_tokens = nullptr;
  // moe_router_expert_tokens_total{expert} (one layer), {layer, expert}
  // (several, up to kMaxExpertSeries experts in all) or {layer} (more):
  // pairs routed to each expert and served.
  static constexpr int kMaxExpertSeries = 4096;
  std::vector<prometheus::Counter*> expert_tokens;
  int num_experts = 0;  // per layer
  bool per_expert = true;
  // Counts layer `layer`'s pairs per expert.
  void CountExpertTokens(int layer, absl::Span<const int64_t> tokens) const;
  // moe_router_dropped_pairs_total: pairs dropped for capacity.
  prometheus::Counter* dropped_pairs = nullptr;
  // moe_router_load_imbalance{over="experts"|"servers"}: max/mean
  // load over the sliding window.
  prometheus::Gauge* expert_imbalance = nullptr;
  prometheus::Gauge* server_imbalance = nullptr;
  // moe_router_placement_epoch: the placement this router routes with.
  prometheus::Gauge* placement_epoch = nullptr;
  // moe_router_rebalance_plan_imbalance{when="before"|"after"} and
  // moe_router_rebalance_plan_bytes: the last Rebalance plan's server
  // imbalance and the bytes it would copy.
  prometheus::Gauge* plan_imbalance_before = nullptr;
  prometheus::Gauge* plan_imbalance_after = nullptr;
  prometheus::Gauge* plan_bytes = nullptr;
  // moe_router_rebalances_total{outcome="committed"|"aborted"|"failed"}:
  // placement changes this router ran (aborted: nothing moved; failed: the
  // new epoch is in force but a server did not commit).
  prometheus::Counter* rebalances_committed = nullptr;
  // moe_router_auto_rebalance_enabled: 1 when this router rebalances by
  // itself (--auto_rebalance).
  prometheus::Gauge* auto_rebalance_enabled = nullptr;
  prometheus::Counter* rebalances_aborted = nullptr;
  prometheus::Counter* rebalances_failed = nullptr;
  // moe_router_migration_bytes_total and moe_router_migration_seconds:
  // expert weights new replicas pulled, and each change's whole time.
  prometheus::Counter* migration_bytes = nullptr;
  prometheus::Histogram* migration_seconds = nullptr;
  // moe_router_hedges_total: groups also sent to a second replica because
  // the first had not answered in time.
  prometheus::Counter* hedges = nullptr;
  // moe_router_ejections_total: replicas ejected for a while after failing
  // calls in a row (outlier detection).
  prometheus::Counter* ejections = nullptr;
  // moe_router_failovers_total: groups re-sent to another replica.
  prometheus::Counter* failovers = nullptr;
  // moe_router_stale_answers_total: expert answers refused because the
  // server was at another placement epoch or weights step.
  prometheus::Counter* stale_answers = nullptr;
  // moe_router_last_checkpoint_timestamp_seconds / _step: the last
  // checkpoint this router saved (0 before any).
  prometheus::Gauge* last_checkpoint_timestamp = nullptr;
  prometheus::Gauge* last_checkpoint_step = nullptr;
  // moe_router_stream_opens_total: streams to expert servers opened (the
  // first per server, then reconnects). Counted by the client; see
  // ReportStreamOpens.
  prometheus::Counter* stream_opens = nullptr;

  // moe_router_authz_denied_total{method}: calls the authorization policy
  // refused (method: one the policy names, else "other").
  prometheus::Family<prometheus::Counter>* authz_denied = nullptr;
  void CountDenied(absl::string_view method) const {
    authz_denied->Add({{"method", std::string(method)}}).Increment();
  }

  void CountRequest(RouterMethod method, const absl::Status& status, int64_t tokens,
                    double seconds) const;
  // A placement change's outcome: committed (with the bytes its new
  // replicas pulled and its time), failed (INTERNAL: in force, not
  // committed everywhere) or aborted (any other error: nothing moved).
  void CountRebalance(const absl::Status& status, int64_t bytes, double seconds) const;
  // Brings moe_router_stream_opens_total up to `opened`, the client's own
  // running count; safe from many threads (each open is added once).
  void ReportStreamOpens(int64_t opened) const;
  // What moe_router_stream_opens_total holds.
  mutable std::atomic<int64_t> reported_stream_opens{0};
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_METRICS_H_
