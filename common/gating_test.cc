#include "common/gating.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;

ModelConfig Model(int experts, int k) {
  ModelConfig model;
  model.d_model = 2;
  model.d_ff = 1;
  model.num_experts = experts;
  model.top_k = k;
  return model;
}

// A gate whose logits for x = [a, b] are [a, b, a + b, 0] (d_model 2, E 4).
FloatTensor Gate4() { return FloatTensor({2, 4}, {1, 0, 1, 0, 0, 1, 1, 0}); }

TEST(GatingTest, PicksTheLargestLogitsWithRenormalisedWeights) {
  const ModelConfig model = Model(4, 2);
  const Routing r = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), model);
  // logits [1, 2, 3, 0]: experts 2 then 1.
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 1));
  const double e0 = std::exp(1.0), e1 = std::exp(2.0), e2 = std::exp(3.0), e3 = 1.0;
  const double sum = e0 + e1 + e2 + e3;
  EXPECT_NEAR(r.probs[2], e2 / sum, 1e-7);
  EXPECT_NEAR(r.weights[0], e2 / (e2 + e1), 1e-7);
  EXPECT_NEAR(r.weights[1], e1 / (e2 + e1), 1e-7);
  EXPECT_NEAR(r.weights[0] + r.weights[1], 1.0, 1e-7);
  EXPECT_THAT(r.expert_tokens, ElementsAre(0, 1, 1, 0));
  EXPECT_EQ(r.dropped_pairs, 0);
}

TEST(GatingTest, TiesGoToTheLowerExpertId) {
  // x = [0, 0]: every logit is 0.
  const Routing r = RouteTokens(std::vector<float>{0.0f, 0.0f}, 1, Gate4().values(), Model(4, 3));
  EXPECT_THAT(r.expert_ids, ElementsAre(0, 1, 2));
  EXPECT_NEAR(r.weights[0], 1.0 / 3, 1e-7);
  // x = [1, 1]: logits [1, 1, 2, 0].
  const Routing r2 = RouteTokens(std::vector<float>{1.0f, 1.0f}, 1, Gate4().values(), Model(4, 2));
  EXPECT_THAT(r2.expert_ids, ElementsAre(2, 0));
}

TEST(GatingTest, TopOneHasWeightOne) {
  const Routing r = RouteTokens(std::vector<float>{5.0f, -1.0f}, 1, Gate4().values(), Model(4, 1));
  EXPECT_THAT(r.expert_ids, ElementsAre(0));
  EXPECT_EQ(r.weights[0], 1.0f);
}

TEST(GatingTest, CapacityFormula) {
  ModelConfig model = Model(4, 2);
  EXPECT_EQ(ExpertCapacity(model, 100), 0);  // dropless: unlimited
  model.overflow = OverflowPolicy::kDrop;
  model.capacity_factor = 1.0f;
  EXPECT_EQ(ExpertCapacity(model, 100), 50);   // 1.0 * 100 * 2 / 4
  EXPECT_EQ(ExpertCapacity(model, 3), 2);      // ceil(1.5)
  model.capacity_factor = 1.25f;
  EXPECT_EQ(ExpertCapacity(model, 10), 7);     // ceil(6.25)
}

TEST(GatingTest, DropAdmitsFirstChoicesBeforeSecondChoicesInTokenOrder) {
  ModelConfig model = Model(4, 2);
  model.overflow = OverflowPolicy::kDrop;
  model.capacity_factor = 1.0f;  // 3 tokens: capacity ceil(1.5) = 2
  // Tokens: [1, 2] -> (2, 1); [2, 1] -> (2, 0); [3, 1] -> (2, 0).
  const Routing r = RouteTokens(std::vector<float>{1, 2, 2, 1, 3, 1}, 3, Gate4().values(), model);
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 1, 2, 0, 2, 0));
  EXPECT_EQ(r.capacity, 2);
  // Expert 2 is every token's first choice: tokens 0 and 1 fit, token 2 drops.
  EXPECT_THAT(r.dropped, ElementsAre(0, 0, 0, 0, 1, 0));
  EXPECT_EQ(r.dropped_pairs, 1);
  EXPECT_THAT(r.expert_tokens, ElementsAre(2, 1, 2, 0));
  // Weights are not renormalised after a drop.
  EXPECT_NEAR(r.weights[4] + r.weights[5], 1.0, 1e-6);

  const auto pairs = KeptPairsByExpert(r);
  EXPECT_THAT(pairs[0], ElementsAre(3, 5));
  EXPECT_THAT(pairs[1], ElementsAre(1));
  EXPECT_THAT(pairs[2], ElementsAre(0, 2));
  EXPECT_TRUE(pairs[3].empty());
}

