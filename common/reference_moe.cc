#include "common/reference_moe.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/reference_expert.h"
#include "common/status_macros.h"

namespace moe {
namespace {

absl::Status CheckShape(const FloatTensor& t, const Shape& want,
                        absl::string_view name) {
  if (t.shape() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": expected shape ", ShapeString(want), ", got ",
        ShapeString(t.shape())));
  }
  return absl::OkStatus();
}

// Copies the tokens of `pairs` out of x, one row per pair.
FloatTensor GatherRows(const FloatTensor& x, const std::vector<int64_t>& pairs,
                       const PairIndex& index) {
  const int64_t d_model = x.dim(1);
  FloatTensor rows({static_cast<int64_t>(pairs.size()), d_model});
  for (size_t r = 0; r < pairs.size(); ++r) {
    absl::Span<const float> src = x.row(index.TokenOf(pairs[r]));
    std::copy(src.begin(), src.end(), rows.mutable_row(r).begin());
  }
  return rows;
}

}  // namespace

absl::StatusOr<ReferenceMoe> ReferenceMoe::Create(ModelConfig model,
                                                  MoeWeights weights) {
  if (!weights.gate.has_value()) {
    return absl::InvalidArgumentError("reference MoE: no gate weights");
  }
  MOE_RETURN_IF_ERROR(CheckShape(*weights.gate, {model.d_model, model.gate_width()}, "gate"));
  const ExpertWeights zeros = ExpertWeights::Zeros(model);
  for (int e = 0; e < model.experts_per_layer(); ++e) {
    auto it = weights.experts.find(e);
    if (it == weights.experts.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("reference MoE: expert ", e, " is missing"));
    }
    for (ExpertTensor which : kAllExpertTensors) {
      MOE_RETURN_IF_ERROR(CheckShape(it->second.tensor(which),
                                     zeros.tensor(which).shape(),
                                     absl::StrCat("expert ", e)));
    }
  }
  if (static_cast<int>(weights.experts.size()) != model.experts_per_layer()) {
    return absl::InvalidArgumentError(absl::StrCat("reference MoE: expected ",
                                                   model.experts_per_layer(), " experts, got ",
                                                   weights.experts.size()));
  }
  return ReferenceMoe(std::move(model), std::move(weights));
}

absl::Status ReferenceMoe::CheckBatch(const FloatTensor& t, absl::string_view name,
                                      int64_t num_tokens) const {
  if (t.shape().size() != 2 || t.dim(1) != model_.d_model ||
      (num_tokens >= 0 && t.dim(0) != num_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": expected [", num_tokens >= 0 ? absl::StrCat(num_tokens) : "tokens",
        ", ", model_.d_model, "], got ", ShapeString(t.shape())));
  }
  return absl::OkStatus();
}

absl::StatusOr<ReferenceForward> ReferenceMoe::Forward(const FloatTensor& x) const {
  MOE_RETURN_IF_ERROR(CheckBatch(x, "x", -1));
  const int64_t num_tokens = x.dim(0);
  ReferenceForward result;
  result.routing = RouteTokens(x.values(), num_tokens, weights_.gate->values(), model_);
  const PairIndex index = result.routing.pairs();
  result.y = FloatTensor({num_tokens, model_.d_model});
  std::vector<std::vector<int64_t>> pairs = KeptPairsByExpert(result.routing);
  result.experts.resize(model_.experts_per_layer());
  for (int e = 0; e < model_.experts_per_layer(); ++e) {
    ExpertActivations& act = result.experts[e];
    act.pairs = std::move(pairs[e]);
    const int64_t rows = act.pairs.size();
    const FloatTensor input = GatherRows(x, act.pairs, index);
    act.hidden_pre = FloatTensor({rows, model_.activation_width()});
    act.output = FloatTensor({rows, model_.d_model});
    ReferenceExpertForward(weights_.experts.at(e), input.values(), rows,
                           act.hidden_pre.mutable_values(),
                           act.output.mutable_values());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = act.pairs[r];
      const float w = result.routing.weights[p];
      absl::Span<float> y_row = result.y.mutable_row(index.TokenOf(p));
      absl::Span<const float> out_row = act.output.row(r);
      for (int64_t m = 0; m < model_.d_model; ++m) y_row[m] += w * out_row[m];
    }
  }
  return result;
}

absl::StatusOr<ReferenceGradients> ReferenceMoe::Backward(
    const FloatTensor& x, const ReferenceForward& forward,
    const FloatTensor& dy) const {
  MOE_RETURN_IF_ERROR(CheckBatch(x, "x", -1));
  const int64_t num_tokens = x.dim(0);
  MOE_RETURN_IF_ERROR(CheckBatch(dy, "grad_output", num_tokens));
  if (forward.routing.num_tokens != num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "backward: the forward had ", forward.routing.num_tokens,
        " tokens, x has ", num_tokens));
  }
  const Routing& routing = forward.routing;
  const PairIndex index = routing.pairs();
  // Routed experts and the shared expert's slices alike.
  const int num_experts = model_.experts_per_layer();
  const int64_t d_model = model_.d_model;

  ReferenceGradients grads;
  grads.dx = FloatTensor({num_tokens, d_model});
  grads.params.gate = FloatTensor({d_model, model_.gate_width()});
  // dL/dweight for every pair: dy[t] . Expert_e(x[t]); 0 for dropped pairs.
  std::vector<double> d_weight(index.Count(num_tokens), 0.0);

  // Expert path: each expert sees weight * dy for its rows.
  for (int e = 0; e < num_experts; ++e) {
    const ExpertActivations& act = forward.experts[e];
    const int64_t rows = act.pairs.size();
    FloatTensor d_out({rows, d_model});
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = act.pairs[r];
      absl::Span<const float> dy_row = dy.row(index.TokenOf(p));
      absl::Span<const float> out_row = act.output.row(r);
      absl::Span<float> d_out_row = d_out.mutable_row(r);
      double dot = 0;
      for (int64_t m = 0; m < d_model; ++m) {
        d_out_row[m] = routing.weights[p] * dy_row[m];
        dot += static_cast<double>(dy_row[m]) * out_row[m];
      }
      d_weight[p] = dot;
    }
    const FloatTensor input = GatherRows(x, act.pairs, index);
    FloatTensor dx_rows({rows, d_model});
    ExpertWeights& expert_grads =
        grads.params.experts.emplace(e, ExpertWeights::Zeros(model_)).first->second;
    ReferenceExpertBackward(weights_.experts.at(e), input.values(),
                            act.hidden_pre.values(), d_out.values(), rows,
                            dx_rows.mutable_values(), expert_grads);
    if (model_.bias_free()) ZeroBiases(expert_grads);  // they stay zero
    for (int64_t r = 0; r < rows; ++r) {
      absl::Span<float> dx_row = grads.dx.mutable_row(index.TokenOf(act.pairs[r]));
      absl::Span<const float> src = dx_rows.row(r);
      for (int64_t m = 0; m < d_model; ++m) dx_row[m] += src[m];
    }
  }

  // Gate path (the same code the router runs).
  GateBackward(routing, x.values(), weights_.gate->values(), d_weight, grads.dx.mutable_values(),
               grads.params.gate->mutable_values());
  return grads;
}

}  // namespace moe
