#include "common/optimizer.h"

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

}  // namespace
}  // namespace moe