TEST(GatingTest, SecondChoicesDropBeforeLaterFirstChoices) {
  ModelConfig model = Model(4, 2);
  model.overflow = OverflowPolicy::kDrop;
  model.capacity_factor = 0.5f;  // 2 tokens: capacity ceil(0.5) = 1
  // Token 0: [1, 2] -> (2, 1). Token 1: [1, 3] -> logits [1, 3, 4, 0] -> (2, 1).
  const Routing r = RouteTokens(std::vector<float>{1, 2, 1, 3}, 2, Gate4().values(), model);
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 1, 2, 1));
  // Expert 2: token 0's first choice wins; expert 1: token 0's second.
  EXPECT_THAT(r.dropped, ElementsAre(0, 0, 1, 1));
}

TEST(GatingTest, WithoutRenormalisationTheWeightsAreTheScaledProbabilities) {
  ModelConfig model = Model(4, 2);
  model.gate.renormalize = false;
  model.gate.scaling_factor = 2.5;
  const Routing r = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), model);
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 1));
  EXPECT_FLOAT_EQ(r.weights[0], 2.5f * r.probs[2]);
  EXPECT_FLOAT_EQ(r.weights[1], 2.5f * r.probs[1]);
  // Switch's top-1: the one weight is its probability.
  model = Model(4, 1);
  model.gate.renormalize = false;
  const Routing top1 = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), model);
  EXPECT_EQ(top1.weights[0], top1.probs[2]);
}

TEST(GatingTest, GroupsLimitTheChoiceToTheGroupsWithTheBestExperts) {
  // logits [1, 2, 3, 0]; groups {0, 1} (best 2) and {2, 3} (best 3).
  ModelConfig model = Model(4, 2);
  model.gate.num_groups = 2;
  model.gate.top_groups = 1;
  const Routing r = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), model);
  // Expert 1 (logit 2) is outside the chosen group; expert 3 (logit 0) in.
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 3));
  model.gate.top_groups = 2;
  EXPECT_THAT(RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), model).expert_ids,
              ElementsAre(2, 1));
  // Equal best logits: the lower group. x = [1, 0]: logits [1, 0, 1, 0].
  model.gate.top_groups = 1;
  EXPECT_THAT(RouteTokens(std::vector<float>{1.0f, 0.0f}, 1, Gate4().values(), model).expert_ids,
              ElementsAre(0, 1));
}

// dL/dW_g and dL/dx from GateBackward against central differences of
// L = sum_p c_p weight_p (+ the weighted load-balancing and z losses) for
// `x` (3 tokens of d_model 2) and `gate`.
void ExpectGateBackwardMatchesFiniteDifferences(const ModelConfig& model,
                                                const std::vector<float>& x,
                                                const FloatTensor& gate) {
  const Routing routing = RouteTokens(x, 3, gate.values(), model);
  std::vector<double> c(routing.weights.size());
  for (size_t p = 0; p < c.size(); ++p) c[p] = 0.3 + 0.2 * static_cast<double>(p);
  auto loss = [&](absl::Span<const float> xs, const FloatTensor& g) {
    const Routing r = RouteTokens(xs, 3, g.values(), model);
    EXPECT_EQ(r.expert_ids, routing.expert_ids);  // the choice holds
    double sum = model.gate.aux_loss_coef * r.aux_loss + model.gate.z_loss_coef * r.z_loss;
    for (size_t p = 0; p < c.size(); ++p) sum += c[p] * r.weights[p];
    return sum;
  };
  std::vector<float> dx(x.size(), 0.0f);
  FloatTensor d_gate(gate.shape());
  GateBackward(routing, x, gate.values(), c, absl::MakeSpan(dx), d_gate.mutable_values());
  constexpr float kH = 1e-2f;
  for (size_t i = 0; i < gate.values().size(); ++i) {
    FloatTensor plus = gate, minus = gate;
    plus.mutable_values()[i] += kH;
    minus.mutable_values()[i] -= kH;
    EXPECT_NEAR(d_gate.values()[i], (loss(x, plus) - loss(x, minus)) / (2 * kH), 2e-3)
        << "W_g entry " << i;
  }
  for (size_t i = 0; i < x.size(); ++i) {
    std::vector<float> plus = x, minus = x;
    plus[i] += kH;
    minus[i] -= kH;
    EXPECT_NEAR(dx[i], (loss(plus, gate) - loss(minus, gate)) / (2 * kH), 2e-3) << "x " << i;
  }
}

// Every gate variant's backward.
TEST(GatingTest, TheBackwardOfEveryVariantMatchesFiniteDifferences) {
  const std::vector<float> x = {0.7f, -0.4f, 0.2f, 0.9f, -1.1f, 0.6f};  // 3 tokens
  const FloatTensor gate({2, 4}, {0.9f, -0.3f, 0.4f, 0.1f, -0.2f, 0.8f, 0.5f, -0.6f});
  for (bool renormalize : {true, false}) {
    for (int groups : {0, 2}) {
      for (bool losses : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "renormalize " << renormalize << ", groups " << groups
                                          << ", losses " << losses);
        ModelConfig model = Model(4, 2);
        model.gate = {renormalize,       groups, groups == 0 ? 0 : 1, 1.5, losses ? 0.5 : 0.0,
                      losses ? 0.1 : 0.0};
        ExpectGateBackwardMatchesFiniteDifferences(model, x, gate);
      }
    }
  }
}

