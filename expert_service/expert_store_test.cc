#include "expert_service/expert_store.h"

#include "common/bfloat16.h"
#include "common/deterministic_init.h"
#include "common/optimizer.h"
#include "common/reference_expert.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "expert_service/onednn_expert_kernel.h"
#include "expert_service/reference_expert_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::moe::testing::RandomTensor;
using ::moe::testing::TensorNear;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const absl::Time kNow = absl::FromUnixSeconds(100);

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 16;
  model.d_ff = 24;
  model.num_experts = 4;
  model.top_k = 2;
  model.seed = 3;
  return model;
}

class ExpertStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    runtime_ = *OnednnRuntime::Create(0);
    ExpertStore::Options options{Model(), "expert-1", {1 << 20, absl::Seconds(5)}};
    std::map<ExpertKey, ExpertWeights> experts;
    for (int e : {1, 3}) experts.emplace(ExpertKey(0, e), InitExpert(Model(), ExpertKey(0, e)));
    auto store = ExpertStore::Create(options, std::move(experts),
                                     [this](const ExpertWeights& w) {
                                       return OnednnExpertKernel::Create(w, DType::kFloat32,
                                                                         *runtime_);
                                     });
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  std::unique_ptr<OnednnRuntime> runtime_;
  std::unique_ptr<ExpertStore> store_;
};

TEST_F(ExpertStoreTest, ForwardIsTheExpert) {
  EXPECT_THAT(store_->HostedExperts(), ElementsAre(ExpertKey(0, 1), ExpertKey(0, 3)));
  const FloatTensor x = RandomTensor({9, 16}, 1);
  FloatTensor y({9, 16}), expected({9, 16});
  ASSERT_TRUE(store_->Forward(ExpertKey(0, 3), x.view(), y.mutable_view(), false, 0, kNow).ok());
  std::vector<float> hidden(9 * 24);
  ReferenceExpertForward(InitExpert(Model(), ExpertKey(0, 3)), x.values(), 9,
                         absl::MakeSpan(hidden), expected.mutable_values());
  EXPECT_TRUE(TensorNear(y, expected, 1e-5));
  EXPECT_EQ(store_->training_state().size(), 0u);
}

TEST_F(ExpertStoreTest, Bf16InputsAreConvertedBothWays) {
  const FloatTensor x = RandomTensor({5, 16}, 2);
  std::vector<uint16_t> x_bits(80), y_bits(80);
  FloatsToBf16(x.values(), absl::MakeSpan(x_bits));
  ASSERT_TRUE(
      store_
          ->Forward(ExpertKey(0, 1),
                    {DType::kBFloat16, {5, 16}, reinterpret_cast<const std::byte*>(x_bits.data())},
                    {DType::kBFloat16, {5, 16}, reinterpret_cast<std::byte*>(y_bits.data())}, false,
                    0, kNow)
          .ok());
  FloatTensor y({5, 16}), expected({5, 16});
  Bf16ToFloats(y_bits, y.mutable_values());
  ASSERT_TRUE(
      store_->Forward(ExpertKey(0, 1), x.view(), expected.mutable_view(), false, 0, kNow).ok());
  EXPECT_TRUE(TensorNear(y, expected, 1e-2));
}

TEST_F(ExpertStoreTest, TrainingForwardThenBackwardAccumulates) {
  const FloatTensor x = RandomTensor({6, 16}, 3), dy = RandomTensor({6, 16}, 4);
  FloatTensor y({6, 16}), dx({6, 16});
  ASSERT_TRUE(store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), true, 77, kNow).ok());
  EXPECT_GT(store_->training_state().bytes(), 0);
  ASSERT_TRUE(store_->Backward(ExpertKey(0, 1), 77, dy.view(), dx.mutable_view(), kNow).ok());
  EXPECT_EQ(store_->training_state().bytes(), 0);

  const ExpertWeights weights = InitExpert(Model(), ExpertKey(0, 1));
  ExpertWeights expected = ExpertWeights::Zeros(Model());
  std::vector<float> hidden(6 * 24), out(6 * 16);
  ReferenceExpertForward(weights, x.values(), 6, absl::MakeSpan(hidden), absl::MakeSpan(out));
  FloatTensor dx_ref({6, 16});
  ReferenceExpertBackward(weights, x.values(), hidden, dy.values(), 6, dx_ref.mutable_values(),
                          expected);
  EXPECT_TRUE(TensorNear(dx, dx_ref, 1e-5));
  const ExpertWeights grads = *store_->Gradients(ExpertKey(0, 1));
  for (ExpertTensor which : kAllExpertTensors) {
    EXPECT_TRUE(TensorNear(grads.tensor(which), expected.tensor(which), 1e-5));
  }
  // The state was consumed.
  EXPECT_EQ(store_->Backward(ExpertKey(0, 1), 77, dy.view(), dx.mutable_view(), kNow).code(),
            absl::StatusCode::kNotFound);
}

