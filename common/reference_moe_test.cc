#include "common/reference_moe.h"

#include <functional>

#include "common/deterministic_init.h"
#include "common/reference_expert.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::moe::testing::RandomTensor;
using ::moe::testing::RelativeError;
using ::moe::testing::TensorNear;
using ::testing::HasSubstr;

ModelConfig Model(int experts, int k) {
  ModelConfig model;
  model.d_model = 5;
  model.d_ff = 7;
  model.num_experts = experts;
  model.top_k = k;
  model.seed = 11;
  return model;
}

TEST(ReferenceExpertTest, MatchesAHandComputation) {
  // d_model = d_ff = 1: y = 3 * ReLU(2x - 1) + 0.5.
  ExpertWeights w{FloatTensor({1, 1}, {2}), FloatTensor({1}, {-1}),
                  FloatTensor({1, 1}, {3}), FloatTensor({1}, {0.5f})};
  std::vector<float> x = {1.0f, 0.0f, 2.0f}, hidden(3), y(3);
  ReferenceExpertForward(w, x, 3, absl::MakeSpan(hidden), absl::MakeSpan(y));
  EXPECT_THAT(hidden, ::testing::ElementsAre(1.0f, -1.0f, 3.0f));
  EXPECT_THAT(y, ::testing::ElementsAre(3.5f, 0.5f, 9.5f));

  // dL/dy = 1 for every row: rows 0 and 2 are active.
  ExpertWeights grads{FloatTensor({1, 1}), FloatTensor({1}), FloatTensor({1, 1}),
                      FloatTensor({1})};
  std::vector<float> dy = {1, 1, 1}, dx(3);
  ReferenceExpertBackward(w, x, hidden, dy, 3, absl::MakeSpan(dx), grads);
  EXPECT_THAT(dx, ::testing::ElementsAre(6.0f, 0.0f, 6.0f));   // 3 * 2
  EXPECT_EQ(grads.w2.values()[0], 1.0f + 3.0f);                 // sum of ReLU
  EXPECT_EQ(grads.b2.values()[0], 3.0f);
  EXPECT_EQ(grads.b1.values()[0], 6.0f);                        // 3 + 3
  EXPECT_EQ(grads.w1.values()[0], 3.0f * 1 + 3.0f * 2);
}

TEST(ReferenceMoeTest, OneExpertIsThatExpert) {
  const ModelConfig model = Model(1, 1);
  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, InitAllWeights(model));
  ASSERT_TRUE(moe.ok()) << moe.status();
  const FloatTensor x = RandomTensor({9, 5}, 1);
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  ASSERT_TRUE(forward.ok());
  FloatTensor expected({9, 5});
  std::vector<float> hidden(9 * 7);
  ReferenceExpertForward(moe->weights().experts.at(0), x.values(), 9,
                         absl::MakeSpan(hidden), expected.mutable_values());
  EXPECT_EQ(forward->y, expected);
}

TEST(ReferenceMoeTest, OutputIsTheWeightedSumOfTheChosenExperts) {
  const ModelConfig model = Model(4, 2);
  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, InitAllWeights(model));
  ASSERT_TRUE(moe.ok());
  const FloatTensor x = RandomTensor({3, 5}, 2);
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  ASSERT_TRUE(forward.ok());
  for (int64_t t = 0; t < 3; ++t) {
    std::vector<double> expected(5, 0.0);
    for (int j = 0; j < 2; ++j) {
      const int e = forward->routing.expert_ids[t * 2 + j];
      std::vector<float> hidden(7), y(5);
      ReferenceExpertForward(moe->weights().experts.at(e), x.row(t), 1,
                             absl::MakeSpan(hidden), absl::MakeSpan(y));
      for (int m = 0; m < 5; ++m) expected[m] += forward->routing.weights[t * 2 + j] * y[m];
    }
    for (int m = 0; m < 5; ++m) EXPECT_NEAR(forward->y.row(t)[m], expected[m], 1e-6);
  }
}

TEST(ReferenceMoeTest, EmptyBatch) {
  const ModelConfig model = Model(4, 2);
  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, InitAllWeights(model));
  ASSERT_TRUE(moe.ok());
  const FloatTensor x({0, 5});
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  ASSERT_TRUE(forward.ok());
  EXPECT_EQ(forward->y.shape(), Shape({0, 5}));
  absl::StatusOr<ReferenceGradients> grads = moe->Backward(x, *forward, FloatTensor({0, 5}));
  ASSERT_TRUE(grads.ok());
  EXPECT_EQ(grads->dx.num_elements(), 0);
  for (float v : grads->params.gate->values()) EXPECT_EQ(v, 0.0f);
}

TEST(ReferenceMoeTest, RejectsBadWeightsAndInputs) {
  const ModelConfig model = Model(4, 2);
  MoeWeights missing = InitAllWeights(model);
  missing.experts.erase(3);
  EXPECT_THAT(ReferenceMoe::Create(model, missing).status().message(),
              HasSubstr("expert 3 is missing"));
  MoeWeights no_gate = InitAllWeights(model);
  no_gate.gate.reset();
  EXPECT_FALSE(ReferenceMoe::Create(model, no_gate).ok());
  MoeWeights bad_shape = InitAllWeights(model);
  bad_shape.experts.at(1).b2 = FloatTensor({4});
  EXPECT_THAT(ReferenceMoe::Create(model, bad_shape).status().message(),
              HasSubstr("expert 1: expected shape [5], got [4]"));

  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, InitAllWeights(model));
  ASSERT_TRUE(moe.ok());
  EXPECT_THAT(moe->Forward(FloatTensor({2, 4})).status().message(),
              HasSubstr("x: expected [tokens, 5], got [2, 4]"));
  const FloatTensor x = RandomTensor({2, 5}, 3);
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  ASSERT_TRUE(forward.ok());
  EXPECT_THAT(moe->Backward(x, *forward, FloatTensor({3, 5})).status().message(),
              HasSubstr("grad_output: expected [2, 5], got [3, 5]"));
}

