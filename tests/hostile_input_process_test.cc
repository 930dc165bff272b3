// Hostile input against real processes: each call an attacker (or a bug)
// could send straight to an expert server or the router gets a clear
// status, and the cluster keeps serving: after each, a Forward through the
// router equals the reference, and training still steps.
#include <cstdint>
#include <limits>
#include <string>

#include <grpcpp/generic/generic_stub.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/collective.grpc.pb.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kDModel = 32;

class HostileInputTest : public ::testing::Test {
 protected:
  HostileInputTest()
      : cluster_([] {
          ProcessClusterOptions options;
          options.model = "d_model: 32 d_ff: 64 num_experts: 4 top_k: 2 seed: 3";
          options.strategy = "DATA_PARALLEL";
          return options;
        }()),
        reference_(cluster_.Reference()) {}

  // The cluster still serves: a Forward equal to the reference.
  void ExpectServing(const std::string& after) {
    const FloatTensor x = RandomTensor({6, kDModel}, ++seed_);
    v1::ForwardResponse response;
    const grpc::Status status = cluster_.Forward(x, &response);
    ASSERT_TRUE(status.ok()) << "after " << after << ": " << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(response.y(), kDModel), reference_.Forward(x)->y, 1e-5))
        << "after " << after;
  }

  // Sends `bytes` as the one request message of `method` on server `s` (or
  // the router, s = -1), as a raw unary call; its status.
  grpc::Status RawCall(int s, const std::string& method, const std::string& bytes) {
    auto channel = s < 0 ? cluster_.router_channel() : cluster_.server_channel(s);
    grpc::GenericStub stub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1), response;
    grpc::Status status;
    absl::Notification done;
    stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                   [&](grpc::Status result) {
                     status = std::move(result);
                     done.Notify();
                   });
    done.WaitForNotification();
    return status;
  }

  ProcessCluster cluster_;
  const ReferenceMoe reference_;
  int seed_ = 0;
};

