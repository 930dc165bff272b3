#include "expert_service/expert_metrics.h"

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace moe::expert {
std::unique_ptr<ExpertMetrics> ExpertMetrics::Create(prometheus::Registry& registry,
                                                     const ModelConfig& model) {
  MOE_CHECK(model.num_experts >= 1 && model.num_layers >= 1);
  auto m = std::make_unique<ExpertMetrics>();
  m->num_experts = model.experts_per_layer();
  m->per_expert = model.total_experts() <= kMaxExpertSeries;
  auto& forward_tokens = prometheus::BuildCounter()
                             .Name("moe_expert_tokens_total")
                             .Help("Token rows run forward through each expert.")
                             .Register(registry);
  auto& backward_tokens = prometheus::BuildCounter()
                              .Name("moe_expert_backward_tokens_total")
                              .Help("Token rows run backward through each expert.")
                              .Register(registry);
  m->authz_denied = &prometheus::BuildCounter()
                         .Name("moe_expert_authz_denied_total")
                         .Help("Calls refused by the authorization policy, by method.")
                         .Register(registry);
  for (int l = 0; l < model.num_layers; ++l) {
    for (int e = 0; e < (m->per_expert ? model.experts_per_layer() : 1); ++e) {
      std::map<std::string, std::string> labels;
      if (m->per_expert) labels["expert"] = absl::StrCat(e);
      if (model.num_layers > 1) labels["layer"] = absl::StrCat(l);
      m->forward_tokens.push_back(&forward_tokens.Add(labels));
      m->backward_tokens.push_back(&backward_tokens.Add(labels));
    }
  }
  auto& kernel = prometheus::BuildHistogram()
                     .Name("moe_expert_kernel_seconds")
                     .Help("Time in the expert kernel per request, by op.")
                     .Register(registry);
  const prometheus::Histogram::BucketBoundaries seconds = {
      25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
      10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5};
  m->forward_seconds = &kernel.Add({{"op", "forward"}}, seconds);
  m->backward_seconds = &kernel.Add({{"op", "backward"}}, seconds);
  m->batch_rows = &prometheus::BuildHistogram()
                       .Name("moe_expert_batch_rows")
                       .Help("Token rows per expert kernel call.")
                       .Register(registry)
                       .Add({}, prometheus::Histogram::BucketBoundaries{
                                    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                    4096, 8192, 16384});
  m->inflight = &prometheus::BuildGauge()
                     .Name("moe_expert_inflight_requests")
                     .Help("Stream messages received and not yet answered.")
                     .Register(registry)
                     .Add({});
  auto& errors = prometheus::BuildCounter()
                     .Name("moe_expert_errors_total")
                     .Help("Requests answered with an error, by gRPC status code.")
                     .Register(registry);
  for (size_t code = 0; code < m->errors_by_code.size(); ++code) {
    m->errors_by_code[code] = &errors.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
  }
  m->received_bytes = &prometheus::BuildCounter()
                           .Name("moe_expert_received_bytes_total")
                           .Help("Tensor payload bytes received.")
                           .Register(registry)
                           .Add({});
  m->sent_bytes = &prometheus::BuildCounter()
                       .Name("moe_expert_sent_bytes_total")
                       .Help("Tensor payload bytes sent.")
                       .Register(registry)
                       .Add({});
  m->training_state_bytes = &prometheus::BuildGauge()
                                 .Name("moe_expert_training_state_bytes")
                                 .Help("Bytes of forward state kept for backward.")
                                 .Register(registry)
                                 .Add({});
  m->committed_step = &prometheus::BuildGauge()
                           .Name("moe_expert_committed_step")
                           .Help("The last training step committed (or adopted) here.")
                           .Register(registry)
                           .Add({});
  m->behind_experts =
      &prometheus::BuildGauge()
           .Name("moe_expert_behind_experts")
           .Help("Hosted experts the start-up sync left behind the cluster's step.")
           .Register(registry)
           .Add({});
  m->active_streams = &prometheus::BuildGauge()
                           .Name("moe_expert_active_streams")
                           .Help("Open Dispatch and BackwardDispatch streams.")
                           .Register(registry)
                           .Add({});
  auto& steps = prometheus::BuildCounter()
                    .Name("moe_expert_steps_total")
                    .Help("Training steps on this server, by outcome.")
                    .Register(registry);
  m->steps_committed = &steps.Add({{"result", "committed"}});
  m->steps_aborted = &steps.Add({{"result", "aborted"}});
  m->steps_failed = &steps.Add({{"result", "failed"}});
  m->allreduce_seconds = &prometheus::BuildHistogram()
                              .Name("moe_expert_allreduce_seconds")
                              .Help("Wall time of one step's gradient all-reduces here.")
                              .Register(registry)
                              .Add({}, seconds);
  m->allreduce_sent_bytes = &prometheus::BuildCounter()
                                 .Name("moe_expert_allreduce_sent_bytes_total")
                                 .Help("Gradient bytes this server sent in all-reduces.")
                                 .Register(registry)
                                 .Add({});
  return m;
}

}  // namespace moe::expert
