#include "router_service/router_metrics.h"

#include <map>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::router {
namespace {

constexpr const char* kMethods[kNumRouterMethods] = {"Forward", "Backward", "Step",
                                                     "SaveCheckpoint", "Rebalance"};

}  // namespace

std::unique_ptr<RouterMetrics> RouterMetrics::Create(prometheus::Registry& registry,
                                                     const ModelConfig& model) {
  auto m = std::make_unique<RouterMetrics>();
  m->authz_denied = &prometheus::BuildCounter()
                         .Name("moe_router_authz_denied_total")
                         .Help("Calls refused by the authorization policy, by method.")
                         .Register(registry);
  auto& requests = prometheus::BuildCounter()
                       .Name("moe_router_requests_total")
                       .Help("Requests answered, by method and gRPC status code.")
                       .Register(registry);
  auto& tokens = prometheus::BuildCounter()
                     .Name("moe_router_tokens_total")
                     .Help("Tokens in successful requests, by method.")
                     .Register(registry);
  auto& seconds = prometheus::BuildHistogram()
                      .Name("moe_router_request_seconds")
                      .Help("Time from receiving a request to answering it, by method.")
                      .Register(registry);
  const prometheus::Histogram::BucketBoundaries buckets = {
      50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
      25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0};
  for (int method = 0; method < kNumRouterMethods; ++method) {
    for (int code = 0; code < 17; ++code) {
      m->requests[method][code] =
          &requests.Add({{"method", kMethods[method]}, {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
    }
    if (static_cast<RouterMethod>(method) == RouterMethod::kForward ||
        static_cast<RouterMethod>(method) == RouterMethod::kBackward) {
      m->tokens[method] = &tokens.Add({{"method", kMethods[method]}});
    }
    m->seconds[method] = &seconds.Add({{"method", kMethods[method]}}, buckets);
  }
  auto& phases = prometheus::BuildHistogram()
                     .Name("moe_router_phase_seconds")
                     .Help("Time of a successful Forward by phase: gate (gating and planning), "
                           "fan_out (waiting for the expert servers), combine.")
                     .Register(registry);
  const prometheus::Histogram::BucketBoundaries phase_buckets = {
      5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3,
      2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0};
  m->gate_seconds = &phases.Add({{"phase", "gate"}}, phase_buckets);
  m->fan_out_seconds = &phases.Add({{"phase", "fan_out"}}, phase_buckets);
  m->combine_seconds = &phases.Add({{"phase", "combine"}}, phase_buckets);
  auto& wait = prometheus::BuildCounter()
                   .Name("moe_router_dispatch_wait_seconds_total")
                   .Help(
                       "Successful Forwards' expert calls' time outside the kernels (wire, "
                       "codecs, queues): all of it, and the part hidden under another call's "
                       "compute on the same server.")
                   .Register(registry);
  m->dispatch_wait_seconds = &wait.Add({{"part", "all"}});
  m->dispatch_wait_hidden_seconds = &wait.Add({{"part", "hidden"}});
  m->step_allreduce_seconds =
      &prometheus::BuildHistogram()
           .Name("moe_router_step_allreduce_seconds")
           .Help("A committed step's gradient all-reduce time on its slowest server.")
           .Register(registry)
           .Add({}, buckets);
  m->batch_tokens = &prometheus::BuildHistogram()
                         .Name("moe_router_batch_tokens")
                         .Help("Tokens per Forward request.")
                         .Register(registry)
                         .Add({}, prometheus::Histogram::BucketBoundaries{
                                      1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                      4096, 8192, 16384, 32768, 65536});
  m->hedges = &prometheus::BuildCounter()
                   .Name("moe_router_hedges_total")
                   .Help(
                       "Expert calls also sent to a second replica because the first had not "
                       "answered in time.")
                   .Register(registry)
                   .Add({});
  m->ejections = &prometheus::BuildCounter()
                      .Name("moe_router_ejections_total")
                      .Help(
                          "Expert servers ejected for a while after failing calls in a row "
                          "(unavailable, overloaded, internal errors).")
                      .Register(registry)
                      .Add({});
  m->placement_epoch = &prometheus::BuildGauge()
                            .Name("moe_router_placement_epoch")
                            .Help("The placement epoch this router routes with.")
                            .Register(registry)
                            .Add({});
  auto& plan_imbalance = prometheus::BuildGauge()
                             .Name("moe_router_rebalance_plan_imbalance")
                             .Help(
                                 "The last Rebalance plan's server load max/mean, before and "
                                 "after.")
                             .Register(registry);
  m->plan_imbalance_before = &plan_imbalance.Add({{"when", "before"}});
  m->plan_imbalance_after = &plan_imbalance.Add({{"when", "after"}});
  m->plan_bytes = &prometheus::BuildGauge()
                       .Name("moe_router_rebalance_plan_bytes")
                       .Help("Bytes of expert replicas the last Rebalance plan would copy.")
                       .Register(registry)
                       .Add({});
  auto& rebalances = prometheus::BuildCounter()
                         .Name("moe_router_rebalances_total")
                         .Help(
                             "Placement changes this router ran, by outcome (aborted: nothing "
                             "moved; failed: in force, but a server did not commit).")
                         .Register(registry);
  m->rebalances_committed = &rebalances.Add({{"outcome", "committed"}});
  m->auto_rebalance_enabled = &prometheus::BuildGauge()
                                   .Name("moe_router_auto_rebalance_enabled")
                                   .Help("1 when this router rebalances by itself.")
                                   .Register(registry)
                                   .Add({});
  m->rebalances_aborted = &rebalances.Add({{"outcome", "aborted"}});
  m->rebalances_failed = &rebalances.Add({{"outcome", "failed"}});
  m->migration_bytes = &prometheus::BuildCounter()
                            .Name("moe_router_migration_bytes_total")
                            .Help("Expert weight bytes new replicas pulled in placement changes.")
                            .Register(registry)
                            .Add({});
  m->migration_seconds =
      &prometheus::BuildHistogram()
           .Name("moe_router_migration_seconds")
           .Help("A placement change's time: pulls, drain and commit.")
           .Register(registry)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                                            10, 30, 60, 120, 300});
  auto& expert_tokens = prometheus::BuildCounter()
                            .Name("moe_router_expert_tokens_total")
                            .Help("(token, expert) pairs routed to each expert and served.")
                            .Register(registry);
  m->num_experts = model.experts_per_layer();
  m->per_expert = model.total_experts() <= kMaxExpertSeries;
  for (int l = 0; l < model.num_layers; ++l) {
    if (!m->per_expert) {
      m->expert_tokens.push_back(&expert_tokens.Add({{"layer", absl::StrCat(l)}}));
      continue;
    }
    for (int e = 0; e < model.experts_per_layer(); ++e) {
      std::map<std::string, std::string> labels = {{"expert", absl::StrCat(e)}};
      if (model.num_layers > 1) labels["layer"] = absl::StrCat(l);
      m->expert_tokens.push_back(&expert_tokens.Add(labels));
    }
  }
  m->dropped_pairs = &prometheus::BuildCounter()
                          .Name("moe_router_dropped_pairs_total")
                          .Help("(token, expert) pairs dropped for capacity.")
                          .Register(registry)
                          .Add({});
  auto& imbalance = prometheus::BuildGauge()
                       .Name("moe_router_load_imbalance")
                       .Help("Max over mean load in the sliding window, by what is compared.")
                       .Register(registry);
  m->expert_imbalance = &imbalance.Add({{"over", "experts"}});
  m->server_imbalance = &imbalance.Add({{"over", "servers"}});
  m->failovers = &prometheus::BuildCounter()
                      .Name("moe_router_failovers_total")
                      .Help("Expert calls re-sent to another replica after UNAVAILABLE.")
                      .Register(registry)
                      .Add({});
  m->stale_answers =
      &prometheus::BuildCounter()
           .Name("moe_router_stale_answers_total")
           .Help(
               "Expert answers refused because the server was at another placement epoch or "
               "weights step (the request went to another replica or was re-planned).")
           .Register(registry)
           .Add({});
  m->last_checkpoint_timestamp =
      &prometheus::BuildGauge()
           .Name("moe_router_last_checkpoint_timestamp_seconds")
           .Help("Unix time of the last checkpoint this router saved (0: none yet).")
           .Register(registry)
           .Add({});
  m->last_checkpoint_step = &prometheus::BuildGauge()
                                 .Name("moe_router_last_checkpoint_step")
                                 .Help("The training step of the last checkpoint saved here.")
                                 .Register(registry)
                                 .Add({});
  m->stream_opens = &prometheus::BuildCounter()
                         .Name("moe_router_stream_opens_total")
                         .Help("Streams to expert servers opened so far (reconnects included).")
                         .Register(registry)
                         .Add({});
  return m;
}

void RouterMetrics::CountRequest(RouterMethod method, const absl::Status& status,
                                 int64_t num_tokens, double elapsed) const {
  const int index = static_cast<int>(method);
  requests[index][static_cast<int>(status.code()) % 17]->Increment();
  if (status.ok() && tokens[index] != nullptr) {
    tokens[index]->Increment(static_cast<double>(num_tokens));
  }
  seconds[index]->Observe(elapsed);
}

void RouterMetrics::ReportStreamOpens(int64_t opened) const {
  int64_t reported = reported_stream_opens.load();
  while (opened > reported) {
    if (reported_stream_opens.compare_exchange_weak(reported, opened)) {
      stream_opens->Increment(static_cast<double>(opened - reported));
      return;
    }
  }
}

void RouterMetrics::CountRebalance(const absl::Status& status, int64_t bytes,
                                   double seconds) const {
  if (status.ok()) {
    rebalances_committed->Increment();
    migration_bytes->Increment(static_cast<double>(bytes));
    migration_seconds->Observe(seconds);
  } else if (absl::IsInternal(status)) {
    rebalances_failed->Increment();
  } else {
    rebalances_aborted->Increment();
  }
}

void RouterMetrics::CountExpertTokens(int layer, absl::Span<const int64_t> tokens) const {
  if (!per_expert) {
    expert_tokens.at(layer)->Increment(
        static_cast<double>(std::accumulate(tokens.begin(), tokens.end(), int64_t{0})));
    return;
  }
  for (size_t e = 0; e < tokens.size(); ++e) {
    expert_tokens.at(layer * num_experts + e)->Increment(static_cast<double>(tokens[e]));
  }
}

}  // namespace moe::router
