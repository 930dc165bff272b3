// The expert server's Prometheus metrics, built once against a registry and
// passed by reference (a typed struct, not a map of names). Label values are
// bounded: expert ids (< num_experts), gRPC code names, op and method names.
// prometheus-cpp metrics are thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_METRICS_H_
#define MOE_EXPERT_SERVICE_EXPERT_METRICS_H_

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moe::expert {

struct ExpertMetrics {
  static std::unique_ptr<ExpertMetrics> Create(prometheus::Registry& registry,
                                               const ModelConfig& model);

  // moe_expert_tokens_total{expert} (one layer), {layer, expert} (several,
  // up to kMaxExpertSeries experts in all) or {layer} (more): token rows
  // run through each expert.
  // REQUIRES of the accessors: CheckExpertKey(model, expert) is OK.
  static constexpr int kMaxExpertSeries = 4096;
  prometheus::Counter& ForwardTokens(ExpertKey expert) const {
    return *forward_tokens.at(SeriesOf(expert));
  }
  // moe_expert_backward_tokens_total, labelled the same.
  prometheus::Counter& BackwardTokens(ExpertKey expert) const {
    return *backward_tokens.at(SeriesOf(expert));
  }
  size_t SeriesOf(ExpertKey expert) const {
    return per_expert ? static_cast<size_t>(expert.layer) * num_experts + expert.expert
                      : static_cast<size_t>(expert.layer);
  }
  int num_experts = 0;
  bool per_expert = true;
  std::vector<prometheus::Counter*> forward_tokens;
  std::vector<prometheus::Counter*> backward_tokens;
  // moe_expert_kernel_seconds{op="forward"|"backward"}.
  prometheus::Histogram* forward_seconds = nullptr;
  prometheus::Histogram* backward_seconds = nullptr;
  // moe_expert_batch_rows: rows per kernel call.
  prometheus::Histogram* batch_rows = nullptr;
  // moe_expert_inflight_requests: stream messages received, not yet answered.
  prometheus::Gauge* inflight = nullptr;
  // moe_expert_errors_total{code}: failed requests by gRPC code name.
  std::array<prometheus::Counter*, 17> errors_by_code{};
  // moe_expert_received_bytes_total / moe_expert_sent_bytes_total: tensor
  // payload bytes.
  prometheus::Counter* received_bytes = nullptr;
  prometheus::Counter* sent_bytes = nullptr;
  // moe_expert_training_state_bytes: bytes kept for backward.
  prometheus::Gauge* training_state_bytes = nullptr;
  // moe_expert_active_streams: Dispatch and BackwardDispatch streams open.
  prometheus::Gauge* active_streams = nullptr;

  // moe_expert_steps_total{result="committed"|"aborted"|"failed"}: training
  // steps by outcome here (failed: PrepareStep answered with an error).
  prometheus::Counter* steps_committed = nullptr;
  prometheus::Counter* steps_aborted = nullptr;
  prometheus::Counter* steps_failed = nullptr;
  // moe_expert_committed_step: the last training step committed (or
  // adopted by sync or a checkpoint) here; servers of one cluster agree.
  prometheus::Gauge* committed_step = nullptr;
  // moe_expert_behind_experts: hosted experts left at an older step than
  // the cluster's by the start-up sync (no replica to sync from): calls for
  // them are refused until they are loaded.
  prometheus::Gauge* behind_experts = nullptr;
  // moe_expert_allreduce_seconds: wall time of a step's all-reduces here.
  prometheus::Histogram* allreduce_seconds = nullptr;
  // moe_expert_allreduce_sent_bytes_total: gradient bytes sent to the ring.
  prometheus::Counter* allreduce_sent_bytes = nullptr;

  // moe_expert_authz_denied_total{method}: calls the authorization policy
  // refused (method: one the policy names, else "other").
  prometheus::Family<prometheus::Counter>* authz_denied = nullptr;
  void CountDenied(absl::string_view method) const {
    authz_denied->Add({{"method", std::string(method)}}).Increment();
  }

  void CountError(const absl::Status& status) const {
    errors_by_code[static_cast<int>(status.code()) % errors_by_code.size()]->Increment();
  }
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_METRICS_H_
