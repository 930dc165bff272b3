#include "common/optimizer.h"

#include <cmath>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatEq;
using ::testing::FloatNear;

UpdateStep Lr(float lr, uint64_t step = 1) { return {lr, step, 1.0f}; }

TEST(OptimizerTest, PlainSgd) {
  OptimizerOptions options;
  FloatTensor w({2}, {1.0f, -2.0f});
  ApplyOptimizer(options, Lr(0.5f), FloatTensor({2}, {2.0f, 4.0f}), w, nullptr, nullptr);
  EXPECT_THAT(w.values(), ElementsAre(0.0f, -4.0f));
}

TEST(OptimizerTest, MomentumFollowsPyTorch) {
  // torch.optim.SGD([w], lr=0.1, momentum=0.9) with gradients 1 then 2:
  // v1 = 1, w1 = 1 - 0.1;  v2 = 0.9 + 2 = 2.9, w2 = 0.9 - 0.29 = 0.61.
  OptimizerOptions options{OptimizerType::kSgdMomentum, 0.1f, 0.9f};
  FloatTensor w({1}, {1.0f}), v({1});
  ApplyOptimizer(options, Lr(0.1f), FloatTensor({1}, {1.0f}), w, &v, nullptr);
  EXPECT_THAT(w.values(), ElementsAre(FloatEq(0.9f)));
  ApplyOptimizer(options, Lr(0.1f, 2), FloatTensor({1}, {2.0f}), w, &v, nullptr);
  EXPECT_THAT(v.values(), ElementsAre(FloatEq(2.9f)));
  EXPECT_THAT(w.values(), ElementsAre(FloatEq(0.61f)));
}

TEST(OptimizerTest, AdamWFollowsPyTorch) {
  // torch 1.13: w = [1, -2], torch.optim.AdamW([w], lr=0.1) (betas 0.9,
  // 0.999, eps 1e-8, weight_decay 0.01), three steps with the gradients
  // below; printed w, exp_avg and exp_avg_sq after each.
  OptimizerOptions options;
  options.type = OptimizerType::kAdamW;
  FloatTensor w({2}, {1.0f, -2.0f}), m({2}), v({2});
  const std::vector<std::vector<float>> grads = {{0.5f, -1.0f}, {2.0f, 0.1f}, {-3.0f, 0.0f}};
  const std::vector<std::vector<float>> want_w = {
      {0.899000049f, -1.898f}, {0.809663355f, -1.83683717f}, {0.822807968f, -1.7891885f}};
  const std::vector<std::vector<float>> want_m = {
      {0.05f, -0.1f}, {0.245000005f, -0.0799999982f}, {-0.0795000121f, -0.0719999969f}};
  const std::vector<std::vector<float>> want_v = {{0.000250000012f, 0.00100000005f},
                                                  {0.00424975017f, 0.001009f},
                                                  {0.0132455006f, 0.00100799103f}};
  for (size_t t = 0; t < grads.size(); ++t) {
    ASSERT_TRUE(ApplyOptimizer(options, Lr(0.1f, t + 1), FloatTensor({2}, grads[t]), w, &m, &v));
    for (int i = 0; i < 2; ++i) {
      EXPECT_THAT(w.values()[i], FloatNear(want_w[t][i], 1e-6f)) << "step " << t + 1;
      EXPECT_THAT(m.values()[i], FloatNear(want_m[t][i], 1e-7f)) << "step " << t + 1;
      EXPECT_THAT(v.values()[i], FloatNear(want_v[t][i], 1e-9f)) << "step " << t + 1;
    }
  }
}

TEST(OptimizerTest, ClipScaleFollowsPyTorch) {
  // torch.nn.utils.clip_grad_norm_([a, b], 1.0), grads [3, 0] and [4]:
  // norm 5, both scaled by 1 / (5 + 1e-6).
  OptimizerOptions options;
  options.max_grad_norm = 1.0f;
  const double squared =
      SquaredNorm(std::vector<float>{3.0f, 0.0f}) + SquaredNorm(std::vector<float>{4.0f});
  EXPECT_EQ(squared, 25.0);
  const float scale = ClipScale(options, squared);
  EXPECT_THAT(3.0f * scale, FloatEq(0.5999999046325684f));
  EXPECT_THAT(4.0f * scale, FloatEq(0.7999998331069946f));
  // Under the bound, or off: gradients as they are.
  EXPECT_EQ(ClipScale(options, 0.25), 1.0f);
  EXPECT_EQ(ClipScale(OptimizerOptions{}, 1e12), 1.0f);
  // A non-finite norm scales by 0, and a NaN gradient still fails the
  // finite check.
  EXPECT_EQ(ClipScale(options, std::nan("")), 0.0f);
  std::vector<float> w = {1.0f}, out(1);
  EXPECT_FALSE(OptimizerUpdate(options, {0.1f, 1, 0.0f}, std::vector<float>{std::nanf("")}, w, {},
                               {}, absl::MakeSpan(out), {}, {}));
}

TEST(OptimizerTest, ReportsNonFiniteResults) {
  OptimizerOptions sgd;
  std::vector<float> w = {1.0f, 2.0f}, out(2);
  EXPECT_TRUE(OptimizerUpdate(sgd, Lr(0.5f), std::vector<float>{1.0f, 1.0f}, w, {}, {},
                              absl::MakeSpan(out), {}, {}));
  EXPECT_FALSE(OptimizerUpdate(sgd, Lr(1e10f), std::vector<float>{1e30f, 0.0f}, w, {}, {},
                               absl::MakeSpan(out), {}, {}));
  EXPECT_FALSE(OptimizerUpdate(sgd, Lr(0.5f), std::vector<float>{std::nanf(""), 0.0f}, w, {}, {},
                               absl::MakeSpan(out), {}, {}));
  OptimizerOptions momentum{OptimizerType::kSgdMomentum, 0.1f, 0.9f};
  std::vector<float> v = {0.0f, 3e38f}, new_v(2);
  EXPECT_FALSE(OptimizerUpdate(momentum, Lr(0.1f), std::vector<float>{0.0f, 3e38f}, w, v, {},
                               absl::MakeSpan(out), absl::MakeSpan(new_v), {}));
  OptimizerOptions adamw;
  adamw.type = OptimizerType::kAdamW;
  std::vector<float> m = {0.0f, 0.0f}, s = {0.0f, 0.0f}, new_m(2), new_s(2);
  EXPECT_FALSE(OptimizerUpdate(adamw, Lr(0.1f), std::vector<float>{1e30f, 0.0f}, w, m, s,
                               absl::MakeSpan(out), absl::MakeSpan(new_m), absl::MakeSpan(new_s)));
  EXPECT_TRUE(OptimizerUpdate(adamw, Lr(0.1f), std::vector<float>{1e3f, 0.0f}, w, m, s,
                              absl::MakeSpan(out), absl::MakeSpan(new_m), absl::MakeSpan(new_s)));
}

}  // namespace
}  // namespace moe
