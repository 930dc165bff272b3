#include "common/gating.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/log.h"

namespace moe {
namespace {

// The gate's matmul, logits[t, e] = sum_i x[t, i] W_g[i, e], in blocks of
// kTokenBlock tokens x kExpertBlock experts whose sums stay in registers
// while i runs (each W_g row is read once per token block, not per token).
// Every logit has one accumulator summed over i in order, by the same code
// whatever its token's place in the batch (the last token block and the
// experts past a multiple of kExpertBlock are padded with zeros, not run
// by other code): the same bits in every process, for any batch.
constexpr int kTokenBlock = 4;
constexpr int kExpertBlock = 16;
// 8 floats (one AVX register): GCC and clang vector extensions. The
// block's 4 x 16 sums are 8 named variables, so that they stay in
// registers (arrays of them were spilled to the stack every step).
using Floats8 = float __attribute__((vector_size(32)));

Floats8 Broadcast(float x) { return Floats8{x, x, x, x, x, x, x, x}; }
Floats8 Load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

class GateMatmul {
 public:
  // `gate` [d_model, num_experts] (here: every column of W_g), copied with
  // its experts padded.
  GateMatmul(absl::Span<const float> gate, int64_t d_model, int64_t num_experts)
      : d_model_(d_model),
        num_experts_(num_experts),
        padded_experts_((num_experts_ + kExpertBlock - 1) / kExpertBlock * kExpertBlock),
        w_(d_model_ * padded_experts_, 0.0f),
        x_block_(kTokenBlock * d_model_, 0.0f) {
    for (int64_t i = 0; i < d_model_; ++i) {
      std::copy_n(gate.data() + i * num_experts_, num_experts_, w_.data() + i * padded_experts_);
    }
  }

  // The logits of `tokens` (<= kTokenBlock) rows of x into `logits`
  // ([tokens, num_experts]).
  void Block(const float* x, int tokens, float* logits) {
    const float* rows = x;
    if (tokens < kTokenBlock) {
      std::fill(x_block_.begin(), x_block_.end(), 0.0f);
      std::copy_n(x, tokens * d_model_, x_block_.data());
      rows = x_block_.data();
    }
    static_assert(kTokenBlock == 4 && kExpertBlock == 16, "the block below is written out");
    const float* x0 = rows;
    const float* x1 = rows + d_model_;
    const float* x2 = rows + 2 * d_model_;
    const float* x3 = rows + 3 * d_model_;
    for (int64_t e0 = 0; e0 < padded_experts_; e0 += kExpertBlock) {
      Floats8 s00{}, s01{}, s10{}, s11{}, s20{}, s21{}, s30{}, s31{};
      const float* w = w_.data() + e0;
      for (int64_t i = 0; i < d_model_; ++i, w += padded_experts_) {
        const Floats8 lo = Load8(w), hi = Load8(w + 8);
        Floats8 b = Broadcast(x0[i]);
        s00 += b * lo;
        s01 += b * hi;
        b = Broadcast(x1[i]);
        s10 += b * lo;
        s11 += b * hi;
        b = Broadcast(x2[i]);
        s20 += b * lo;
        s21 += b * hi;
        b = Broadcast(x3[i]);
        s30 += b * lo;
        s31 += b * hi;
      }
      const Floats8 sums[kTokenBlock][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}};
      const int64_t width = std::min<int64_t>(kExpertBlock, num_experts_ - e0);
      for (int t = 0; t < tokens; ++t) {
        float out[kExpertBlock];
        std::memcpy(out, sums[t], sizeof(out));
        std::copy_n(out, width, logits + t * num_experts_ + e0);
      }
    }
  }

 private:
  const int64_t d_model_;
  const int64_t num_experts_;
  const int64_t padded_experts_;
  std::vector<float> w_;
  std::vector<float> x_block_;
};

// Returns the logsumexp of the logits (the z-loss's).
double Softmax(absl::Span<const float> logits, absl::Span<float> probs) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (size_t e = 0; e < logits.size(); ++e) {
    sum += std::exp(static_cast<double>(logits[e]) - max);
  }
  for (size_t e = 0; e < logits.size(); ++e) {
    probs[e] = static_cast<float>(std::exp(static_cast<double>(logits[e]) - max) / sum);
  }
  return max + std::log(sum);
}