TEST_F(HostileInputTest, EveryHostileCallIsRefusedByNameAndTheClusterServes) {
  ExpectServing("start");
  v1::ExpertServer::Stub& server = cluster_.server_stub(0);
  auto deadline = [](grpc::ClientContext& context) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  };

  {  // A step number far in the future, to abort or to prepare.
    grpc::ClientContext context;
    deadline(context);
    v1::AbortStepRequest abort;
    abort.set_step(std::numeric_limits<uint64_t>::max());
    v1::AbortStepResponse aborted;
    server.AbortStep(&context, abort, &aborted);  // refuses only that step
    grpc::ClientContext prepare_context;
    deadline(prepare_context);
    v1::PrepareStepRequest prepare;
    prepare.set_step(uint64_t{1} << 40);
    prepare.set_learning_rate(0.1f);
    v1::PrepareStepResponse prepared;
    const grpc::Status status = server.PrepareStep(&prepare_context, prepare, &prepared);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("65536"));
  }
  ExpectServing("AbortStep(2^64-1) and PrepareStep(2^40)");

  {  // A weight chunk whose offset would wrap the range check.
    grpc::ClientContext context;
    deadline(context);
    v1::LoadExpertWeightsResponse response;
    auto writer = server.LoadExpertWeights(&context, &response);
    v1::ExpertWeightsChunk chunk;
    chunk.set_expert_id(0);
    chunk.set_kind(v1::EXPERT_TENSOR_KIND_W1_WEIGHT);
    chunk.add_shape(kDModel);
    chunk.add_shape(64);
    chunk.set_offset_bytes(std::numeric_limits<int64_t>::max() - 8);
    chunk.set_data(std::string(2048, '\1'));
    writer->Write(chunk);
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  }
  ExpectServing("LoadExpertWeights at offset 2^63-9");

  {  // One-byte chunks asked for: served in chunks of at least 1 KiB.
    grpc::ClientContext context;
    deadline(context);
    v1::GetExpertWeightsRequest request;
    request.set_expert_id(0);
    request.set_max_chunk_bytes(1);
    auto reader = server.GetExpertWeights(&context, request);
    v1::ExpertWeightsChunk chunk;
    int chunks = 0;
    while (reader->Read(&chunk)) ++chunks;
    EXPECT_TRUE(reader->Finish().ok());
    // About 17 KiB of weights: one message per byte would be some 17000.
    EXPECT_LT(chunks, 64);
  }
  ExpectServing("GetExpertWeights(max_chunk_bytes = 1)");

  {  // A tensor that declares 1 GiB and carries 8 bytes.
    v1::DispatchRequest request;
    request.set_sequence_id(1);
    request.set_expert_id(0);
    request.mutable_tokens()->add_shape(int64_t{1} << 23);
    request.mutable_tokens()->add_shape(kDModel);
    request.mutable_tokens()->set_dtype(v1::DTYPE_FP32);
    request.mutable_tokens()->set_data(std::string(8, '\0'));
    grpc::ClientContext context;
    deadline(context);
    auto stream = server.Dispatch(&context);
    ASSERT_TRUE(stream->Write(request));
    v1::DispatchResponse response;
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());

    v1::ForwardRequest forward;
    *forward.mutable_x() = request.tokens();
    grpc::ClientContext router_context;
    deadline(router_context);
    v1::ForwardResponse answer;
    const grpc::Status status = cluster_.stub().Forward(&router_context, forward, &answer);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  ExpectServing("a tensor declaring 1 GiB");

  // Garbage and truncated messages on every kind of method.
  v1::ForwardRequest valid;
  const FloatTensor x = RandomTensor({4, kDModel}, 77);
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, valid.mutable_x());
  const std::string truncated = valid.SerializeAsString().substr(0, 100);
  const std::string garbage = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01 not a message";
  for (const auto& [s, method] : std::vector<std::pair<int, std::string>>{
           {-1, "/moe.v1.Router/Forward"},
           {-1, "/moe.v1.Router/Step"},
           {0, "/moe.v1.ExpertServer/PrepareStep"},
           {0, "/moe.v1.ExpertServer/ReleaseExpert"},
           {0, "/moe.v1.ExpertServer/Info"}}) {
    for (const std::string& bytes : {truncated, garbage}) {
      const grpc::Status status = RawCall(s, method, bytes);
      EXPECT_FALSE(status.ok()) << method;
      EXPECT_NE(status.error_code(), grpc::StatusCode::UNAVAILABLE)
          << method << ": the process went away";
    }
    ExpectServing(absl::StrCat("garbage and truncated messages to ", method));
  }

  // A stray ring stream of garbage: the collective it names (if any) is not
  // disturbed, and the next training step works.
  const grpc::Status ring = RawCall(1, "/moe.v1.Collective/Ring", garbage);
  EXPECT_EQ(ring.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << ring.error_message();
  EXPECT_THAT(ring.error_message(), HasSubstr("ring segment from"));
  v1::ForwardResponse forward;
  ASSERT_TRUE(cluster_.Forward(x, &forward, /*training=*/true).ok());
  v1::BackwardResponse backward;
  // A NaN in dL/dy is refused before the forward's state is taken, so the
  // same Backward with good values then goes through.
  FloatTensor nan_dy = RandomTensor({4, kDModel}, 78);
  nan_dy.mutable_values()[3] = std::numeric_limits<float>::quiet_NaN();
  const grpc::Status nan = cluster_.Backward(forward.request_id(), nan_dy, &backward);
  EXPECT_EQ(nan.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << nan.error_message();
  EXPECT_THAT(nan.error_message(), HasSubstr("NaN"));
  ASSERT_TRUE(cluster_.Backward(forward.request_id(), RandomTensor({4, kDModel}, 78), &backward)
                  .ok());
  // Learning rates that would write NaN or run backwards, through the
  // router and straight to a server: refused by name, no weight moves, and
  // the gradients wait for a good Step.
  v1::InfoResponse info_before, info_after;
  ASSERT_TRUE(cluster_.Info(0, &info_before).ok());
  for (float bad :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), -1.0f}) {
    v1::StepResponse refused;
    const grpc::Status status = cluster_.Step(bad, absl::Seconds(30), &refused);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(status.error_message(), HasSubstr("must be finite and >= 0")) << bad;
    grpc::ClientContext context;
    deadline(context);
    v1::PrepareStepRequest prepare;
    prepare.set_step(info_before.step() + 1);
    prepare.set_learning_rate(bad);
    v1::PrepareStepResponse prepared;
    const grpc::Status direct = server.PrepareStep(&context, prepare, &prepared);
    EXPECT_EQ(direct.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
  }
  ASSERT_TRUE(cluster_.Info(0, &info_after).ok());
  EXPECT_EQ(info_after.step(), info_before.step());
  ASSERT_EQ(info_after.experts_size(), info_before.experts_size());
  for (int i = 0; i < info_after.experts_size(); ++i) {
    EXPECT_EQ(info_after.experts(i).weights_digest(), info_before.experts(i).weights_digest());
  }
  ExpectServing("learning rates inf, NaN and -1");

  v1::StepResponse step;
  const grpc::Status stepped = cluster_.Step(0.1f, absl::Seconds(30), &step);
  EXPECT_TRUE(stepped.ok()) << stepped.error_message();
}

}  // namespace
}  // namespace moe::testing