// A batch larger than a block runs block by block (the same rows, the same
// values, activations kept for Backward across blocks); between blocks the
// caller may stop it.
TEST_F(ExpertStoreTest, LargeBatchesRunInBlocksThatCanBeStopped) {
  constexpr int64_t kRows = 2 * ExpertStore::kRowsPerBlock + 452;
  const FloatTensor x = RandomTensor({kRows, 16}, 11), dy = RandomTensor({kRows, 16}, 12);
  FloatTensor y({kRows, 16}), dx({kRows, 16});
  int checks = 0;
  auto count = [&checks]() -> absl::Status {
    ++checks;
    return absl::OkStatus();
  };
  ASSERT_TRUE(store_
                  ->Forward(ExpertKey(0, 3), x.view(), y.mutable_view(), true, 8, kNow,
                            ExpertStore::kAnyStep, count)
                  .ok());
  EXPECT_EQ(checks, 2);  // before the second and the third block
  ASSERT_TRUE(store_->Backward(ExpertKey(0, 3), 8, dy.view(), dx.mutable_view(), kNow).ok());
  const ExpertWeights weights = InitExpert(Model(), ExpertKey(0, 3));
  std::vector<float> hidden(kRows * 24);
  FloatTensor expected({kRows, 16}), dx_ref({kRows, 16});
  ReferenceExpertForward(weights, x.values(), kRows, absl::MakeSpan(hidden),
                         expected.mutable_values());
  EXPECT_TRUE(TensorNear(y, expected, 1e-5));
  ExpertWeights grads = ExpertWeights::Zeros(Model());
  ReferenceExpertBackward(weights, x.values(), hidden, dy.values(), kRows, dx_ref.mutable_values(),
                          grads);
  EXPECT_TRUE(TensorNear(dx, dx_ref, 1e-5));

  // Stopped after the first block: the caller's error, nothing kept.
  checks = 0;
  const absl::Status stopped =
      store_->Forward(ExpertKey(0, 3), x.view(), y.mutable_view(), true, 9, kNow,
                      ExpertStore::kAnyStep, [&checks]() -> absl::Status {
                        ++checks;
                        return absl::DeadlineExceededError("deadline passed");
                      });
  EXPECT_EQ(stopped.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(checks, 1);
  EXPECT_EQ(store_->training_state().bytes(), 0);
}

TEST_F(ExpertStoreTest, BadExpertsAndRequestsAreNamed) {
  const FloatTensor x = RandomTensor({2, 16}, 5);
  FloatTensor y({2, 16});
  absl::Status s = store_->Forward(ExpertKey(0, 9), x.view(), y.mutable_view(), false, 0, kNow);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "expert 9: out of range [0, 4)");
  s = store_->Forward(ExpertKey(0, 2), x.view(), y.mutable_view(), false, 0, kNow);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "expert 2: not hosted by server expert-1 (hosts 1,3)");
  // Expert 1 of a layer this model does not have is not expert 1.
  s = store_->Forward(ExpertKey(1, 1), x.view(), y.mutable_view(), false, 0, kNow);
  EXPECT_EQ(s.message(), "layer 1 expert 1: layer 1 is out of range [0, 1)");
  s = store_->Backward(ExpertKey(0, 1), 12345, x.view(), y.mutable_view(), kNow);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("request 12345"));

  ASSERT_TRUE(store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), true, 5, kNow).ok());
  const FloatTensor dy = RandomTensor({3, 16}, 6);
  FloatTensor dx({3, 16});
  s = store_->Backward(ExpertKey(0, 1), 5, dy.view(), dx.mutable_view(), kNow);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("sent 2 tokens to expert 1 in forward, backward has 3"));
}