// The batch's load-balancing and z losses (gating.h).
void Losses(Routing& routing) {
  const int64_t tokens = routing.num_tokens;
  if (tokens == 0) return;
  const int num_experts = routing.num_experts;
  routing.chosen_count.assign(num_experts, 0);
  const PairIndex pairs = routing.pairs();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < routing.top_k; ++j) {
      ++routing.chosen_count[routing.expert_ids[pairs.Pair(t, j)]];
    }
  }
  std::vector<double> mean_prob(num_experts, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* probs = routing.probs.data() + t * num_experts;
    for (int e = 0; e < num_experts; ++e) mean_prob[e] += probs[e];
  }
  double aux = 0;
  for (int e = 0; e < num_experts; ++e) {
    aux += static_cast<double>(routing.chosen_count[e]) / tokens * (mean_prob[e] / tokens);
  }
  routing.aux_loss = num_experts * aux;
  double z = 0;
  for (double log_z : routing.log_z) z += log_z * log_z;
  routing.z_loss = z / tokens;
}

// The k largest of `values` among `candidates`, descending; ties to the
// lower index. `candidates` is reordered.
void TopK(absl::Span<const float> values, int top_k, std::vector<int32_t>& candidates,
          absl::Span<int32_t> out) {
  std::partial_sort(candidates.begin(), candidates.begin() + top_k, candidates.end(),
                    [&](int32_t a, int32_t b) {
                      return values[a] > values[b] || (values[a] == values[b] && a < b);
                    });
  std::copy(candidates.begin(), candidates.begin() + top_k, out.begin());
}

// A token's experts: the top_k logits, among the experts of its top groups
// when the gate has groups.
class ExpertChooser {
 public:
  ExpertChooser(const GateOptions& gate, int num_experts, int top_k)
      : gate_(gate), num_experts_(num_experts), top_k_(top_k) {
    if (gate_.num_groups > 0) {
      per_group_ = num_experts_ / gate_.num_groups;
      group_best_.resize(gate_.num_groups);
      chosen_groups_.resize(gate_.top_groups);
    }
  }

  void Choose(absl::Span<const float> logits, absl::Span<int32_t> out) {
    candidates_.clear();
    if (gate_.num_groups == 0) {
      for (int32_t e = 0; e < num_experts_; ++e) candidates_.push_back(e);
      TopK(logits, top_k_, candidates_, out);
      return;
    }
    for (int g = 0; g < gate_.num_groups; ++g) {
      const auto group = logits.subspan(g * per_group_, per_group_);
      group_best_[g] = *std::max_element(group.begin(), group.end());
    }
    for (int32_t g = 0; g < gate_.num_groups; ++g) candidates_.push_back(g);
    TopK(group_best_, gate_.top_groups, candidates_, absl::MakeSpan(chosen_groups_));
    // Ascending group order: the candidates' order does not matter to the
    // choice (ties go to the lower id either way).
    candidates_.clear();
    for (int32_t g : chosen_groups_) {
      for (int32_t e = g * per_group_; e < (g + 1) * per_group_; ++e) candidates_.push_back(e);
    }
    TopK(logits, top_k_, candidates_, out);
  }

 private:
  const GateOptions& gate_;
  const int num_experts_;
  const int top_k_;
  int per_group_ = 0;
  std::vector<float> group_best_;
  std::vector<int32_t> chosen_groups_;
  std::vector<int32_t> candidates_;
};

void ApplyCapacity(Routing& routing) {
  const int k = routing.top_k;
  const PairIndex pairs = routing.pairs();
  // The shared expert's slices serve every token: no capacity.
  for (int i = 0; i < routing.shared; ++i) {
    routing.expert_tokens[routing.num_experts + i] = routing.num_tokens;
  }
  for (int j = 0; j < k; ++j) {
    for (int64_t t = 0; t < routing.num_tokens; ++t) {
      const int64_t p = pairs.Pair(t, j);
      int64_t& count = routing.expert_tokens[routing.expert_ids[p]];
      if (routing.capacity > 0 && count >= routing.capacity) {
        routing.dropped[p] = 1;
        ++routing.dropped_pairs;
      } else {
        ++count;
      }
    }
  }
}

}  // namespace

