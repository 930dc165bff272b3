#include "router_service/dispatch_plan.h"

#include <algorithm>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/bfloat16.h"
#include "common/expert_key.h"
#include "common/tensor_codec.h"

namespace moe::router {

absl::StatusOr<std::vector<ExpertGroup>> PlanDispatch(const Routing& routing,
                                                      const ConstTensorView& x,
                                                      const Placement& placement,
                                                      ReplicaPicker& picker,
                                                      const DispatchPlanOptions& options) {
  const PairIndex index = routing.pairs();
  const bool may_round =
      !options.training && x.dtype == DType::kFloat32 && options.round_to_bf16 != nullptr;
  std::vector<std::vector<int64_t>> by_expert = KeptPairsByExpert(routing);
  std::vector<ExpertGroup> groups;
  std::vector<ExpertKey> unavailable;
  std::vector<std::pair<int, int64_t>> assigned;  // to undo on failure
  for (int e = 0; e < static_cast<int>(by_expert.size()); ++e) {
    const std::vector<int64_t>& pairs = by_expert[e];
    if (pairs.empty()) continue;
    const ExpertKey expert(options.layer, e);
    // A training forward sends an expert's pairs to one replica: its state
    // is kept there under (request id, expert), once, and a failover then
    // goes to a replica that holds none of it.
    std::vector<std::pair<int, int64_t>> shares;
    if (options.training) {
      const int64_t count = static_cast<int64_t>(pairs.size());
      const int server = picker.PickOne(placement, expert, count, {});
      if (server >= 0) shares.emplace_back(server, count);
    } else {
      shares = picker.Assign(placement, expert, pairs.size(), {});
    }
    if (shares.empty()) {
      unavailable.push_back(expert);
      continue;
    }
    if (!options.training && options.max_call_rows > 0) {
      std::vector<std::pair<int, int64_t>> calls;
      for (const auto& [server, count] : shares) {
        for (int64_t done = 0; done < count; done += options.max_call_rows) {
          calls.emplace_back(server, std::min(options.max_call_rows, count - done));
        }
      }
      shares = std::move(calls);
    }
    size_t next = 0;
    for (const auto& [server, count] : shares) {
      assigned.emplace_back(server, count);
      ExpertGroup& group = groups.emplace_back();
      group.expert = expert;
      group.server = server;
      group.pairs.assign(pairs.begin() + next, pairs.begin() + next + count);
      next += count;
      v1::DispatchRequest& request = group.request;
      SetExpertKey(expert, &request);
      request.set_training(options.training);
      request.set_request_id(options.request_id);
      request.set_deadline_unix_micros(options.deadline_unix_micros);
      request.mutable_version()->set_placement_epoch(options.placement_epoch);
      request.mutable_version()->set_weights_step(options.weights_step);
      SetTokens(x, index, may_round && options.round_to_bf16(expert), group);
    }
  }
  if (!unavailable.empty()) {
    for (const auto& [server, count] : assigned) picker.Release(server, count);
    return absl::UnavailableError(absl::StrCat("expert", unavailable.size() > 1 ? "s " : " ",
                                               JoinExpertKeys(unavailable), ": no live replica"));
  }
  return groups;
}

void SetTokens(const ConstTensorView& x, const PairIndex& index, bool round_to_bf16,
               ExpertGroup& group) {
  const int64_t d_model = x.shape.at(1);
  const int64_t count = static_cast<int64_t>(group.pairs.size());
  const DType dtype = round_to_bf16 ? DType::kBFloat16 : x.dtype;
  const size_t row_bytes = d_model * DTypeSize(dtype);
  group.request.set_tokens_rounded_to_bf16(round_to_bf16);
  v1::Tensor* tokens = group.request.mutable_tokens();
  tokens->clear_shape();
  tokens->add_shape(count);
  tokens->add_shape(d_model);
  tokens->set_dtype(ToProtoDType(dtype));
  std::string& bytes = group.rows;
  bytes.resize(count * row_bytes);
  for (int64_t r = 0; r < count; ++r) {
    char* out = bytes.data() + r * row_bytes;
    const int64_t t = index.TokenOf(group.pairs[r]);
    if (round_to_bf16) {
      // Straight from x's row into the request: rounding is the gather.
      FloatsToBf16(x.floats().subspan(t * d_model, d_model),
                   absl::MakeSpan(reinterpret_cast<uint16_t*>(out), d_model));
    } else {
      std::memcpy(out, x.data + t * row_bytes, row_bytes);
    }
  }
}

std::optional<NonFiniteRow> Combine(const Routing& routing, const std::vector<ExpertGroup>& groups,
                                    std::vector<RowReader>& outputs, int64_t d_model,
                                    absl::Span<float> y) {
  const PairIndex index = routing.pairs();
  for (size_t g = 0; g < groups.size(); ++g) {
    const ExpertGroup& group = groups[g];
    RowReader& out = outputs[g];
    for (size_t r = 0; r < group.pairs.size(); ++r) {
      const int64_t p = group.pairs[r];
      float* y_row = y.data() + index.TokenOf(p) * d_model;
      if (!AddScaledRow(out.Next(), out.dtype(), routing.weights[p], y_row, d_model)) {
        return NonFiniteRow{g, static_cast<int64_t>(r)};
      }
    }
  }
  return std::nullopt;
}

}  // namespace moe::router
