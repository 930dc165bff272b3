// Turns one request's routing into the calls the router makes: the kept
// pairs of each expert, split over its replicas by the ReplicaPicker (and
// into micro-batches, DispatchPlanOptions::max_call_rows), each group with
// its token rows copied once, contiguously, straight into the
// DispatchRequest it is sent in. An expert's groups hold disjoint tokens, so
// Combine's sums are the same bits however the rows were split.
// Thread-compatible.
#ifndef MOE_ROUTER_SERVICE_DISPATCH_PLAN_H_
#define MOE_ROUTER_SERVICE_DISPATCH_PLAN_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gating.h"
#include "common/pair_index.h"
#include "common/tensor.h"
#include "proto/expert.pb.h"
#include "router_service/replica_picker.h"
#include "router_service/row_reader.h"

namespace moe::router {

struct ExpertGroup {
  ExpertKey expert;
  // The replica it is sent to (changes on failover).
  int server = 0;
  // Pairs p = t * top_k + j, in token order: row r of the group is token
  // pairs[r] / top_k.
  std::vector<int64_t> pairs;
  // tokens: the shape and dtype of `rows`; their bytes are `rows`, sent as
  // they are (ExpertClient::Forward), not copied into the message.
  v1::DispatchRequest request;
  // Those rows of x, contiguous, in x's dtype (or rounded to bf16,
  // tokens_rounded_to_bf16).
  std::string rows;
};

struct DispatchPlanOptions {
  // The MoE layer whose gate made the routing.
  int layer = 0;
  // Training: each expert's pairs go to one replica (inference splits them
  // over the least loaded).
  bool training = false;
  uint64_t request_id = 0;
  int64_t deadline_unix_micros = 0;
  // The state the call is computed against (placement epoch, weights step):
  // a server at another version refuses it.
  uint64_t placement_epoch = 0;
  uint64_t weights_step = 0;
  // Inference: an expert's rows on one replica go out in calls of at most
  // this many rows (micro-batches: the first computes while the next are on
  // the wire); 0: one call. Training keeps one call per expert (its state
  // is kept per (request, expert)).
  int64_t max_call_rows = 0;
  // Inference with fp32 x: whether an expert's rows go out rounded to bf16
  // (every replica it may be sent to computes in bf16, whose kernels round
  // them the same way: the same answer from half the bytes). Null: never.
  std::function<bool(ExpertKey)> round_to_bf16;
};

// UNAVAILABLE naming the experts with no healthy replica. On success the
// picker holds every group's rows as outstanding (release them as answers
// arrive).
absl::StatusOr<std::vector<ExpertGroup>> PlanDispatch(const Routing& routing,
                                                      const ConstTensorView& x,
                                                      const Placement& placement,
                                                      ReplicaPicker& picker,
                                                      const DispatchPlanOptions& options);

// Writes `group`'s rows of `x` into its rows (and their shape and dtype
// into its request's tokens), rounded to bf16 when `round_to_bf16`
// (REQUIRES: x fp32); x's dtype otherwise.
void SetTokens(const ConstTensorView& x, const PairIndex& index, bool round_to_bf16,
               ExpertGroup& group);

// Where Combine found a NaN or an Inf: row `row` of group `group`'s output.
struct NonFiniteRow {
  size_t group = 0;
  int64_t row = 0;
};

// y[t] = sum over groups g, rows r of g: weight(pair) * output_g[r], added
// in group order (groups sorted by expert), so the result does not depend on
// the order answers arrived in. outputs[g] reads group g's answer, [rows,
// d_model] fp32 or bf16, wherever it lies. y ([num_tokens, d_model], row
// major: a tensor's values or a message's bytes) starts zeroed. The first
// row holding a NaN or an Inf ends it (y is then partial).
std::optional<NonFiniteRow> Combine(const Routing& routing, const std::vector<ExpertGroup>& groups,
                                    std::vector<RowReader>& outputs, int64_t d_model,
                                    absl::Span<float> y);

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_DISPATCH_PLAN_H_