TEST_F(ExpertStoreTest, ExpertsMoveInAndOut) {
  absl::StatusOr<ExpertSnapshot> snapshot = store_->Snapshot(ExpertKey(0, 3));
  ASSERT_TRUE(snapshot.ok());
  EXPECT_EQ(snapshot->weights.Digest(), InitExpert(Model(), ExpertKey(0, 3)).Digest());
  EXPECT_EQ(*store_->Digest(ExpertKey(0, 3)), snapshot->weights.Digest());
  ASSERT_TRUE(store_->RemoveExpert(ExpertKey(0, 3)).ok());
  EXPECT_THAT(store_->HostedExperts(), ElementsAre(ExpertKey(0, 1)));
  ASSERT_TRUE(store_->AddExpert(ExpertKey(0, 2), *std::move(snapshot)).ok());
  EXPECT_EQ(store_->AddExpert(ExpertKey(0, 2), {InitExpert(Model(), ExpertKey(0, 2)), std::nullopt})
                .code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(*store_->Digest(ExpertKey(0, 2)), InitExpert(Model(), ExpertKey(0, 3)).Digest());
  EXPECT_EQ(store_->RemoveExpert(ExpertKey(0, 0)).code(), absl::StatusCode::kNotFound);
}

// The step's update: computed aside in one pass (the hosted expert and its
// answers unchanged), then swapped in with its step; a call for another
// step is refused under the kernel's lock.
TEST_F(ExpertStoreTest, AnUpdateIsComputedAsideAndSwappedInWithItsStep) {
  const ExpertWeights before = store_->Snapshot(ExpertKey(0, 1))->weights;
  const ExpertWeights grads =
      InitExpert(Model(), ExpertKey(0, 2));  // any values of the right shapes
  ExpertTensorSpans spans;
  for (size_t i = 0; i < spans.size(); ++i) spans[i] = grads.tensor(kAllExpertTensors[i]).values();
  OptimizerOptions sgd;
  ExpertSnapshot updated;
  ASSERT_TRUE(store_->ComputeUpdate(ExpertKey(0, 1), sgd, {0.5f}, spans, updated).ok());
  EXPECT_EQ(*store_->Digest(ExpertKey(0, 1)), before.Digest());  // not yet
  ExpertWeights expected = before;
  ApplyOptimizer(sgd, {0.5f}, grads, expected, nullptr, nullptr);
  EXPECT_EQ(updated.weights.Digest(), expected.Digest());  // the same bits as in place

  const FloatTensor x = RandomTensor({4, 16}, 9);
  FloatTensor y({4, 16});
  EXPECT_EQ(*store_->Step(ExpertKey(0, 1)), 0u);
  ASSERT_TRUE(store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), false, 0, kNow, 0).ok());
  ASSERT_TRUE(store_->SwapInWeights(ExpertKey(0, 1), updated, 7).ok());
  EXPECT_EQ(*store_->Digest(ExpertKey(0, 1)), expected.Digest());
  EXPECT_EQ(*store_->Step(ExpertKey(0, 1)), 7u);
  EXPECT_EQ(updated.weights.Digest(), before.Digest());  // the old buffers, for reuse
  const absl::Status old =
      store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), false, 0, kNow, 0);
  EXPECT_EQ(old.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(old.message(), "expert 1 here has the weights of step 7, the call is for step 0");
  EXPECT_TRUE(store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), false, 0, kNow, 7).ok());
  EXPECT_TRUE(store_->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), false, 0, kNow).ok());

  // An update that overflows is refused; nothing is installed.
  ExpertSnapshot overflowed;
  const std::vector<float> huge(spans[0].size(), 1e30f);
  ExpertTensorSpans huge_spans = spans;
  huge_spans[0] = huge;
  const absl::Status too_big =
      store_->ComputeUpdate(ExpertKey(0, 1), sgd, {1e10f}, huge_spans, overflowed);
  EXPECT_EQ(too_big.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(too_big.message(), HasSubstr("expert 1: the update has a non-finite value"));
  EXPECT_EQ(*store_->Digest(ExpertKey(0, 1)), expected.Digest());

  // Gradients of another shape are refused, naming the sizes.
  spans[0] = spans[0].subspan(1);
  EXPECT_EQ(store_->ComputeUpdate(ExpertKey(0, 1), sgd, {0.5f}, spans, updated).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ExpertStoreTest, TakenGradientsLeaveZerosInTheBuffersGiven) {
  const FloatTensor x = RandomTensor({3, 16}, 1);
  FloatTensor y({3, 16}), dx({3, 16});
  ASSERT_TRUE(store_->Forward(ExpertKey(0, 3), x.view(), y.mutable_view(), true, 8, kNow).ok());
  ASSERT_TRUE(store_->Backward(ExpertKey(0, 3), 8, x.view(), dx.mutable_view(), kNow).ok());
  const ExpertWeights accumulated = *store_->Gradients(ExpertKey(0, 3));
  ExpertWeights reused = InitExpert(Model(), ExpertKey(0, 0));  // stale values, right shapes
  absl::StatusOr<ExpertWeights> taken = store_->TakeGradients(ExpertKey(0, 3), std::move(reused));
  ASSERT_TRUE(taken.ok());
  EXPECT_EQ(taken->Digest(), accumulated.Digest());
  EXPECT_EQ(store_->Gradients(ExpertKey(0, 3))->Digest(), ExpertWeights::Zeros(Model()).Digest());
}

}  // namespace
}  // namespace moe::expert