int64_t ExpertCapacity(const ModelConfig& model, int64_t num_tokens) {
  if (model.overflow != OverflowPolicy::kDrop) return 0;
  const double pairs = static_cast<double>(model.capacity_factor) *
                       static_cast<double>(num_tokens) * model.top_k /
                       model.num_experts;
  return static_cast<int64_t>(std::ceil(pairs));
}

Routing RouteTokens(absl::Span<const float> x, int64_t num_tokens, absl::Span<const float> gate,
                    const ModelConfig& model) {
  MOE_CHECK(static_cast<int64_t>(x.size()) == num_tokens * model.d_model);
  const int width = model.gate_width();
  MOE_CHECK(static_cast<int64_t>(gate.size()) == model.d_model * width);
  const int num_experts = model.num_experts;
  const int k = model.top_k;
  const int shared = model.shared_slices;
  const PairIndex pairs(k + shared);
  Routing routing;
  routing.num_tokens = num_tokens;
  routing.num_experts = num_experts;
  routing.top_k = k;
  routing.shared = shared;
  routing.probs.resize(num_tokens * num_experts);
  routing.expert_ids.resize(pairs.Count(num_tokens));
  routing.weights.resize(pairs.Count(num_tokens));
  routing.dropped.assign(pairs.Count(num_tokens), 0);
  routing.expert_tokens.assign(model.experts_per_layer(), 0);
  routing.capacity = ExpertCapacity(model, num_tokens);
  routing.renormalized = model.gate.renormalize;
  routing.scaling_factor = model.gate.scaling_factor;
  routing.aux_loss_coef = model.gate.aux_loss_coef;
  routing.z_loss_coef = model.gate.z_loss_coef;
  routing.log_z.resize(num_tokens);

  GateMatmul matmul(gate, model.d_model, width);
  std::vector<float> block_logits(kTokenBlock * width);
  ExpertChooser chooser(model.gate, num_experts, k);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int in_block = static_cast<int>(t % kTokenBlock);
    if (in_block == 0) {
      const int tokens = static_cast<int>(std::min<int64_t>(kTokenBlock, num_tokens - t));
      matmul.Block(x.data() + t * model.d_model, tokens, block_logits.data());
    }
    const absl::Span<const float> logits =
        absl::MakeConstSpan(block_logits).subspan(in_block * width, num_experts);
    absl::Span<float> probs =
        absl::MakeSpan(routing.probs).subspan(t * num_experts, num_experts);
    routing.log_z[t] = Softmax(logits, probs);
    absl::Span<int32_t> chosen =
        absl::MakeSpan(routing.expert_ids).subspan(pairs.Pair(t, 0), k);
    chooser.Choose(logits, chosen);
    double chosen_sum = 0;
    for (int j = 0; j < k; ++j) chosen_sum += probs[chosen[j]];
    if (!routing.renormalized) chosen_sum = 1.0;
    for (int j = 0; j < k; ++j) {
      routing.weights[pairs.Pair(t, j)] =
          static_cast<float>(probs[chosen[j]] / chosen_sum * routing.scaling_factor);
    }
    if (shared > 0) {
      // Qwen2-MoE: sigmoid(x w_s), the same for every slice of the shared
      // expert (its output is their sum).
      const double logit = block_logits[in_block * width + num_experts];
      const float s = static_cast<float>(1.0 / (1.0 + std::exp(-logit)));
      for (int i = 0; i < shared; ++i) {
        const int64_t p = pairs.Pair(t, k + i);
        routing.expert_ids[p] = num_experts + i;
        routing.weights[p] = s;
      }
    }
  }
  ApplyCapacity(routing);
  Losses(routing);
  return routing;
}