// Qwen2-MoE's shared expert in 2 slices: every token visits experts 4 and 5
// after its top-2, weight sigmoid(x w_s) (W_g's last column), never dropped,
// outside the losses; the backward through that sigmoid matches finite
// differences, dx and dW_g alike.
TEST(GatingTest, TheSharedExpertsSlicesFollowEveryTokensChoice) {
  ModelConfig model = Model(4, 2);
  model.shared_slices = 2;
  model.overflow = OverflowPolicy::kDrop;
  model.capacity_factor = 0.5f;  // 1 pair per routed expert for 3 tokens
  ASSERT_EQ(model.gate_width(), 5);
  const std::vector<float> x = {0.7f, -0.4f, 0.2f, 0.9f, -1.1f, 0.6f};  // 3 tokens
  const FloatTensor gate({2, 5}, {0.9f, -0.3f, 0.4f, 0.1f, 0.7f, -0.2f, 0.8f, 0.5f, -0.6f, -0.9f});
  const Routing r = RouteTokens(x, 3, gate.values(), model);
  ASSERT_EQ(r.per_token(), 4);
  for (int64_t t = 0; t < 3; ++t) {
    const double logit = 0.7 * x[2 * t] - 0.9 * x[2 * t + 1];
    for (int i = 0; i < 2; ++i) {
      const int64_t p = r.pairs().Pair(t, 2 + i);
      EXPECT_EQ(r.expert_ids[p], 4 + i);
      EXPECT_NEAR(r.weights[p], 1 / (1 + std::exp(-logit)), 1e-6);
      EXPECT_EQ(r.dropped[p], 0);
    }
  }
  // Capacity ceil(0.5 * 3 * 2 / 4) = 1 pair per routed expert: of the 6
  // routed pairs, one per expert is kept.
  EXPECT_EQ(r.dropped_pairs, 2);
  EXPECT_EQ(r.expert_tokens[4], 3);
  EXPECT_EQ(r.expert_tokens[5], 3);
  int64_t chosen = 0;
  for (int64_t c : r.chosen_count) chosen += c;
  EXPECT_EQ(chosen, 6);  // routed pairs only

  model.overflow = OverflowPolicy::kDropless;
  model.gate.aux_loss_coef = 0.5;  // the losses' gradients leave w_s alone
  ExpectGateBackwardMatchesFiniteDifferences(model, x, gate);
}

TEST(GatingTest, TheLossesAreSwitchsAndMixtrals) {
  // x = [1, 2]: logits [1, 2, 3, 0]; top-2 chooses experts 2 and 1.
  const Routing r = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4().values(), Model(4, 2));
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + 1.0);
  EXPECT_NEAR(r.z_loss, lse * lse, 1e-5);
  // E * sum_e (c_e / T) p_e = 4 (p_2 + p_1).
  EXPECT_NEAR(r.aux_loss, 4.0 * (r.probs[2] + r.probs[1]), 1e-6);
  EXPECT_THAT(r.chosen_count, ElementsAre(0, 1, 1, 0));
}

// The gate's matmul runs in blocks of tokens and experts: a token's
// logits, probabilities and weights are the same bits wherever it sits in
// a batch, alone or among others (the router and the reference may batch
// differently).
TEST(GatingTest, ATokensRoutingDoesNotDependOnItsBatch) {
  ModelConfig model = Model(21, 3);  // experts past a multiple of the block
  model.d_model = 37;
  std::vector<float> gate_values(37 * 21);
  for (size_t i = 0; i < gate_values.size(); ++i) {
    gate_values[i] = std::sin(0.37f * static_cast<float>(i));
  }
  const FloatTensor gate({37, 21}, gate_values);
  std::vector<float> x(11 * 37);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.11f * static_cast<float>(i));
  const Routing all = RouteTokens(x, 11, gate.values(), model);
  for (int64_t t = 0; t < 11; ++t) {
    const std::vector<float> row(x.begin() + t * 37, x.begin() + (t + 1) * 37);
    const Routing alone = RouteTokens(row, 1, gate.values(), model);
    EXPECT_EQ(alone.expert_ids, std::vector<int32_t>(all.expert_ids.begin() + 3 * t,
                                                     all.expert_ids.begin() + 3 * t + 3));
    EXPECT_EQ(alone.weights,
              std::vector<float>(all.weights.begin() + 3 * t, all.weights.begin() + 3 * t + 3));
    EXPECT_EQ(alone.probs,
              std::vector<float>(all.probs.begin() + 21 * t, all.probs.begin() + 21 * (t + 1)));
  }
}

TEST(GatingTest, EmptyBatch) {
  const Routing r = RouteTokens({}, 0, Gate4().values(), Model(4, 2));
  EXPECT_EQ(r.num_tokens, 0);
  EXPECT_TRUE(r.expert_ids.empty());
  EXPECT_THAT(r.expert_tokens, ElementsAre(0, 0, 0, 0));
}

}  // namespace
}  // namespace moe
