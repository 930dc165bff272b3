// The dispatcher without a transport: every message names its expert by
// (layer, expert_id), and a layer the model does not have is refused by
// name, never served by the same index of layer 0.
#include "expert_service/expert_dispatcher.h"

#include <map>
#include <memory>
#include <optional>

#include "absl/synchronization/notification.h"
#include "common/compute_pool.h"
#include "common/deterministic_init.h"
#include "common/tensor_codec.h"
#include "expert_service/micro_batcher.h"
#include "expert_service/reference_expert_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace moe::expert {
namespace {

using ::testing::HasSubstr;

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 8;
  model.d_ff = 16;
  model.num_experts = 4;
  model.top_k = 2;
  model.seed = 11;
  return model;
}

class ExpertDispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::map<ExpertKey, ExpertWeights> experts;
    for (int e : {1, 2}) experts.emplace(ExpertKey(0, e), InitExpert(Model(), ExpertKey(0, e)));
    auto store = ExpertStore::Create(
        {Model(), "expert-0", {}}, std::move(experts),
        [](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
          return std::make_unique<ReferenceExpertKernel>(w);
        });
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    metrics_ = ExpertMetrics::Create(registry_, Model());
    dispatcher_ = std::make_unique<ExpertDispatcher>(ExpertDispatcher::Options{"expert-0"}, *store_,
                                                     *metrics_, nullptr, nullptr);
  }

  // A Dispatch request of `rows` tokens of 0.5 (in `dtype`, said to be
  // rounded from fp32 with `rounded`).
  static std::unique_ptr<v1::DispatchRequest> Request(int layer, int expert, int64_t rows = 3,
                                                      DType dtype = DType::kFloat32,
                                                      bool rounded = false) {
    auto request = std::make_unique<v1::DispatchRequest>();
    request->set_sequence_id(7);
    request->set_layer(layer);
    request->set_expert_id(expert);
    request->set_tokens_rounded_to_bf16(rounded);
    const std::vector<float> x(rows * Model().d_model, 0.5f);
    EncodeFloats(x, {rows, Model().d_model}, dtype, request->mutable_tokens());
    return request;
  }

  // Runs one Dispatch of 3 tokens (as Request); returns the answer.
  v1::DispatchResponse Dispatch(int layer, int expert, DType dtype = DType::kFloat32,
                                bool rounded = false) {
    auto request = Request(layer, expert, 3, dtype, rounded);
    v1::DispatchResponse answer;
    dispatcher_->Dispatch(
        std::move(request), std::make_unique<v1::DispatchResponse>(),
        [&](std::unique_ptr<v1::DispatchResponse> response) { answer = std::move(*response); });
    return answer;
  }

  prometheus::Registry registry_;
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<ExpertMetrics> metrics_;
  std::unique_ptr<ExpertDispatcher> dispatcher_;
};