// Finite differences: L = sum(y * R), so dL/dy = R.
struct GradientCase {
  int experts;
  int top_k;
  bool drop;
};

class ReferenceGradientTest : public ::testing::TestWithParam<GradientCase> {};

// Everything piecewise-constant in a forward: routing, drops, ReLU signs.
std::vector<int> Pattern(const ReferenceForward& f) {
  std::vector<int> pattern(f.routing.expert_ids.begin(), f.routing.expert_ids.end());
  pattern.insert(pattern.end(), f.routing.dropped.begin(), f.routing.dropped.end());
  for (const ExpertActivations& act : f.experts) {
    for (float h : act.hidden_pre.values()) pattern.push_back(h > 0);
  }
  return pattern;
}

TEST_P(ReferenceGradientTest, MatchesCentralFiniteDifferences) {
  const GradientCase c = GetParam();
  ModelConfig model = Model(c.experts, c.top_k);
  if (c.drop) {
    model.overflow = OverflowPolicy::kDrop;
    model.capacity_factor = 0.75f;
  }
  const int64_t num_tokens = 6;
  MoeWeights weights = InitAllWeights(model);
  FloatTensor x = RandomTensor({num_tokens, 5}, 4, 2.0f);
  const FloatTensor r = RandomTensor({num_tokens, 5}, 5);

  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, weights);
  ASSERT_TRUE(moe.ok());
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  ASSERT_TRUE(forward.ok());
  if (c.drop) {
    EXPECT_GT(forward->routing.dropped_pairs, 0);
  }
  absl::StatusOr<ReferenceGradients> grads = moe->Backward(x, *forward, r);
  ASSERT_TRUE(grads.ok());

  // Loss and pattern with `value` perturbed by `delta`.
  auto evaluate = [&](float* value, float delta, std::vector<int>* pattern) {
    const float saved = *value;
    *value = saved + delta;
    absl::StatusOr<ReferenceMoe> m = ReferenceMoe::Create(model, weights);
    absl::StatusOr<ReferenceForward> f = m->Forward(x);
    *value = saved;
    *pattern = Pattern(*f);
    double loss = 0;
    for (int64_t i = 0; i < f->y.num_elements(); ++i) {
      loss += static_cast<double>(f->y.values()[i]) * r.values()[i];
    }
    return loss;
  };
  int skipped = 0, checked = 0;
  auto check = [&](absl::string_view name, absl::Span<float> values,
                   absl::Span<const float> analytic) {
    ASSERT_EQ(values.size(), analytic.size()) << name;
    std::vector<float> numeric(values.size());
    std::vector<float> compared(values.size());
    constexpr float kStep = 1e-3f;
    for (size_t i = 0; i < values.size(); ++i) {
      std::vector<int> plus, minus;
      const double up = evaluate(&values[i], kStep, &plus);
      const double down = evaluate(&values[i], -kStep, &minus);
      if (plus != minus) {  // a kink between the two points: not comparable
        ++skipped;
        continue;
      }
      ++checked;
      numeric[i] = static_cast<float>((up - down) / (2 * kStep));
      compared[i] = analytic[i];
    }
    EXPECT_LE(RelativeError(compared, numeric), 2e-3) << name;
  };

  check("x", x.mutable_values(), grads->dx.values());
  check("gate", weights.gate->mutable_values(), grads->params.gate->values());
  for (int e = 0; e < model.num_experts; ++e) {
    for (ExpertTensor which : kAllExpertTensors) {
      check(absl::StrCat("expert ", e, " tensor ", static_cast<int>(which)),
            weights.experts.at(e).tensor(which).mutable_values(),
            grads->params.experts.at(e).tensor(which).values());
    }
  }
  EXPECT_LT(skipped, checked / 20) << "too many kinks to trust the check";
}

INSTANTIATE_TEST_SUITE_P(Routing, ReferenceGradientTest,
                         ::testing::Values(GradientCase{4, 1, false},
                                           GradientCase{4, 2, false},
                                           GradientCase{5, 3, false},
                                           GradientCase{4, 2, true}));

TEST(ReferenceMoeTest, TopOneGateGetsNoGradient) {
  // With k = 1 the weight is p / p = 1 whatever the logits.
  const ModelConfig model = Model(4, 1);
  absl::StatusOr<ReferenceMoe> moe = ReferenceMoe::Create(model, InitAllWeights(model));
  const FloatTensor x = RandomTensor({5, 5}, 6);
  absl::StatusOr<ReferenceForward> forward = moe->Forward(x);
  absl::StatusOr<ReferenceGradients> grads = moe->Backward(x, *forward, RandomTensor({5, 5}, 7));
  ASSERT_TRUE(grads.ok());
  for (float v : grads->params.gate->values()) EXPECT_NEAR(v, 0.0f, 1e-7);
}

}  // namespace
}  // namespace moe
