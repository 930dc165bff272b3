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
  const Routing r = RouteTokens(std::vector<float>{1.0f, 2.0f}, 1, Gate4(), model);
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
  const Routing r = RouteTokens(std::vector<float>{0.0f, 0.0f}, 1, Gate4(), Model(4, 3));
  EXPECT_THAT(r.expert_ids, ElementsAre(0, 1, 2));
  EXPECT_NEAR(r.weights[0], 1.0 / 3, 1e-7);
  // x = [1, 1]: logits [1, 1, 2, 0].
  const Routing r2 = RouteTokens(std::vector<float>{1.0f, 1.0f}, 1, Gate4(), Model(4, 2));
  EXPECT_THAT(r2.expert_ids, ElementsAre(2, 0));
}

TEST(GatingTest, TopOneHasWeightOne) {
  const Routing r = RouteTokens(std::vector<float>{5.0f, -1.0f}, 1, Gate4(), Model(4, 1));
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
  const Routing r = RouteTokens(std::vector<float>{1, 2, 2, 1, 3, 1}, 3, Gate4(), model);
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
  const Routing r = RouteTokens(std::vector<float>{1, 2, 1, 3}, 2, Gate4(), model);
  EXPECT_THAT(r.expert_ids, ElementsAre(2, 1, 2, 1));
  // Expert 2: token 0's first choice wins; expert 1: token 0's second.
  EXPECT_THAT(r.dropped, ElementsAre(0, 0, 1, 1));
}

TEST(GatingTest, EmptyBatch) {
  const Routing r = RouteTokens({}, 0, Gate4(), Model(4, 2));
  EXPECT_EQ(r.num_tokens, 0);
  EXPECT_TRUE(r.expert_ids.empty());
  EXPECT_THAT(r.expert_tokens, ElementsAre(0, 0, 0, 0));
}

}  // namespace
}  // namespace moe