TEST_F(ExpertDispatcherTest, DispatchNamesTheLayer) {
  const v1::DispatchResponse served = Dispatch(0, 1);
  ASSERT_TRUE(served.has_output()) << served.error().message();
  EXPECT_EQ(served.sequence_id(), 7u);
  const v1::DispatchResponse other_layer = Dispatch(1, 1);
  ASSERT_TRUE(other_layer.has_error());
  EXPECT_EQ(other_layer.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(other_layer.error().message(),
              HasSubstr("layer 1 expert 1: layer 1 is out of range"));
  const v1::DispatchResponse not_hosted = Dispatch(0, 3);
  EXPECT_EQ(not_hosted.error().code(), static_cast<int>(absl::StatusCode::kNotFound));
}

// A call of a few microseconds' work runs where it was received: a thread
// hand-off would cost more. Training calls and larger ones do not.
TEST_F(ExpertDispatcherTest, TinyInferenceCallsRunWhereReceived) {
  // 280 parameters per expert: up to 468 rows are tiny.
  EXPECT_TRUE(dispatcher_->RunsWhereReceived(*Request(0, 1, 3)));
  EXPECT_TRUE(dispatcher_->RunsWhereReceived(*Request(0, 1, 468)));
  EXPECT_FALSE(dispatcher_->RunsWhereReceived(*Request(0, 1, 469)));
  auto training = Request(0, 1, 3);
  training->set_training(true);
  EXPECT_FALSE(dispatcher_->RunsWhereReceived(*training));
  auto unshaped = Request(0, 1, 3);
  unshaped->mutable_tokens()->clear_shape();
  EXPECT_FALSE(dispatcher_->RunsWhereReceived(*unshaped));
  auto negative = Request(0, 1, 3);
  negative->mutable_tokens()->set_shape(0, -1);
  EXPECT_FALSE(dispatcher_->RunsWhereReceived(*negative));

  // With a batcher whose only pool thread is busy, a tiny call is still
  // answered before Dispatch returns; a larger one waits for the pool.
  ComputePool pool(1, 16);
  absl::Notification release;
  ASSERT_TRUE(pool.Submit([&] { release.WaitForNotification(); }));
  std::optional<v1::DispatchResponse> tiny, large;
  {
    MicroBatcher batcher({}, *store_, pool, [] { return absl::Now(); });
    ExpertDispatcher batched(ExpertDispatcher::Options{"expert-0"}, *store_, *metrics_, &batcher,
                             nullptr);
    batched.Dispatch(Request(0, 1, 3), std::make_unique<v1::DispatchResponse>(),
                     [&](std::unique_ptr<v1::DispatchResponse> r) { tiny = std::move(*r); });
    ASSERT_TRUE(tiny.has_value());
    EXPECT_TRUE(tiny->has_output()) << tiny->error().message();
    batched.Dispatch(Request(0, 1, 600), std::make_unique<v1::DispatchResponse>(),
                     [&](std::unique_ptr<v1::DispatchResponse> r) { large = std::move(*r); });
    EXPECT_FALSE(large.has_value());
    release.Notify();
    // The batcher runs what it holds before it goes.
  }
  ASSERT_TRUE(large.has_value());
  EXPECT_TRUE(large->has_output()) << large->error().message();
}

TEST_F(ExpertDispatcherTest, InfoAndWeightTransferCarryTheLayer) {
  v1::InfoResponse info;
  dispatcher_->Info(&info);
  ASSERT_EQ(info.experts_size(), 2);
  EXPECT_EQ(info.experts(1).layer(), 0);
  EXPECT_EQ(info.experts(1).expert_id(), 2);

  v1::GetExpertWeightsRequest get;
  get.set_expert_id(2);
  absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> chunks = dispatcher_->ExpertChunks(get);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  EXPECT_EQ(chunks->back().expert_id(), 2);
  get.set_layer(2);
  EXPECT_THAT(dispatcher_->ExpertChunks(get).status().message(),
              HasSubstr("layer 2 expert 2: layer 2 is out of range"));

  // Release expert 2, then install it back from its own chunks.
  v1::ReleaseExpertRequest release;
  release.set_expert_id(2);
  release.set_layer(1);
  EXPECT_EQ(dispatcher_->ReleaseExpert(release).code(), absl::StatusCode::kInvalidArgument);
  release.set_layer(0);
  ASSERT_TRUE(dispatcher_->ReleaseExpert(release).ok());
  EXPECT_EQ(Dispatch(0, 2).error().code(), static_cast<int>(absl::StatusCode::kNotFound));
  ExpertAssembler assembler(Model());
  for (const auto& chunk : *chunks) ASSERT_TRUE(assembler.Add(chunk).ok());
  v1::LoadExpertWeightsResponse loaded;
  ASSERT_TRUE(dispatcher_->InstallExpert(assembler, &loaded).ok());
  EXPECT_EQ(loaded.expert().layer(), 0);
  EXPECT_EQ(loaded.expert().expert_id(), 2);
  EXPECT_EQ(loaded.expert().weights_digest(), InitExpert(Model(), ExpertKey(0, 2)).Digest());
  EXPECT_TRUE(Dispatch(0, 2).has_output());
}

}  // namespace
}  // namespace moe::expert

namespace moe::expert {
namespace {

// Rows rounded to bf16 are for bf16 kernels: this server's compute in fp32,
// so it refuses them (saying so, for the sender to send fp32 rows) rather
// than answer from the rounded values.
TEST_F(ExpertDispatcherTest, RoundedRowsAreRefusedByFp32Kernels) {
  const v1::DispatchResponse exact = Dispatch(0, 1);
  ASSERT_TRUE(exact.has_output()) << exact.error().message();
  EXPECT_EQ(exact.compute_dtype(), v1::DTYPE_FP32);
  const v1::DispatchResponse rounded = Dispatch(0, 1, DType::kBFloat16, /*rounded=*/true);
  ASSERT_TRUE(rounded.has_error());
  EXPECT_EQ(rounded.error().code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(rounded.error().message(), HasSubstr("compute in fp32: send fp32 rows"));
  EXPECT_EQ(rounded.compute_dtype(), v1::DTYPE_FP32);
  const v1::DispatchResponse mislabeled = Dispatch(0, 1, DType::kFloat32, /*rounded=*/true);
  EXPECT_EQ(mislabeled.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  // bf16 rows not said to be rounded are a bf16 client's own: served.
  EXPECT_TRUE(Dispatch(0, 1, DType::kBFloat16).has_output());
}

}  // namespace
}  // namespace moe::expert
