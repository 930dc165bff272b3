// The gate: the one piece of code that decides routing, used by the router
// and by the reference layer alike, so their decisions are identical by
// construction (a near-tie computed two ways could pick different experts).
//
//   logits = x W_g                 (fp32, each logit summed over d_model in order)
//   probs  = softmax(logits)       (computed in double, stored as fp32)
//   top-k  by logit, descending; equal logits go to the lower expert id;
//          with groups (DeepSeek-V2's group_limited_greedy), only among the
//          experts of the top_groups groups ranked by their best logit
//          (equal ones to the lower group)
//   weight = scale * prob / sum of the k chosen probs  (renormalised)
//          = scale * prob                              (or not)
//   (GateOptions: Mixtral renormalises, Switch's top-1, Qwen2-MoE/OLMoE
//   with norm_topk_prob = false and DeepSeek-V2 do not.)
//   aux_loss = E * sum_e (c_e / T) * mean_t probs[t, e]   (Switch, Mixtral's
//              load_balancing_loss_func: c_e pairs choosing e, dropped ones
//              included, over the batch's T tokens)
//   z_loss   = mean_t logsumexp(logits[t])^2               (Switch's)
//   capacity (DROP): ceil(capacity_factor * T * k / E) pairs per expert;
//     pairs are admitted rank by rank (every token's first choice before
//     any second choice), tokens in order within a rank; the rest dropped.
//     A dropped pair adds nothing; the other weights are not renormalised.
//   shared expert (Qwen2-MoE): W_g's last column is its gate w_s; every
//     token also visits the shared expert's slices with weight
//     sigmoid(x w_s) (not scaled, never dropped, outside both losses).
// Thread-safe (pure functions).
#ifndef MOE_COMMON_GATING_H_
#define MOE_COMMON_GATING_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/model_config.h"
#include "common/pair_index.h"
#include "common/tensor.h"

namespace moe {

struct Routing {
  int64_t num_tokens = 0;
  // Routed experts (the softmax's width).
  int num_experts = 0;
  int top_k = 0;
  // The shared expert's slices (ModelConfig::shared_slices), which every
  // token visits after its top_k: experts num_experts, num_experts + 1, ...
  // with weight sigmoid(x w_s), never dropped.
  int shared = 0;
  // [num_tokens, num_experts] softmax of the logits.
  std::vector<float> probs;
  // [num_tokens, top_k + shared], indexed by pair (common/pair_index.h).
  std::vector<int32_t> expert_ids;
  // The same: renormalised gate weights (the shared slices' sigmoid).
  std::vector<float> weights;
  // The same: 1 where the pair was dropped for capacity.
  std::vector<uint8_t> dropped;
  // [num_experts + shared] pairs each expert serves (dropped ones
  // excluded).
  std::vector<int64_t> expert_tokens;
  int64_t dropped_pairs = 0;
  // Pairs per expert allowed; 0 means unlimited (DROPLESS).
  int64_t capacity = 0;
  // How the weights were made, and the losses' weights (for the backward).
  bool renormalized = true;
  double scaling_factor = 1.0;
  double aux_loss_coef = 0.0;
  double z_loss_coef = 0.0;
  // The batch's load-balancing and z losses (unweighted), their parts the
  // backward needs: pairs choosing each expert (dropped ones included) and
  // each token's logsumexp of the logits.
  double aux_loss = 0.0;
  double z_loss = 0.0;
  std::vector<int64_t> chosen_count;
  std::vector<double> log_z;

  // Pairs per token: the top_k routed, then the shared slices.
  int per_token() const { return top_k + shared; }
  PairIndex pairs() const { return PairIndex(per_token()); }
};

// ceil(capacity_factor * num_tokens * top_k / num_experts) with DROP, else 0.
int64_t ExpertCapacity(const ModelConfig& model, int64_t num_tokens);

// Routes `num_tokens` rows of x ([num_tokens, d_model], fp32).
// REQUIRES: x.size() == num_tokens * d_model; gate is one layer's W_g
// [d_model, gate_width], row-major (GateOfLayer).
Routing RouteTokens(absl::Span<const float> x, int64_t num_tokens, absl::Span<const float> gate,
                    const ModelConfig& model);

// Backward through the gate. Given dL/dweight for every pair (d_weight
// [num_tokens * per_token], 0 for dropped pairs), adds the gate path to
// `dx` ([num_tokens, d_model]) and to `d_gate` ([d_model, gate_width]):
// through the weights dL/dp_i = (s dL/dw_i - sum_j dL/dw_j w_j) / S when
// renormalised, s dL/dw_i when not, for the chosen i (0 otherwise; the
// choice, groups included, is piecewise constant), through the softmax
// dL/dlogit_m = p_m (dL/dp_m - sum_i dL/dp_i p_i), then dx += dlogit W_g^T
// and dW_g += x^T dlogit. With aux_loss_coef or z_loss_coef, their losses'
// gradients join: dL/dp_m += coef E c_m / T^2 for every token, and
// dL/dlogit_m += z_coef 2 logsumexp p_m / T; the shared gate's dL/dlogit_s =
// s (1 - s) times the sum of its slices' dL/dweight.
void GateBackward(const Routing& routing, absl::Span<const float> x, absl::Span<const float> gate,
                  absl::Span<const double> d_weight, absl::Span<float> dx,
                  absl::Span<float> d_gate);

// For each expert, the kept pairs routed to it (p = t * top_k + j), in
// increasing token order: the rows of that expert's batch.
std::vector<std::vector<int64_t>> KeptPairsByExpert(const Routing& routing);

}  // namespace moe

#endif  // MOE_COMMON_GATING_H_