void GateBackward(const Routing& routing, absl::Span<const float> x, absl::Span<const float> gate,
                  absl::Span<const double> d_weight, absl::Span<float> dx,
                  absl::Span<float> d_gate) {
  const int k = routing.top_k;
  const PairIndex pairs = routing.pairs();
  const int num_experts = routing.num_experts;
  // W_g's columns: the routed experts' logits, then the shared expert's gate.
  const int width = num_experts + (routing.shared > 0 ? 1 : 0);
  const int64_t d_model = static_cast<int64_t>(gate.size()) / width;
  MOE_CHECK(static_cast<int64_t>(gate.size()) == d_model * width);
  MOE_CHECK(d_gate.size() == gate.size());
  MOE_CHECK(static_cast<int64_t>(d_weight.size()) == pairs.Count(routing.num_tokens));
  MOE_CHECK(static_cast<int64_t>(x.size()) == routing.num_tokens * d_model);
  MOE_CHECK(dx.size() == x.size());
  const float* w_g = gate.data();
  float* dw_g = d_gate.data();
  std::vector<double> d_prob(num_experts);
  std::vector<float> d_logit(width);
  // The load-balancing loss's gradient through each token's probabilities
  // (the counts are piecewise constant): the same for every token.
  std::vector<double> d_prob_aux(num_experts, 0.0);
  const double tokens = static_cast<double>(routing.num_tokens);
  if (routing.aux_loss_coef > 0) {
    for (int m = 0; m < num_experts; ++m) {
      d_prob_aux[m] =
          routing.aux_loss_coef * num_experts * routing.chosen_count[m] / (tokens * tokens);
    }
  }
  for (int64_t t = 0; t < routing.num_tokens; ++t) {
    const float* probs = routing.probs.data() + t * num_experts;
    double chosen_sum = 0, weighted = 0;
    for (int j = 0; j < k; ++j) {
      const int64_t p = pairs.Pair(t, j);
      chosen_sum += probs[routing.expert_ids[p]];
      weighted += d_weight[p] * routing.weights[p];
    }
    std::copy(d_prob_aux.begin(), d_prob_aux.end(), d_prob.begin());
    const double scale = routing.scaling_factor;
    for (int j = 0; j < k; ++j) {
      const int64_t p = pairs.Pair(t, j);
      d_prob[routing.expert_ids[p]] += routing.renormalized
                                           ? (scale * d_weight[p] - weighted) / chosen_sum
                                           : scale * d_weight[p];
    }
    double dot = 0;
    for (int m = 0; m < num_experts; ++m) dot += d_prob[m] * probs[m];
    // d(z_coef mean_t lse_t^2)/dlogit = z_coef 2 lse_t softmax / T.
    const double z = routing.z_loss_coef * 2 * routing.log_z[t] / tokens;
    for (int m = 0; m < num_experts; ++m) {
      d_logit[m] = static_cast<float>(probs[m] * (d_prob[m] - dot + z));
    }
    if (routing.shared > 0) {
      // Through s = sigmoid(x w_s), every slice's weight: ds/dlogit = s (1 - s).
      double d_s = 0;
      for (int i = 0; i < routing.shared; ++i) d_s += d_weight[pairs.Pair(t, k + i)];
      const double s = routing.weights[pairs.Pair(t, k)];
      d_logit[num_experts] = static_cast<float>(d_s * s * (1 - s));
    }
    const float* x_row = x.data() + t * d_model;
    float* dx_row = dx.data() + t * d_model;
    for (int64_t i = 0; i < d_model; ++i) {
      const float* g_row = w_g + i * width;
      float* dg_row = dw_g + i * width;
      double sum = 0;
      for (int m = 0; m < width; ++m) {
        sum += static_cast<double>(g_row[m]) * d_logit[m];
        dg_row[m] += x_row[i] * d_logit[m];
      }
      dx_row[i] += static_cast<float>(sum);
    }
  }
}

std::vector<std::vector<int64_t>> KeptPairsByExpert(const Routing& routing) {
  std::vector<std::vector<int64_t>> pairs(routing.expert_tokens.size());
  for (size_t e = 0; e < pairs.size(); ++e) pairs[e].reserve(routing.expert_tokens[e]);
  for (int64_t p = 0; p < routing.pairs().Count(routing.num_tokens); ++p) {
    if (!routing.dropped[p]) pairs[routing.expert_ids[p]].push_back(p);
  }
  return pairs;
}

}  // namespace moe
