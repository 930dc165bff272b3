#include "common/optimizer.h"

#include <cmath>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatEq;

TEST(OptimizerTest, PlainSgd) {
  OptimizerOptions options;
  FloatTensor w({2}, {1.0f, -2.0f});
  ApplySgd(options, 0.5f, FloatTensor({2}, {2.0f, 4.0f}), w, nullptr);
  EXPECT_THAT(w.values(), ElementsAre(0.0f, -4.0f));
}

TEST(OptimizerTest, MomentumFollowsPyTorch) {
  // torch.optim.SGD([w], lr=0.1, momentum=0.9) with gradients 1 then 2:
  // v1 = 1, w1 = 1 - 0.1;  v2 = 0.9 + 2 = 2.9, w2 = 0.9 - 0.29 = 0.61.
  OptimizerOptions options{OptimizerType::kSgdMomentum, 0.1f, 0.9f};
  FloatTensor w({1}, {1.0f}), v({1});
  ApplySgd(options, 0.1f, FloatTensor({1}, {1.0f}), w, &v);
  EXPECT_THAT(w.values(), ElementsAre(FloatEq(0.9f)));
  ApplySgd(options, 0.1f, FloatTensor({1}, {2.0f}), w, &v);
  EXPECT_THAT(v.values(), ElementsAre(FloatEq(2.9f)));
  EXPECT_THAT(w.values(), ElementsAre(FloatEq(0.61f)));
}


TEST(OptimizerTest, ReportsNonFiniteResults) {
  OptimizerOptions sgd;
  std::vector<float> w = {1.0f, 2.0f}, out(2);
  EXPECT_TRUE(SgdUpdate(sgd, 0.5f, std::vector<float>{1.0f, 1.0f}, w, {}, absl::MakeSpan(out), {}));
  EXPECT_FALSE(SgdUpdate(sgd, 1e10f, std::vector<float>{1e30f, 0.0f}, w, {}, absl::MakeSpan(out),
                         {}));
  EXPECT_FALSE(SgdUpdate(sgd, 0.5f, std::vector<float>{std::nanf(""), 0.0f}, w, {},
                         absl::MakeSpan(out), {}));
  OptimizerOptions momentum{OptimizerType::kSgdMomentum, 0.1f, 0.9f};
  std::vector<float> v = {0.0f, 3e38f}, new_v(2);
  EXPECT_FALSE(SgdUpdate(momentum, 0.1f, std::vector<float>{0.0f, 3e38f}, w, v,
                         absl::MakeSpan(out), absl::MakeSpan(new_v)));
}
}  // namespace
}  // namespace moe
