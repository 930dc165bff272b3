#include "clients/cpp/moe_client.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"

namespace moe::client {
namespace {

std::chrono::system_clock::time_point After(absl::Duration timeout) {
  return absl::ToChronoTime(absl::Now() + timeout);
}

absl::StatusOr<FloatTensor> DecodeBatch(const v1::Tensor& t, absl::string_view name) {
  TensorSpec spec;
  spec.name = name;
  spec.dims = {-1, -1};
  spec.dim_names = {"tokens", "d_model"};
  MOE_ASSIGN_OR_RETURN(const ConstTensorView view, DecodeTensor(t, spec));
  return ToFloatTensor(view);
}

}  // namespace

std::unique_ptr<MoeClient> MoeClient::Connect(const std::string& address,
                                              const TransportCredentials& credentials,
                                              int max_message_bytes) {
  // HTTP/2 keeps a connection to one router: round robin spreads calls
  // over every router the address resolves to (docs/deploy.md).
  return std::unique_ptr<MoeClient>(
      new MoeClient(NewChannel(address, credentials, max_message_bytes, /*round_robin=*/true)));
}

MoeClient::MoeClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      stub_(v1::Router::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

absl::Status MoeClient::WaitUntilHealthy(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    grpc::ClientContext context;
    // Waits for the connection instead of failing fast while it comes up.
    context.set_wait_for_ready(true);
    context.set_deadline(absl::ToChronoTime(deadline));
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = health_->Check(&context, {}, &response);
    if (status.ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return absl::OkStatus();
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "router not healthy after ", absl::FormatDuration(timeout), ": ",
          status.ok() ? "NOT_SERVING" : status.error_message()));
    }
  }
}

namespace {

v1::ForwardRequest ForwardRequestOf(const FloatTensor& x, const ForwardOptions& options) {
  v1::ForwardRequest request;
  EncodeFloats(x.values(), x.shape(), options.wire_dtype, request.mutable_x());
  request.set_layer(options.layer);
  request.set_training(options.training);
  request.set_return_routing(options.return_routing);
  return request;
}

absl::StatusOr<ForwardOutput> ForwardOutputOf(const v1::ForwardResponse& response) {
  ForwardOutput out;
  MOE_ASSIGN_OR_RETURN(out.y, DecodeBatch(response.y(), "y"));
  out.request_id = response.request_id();
  out.dropped_pairs = response.dropped_pairs();
  out.aux_loss = response.aux_loss();
  out.z_loss = response.z_loss();
  out.top_k = response.routing().top_k();
  out.expert_ids.assign(response.routing().expert_ids().begin(),
                        response.routing().expert_ids().end());
  out.weights.assign(response.routing().weights().begin(), response.routing().weights().end());
  out.dropped.assign(response.routing().dropped().begin(), response.routing().dropped().end());
  return out;
}

}  // namespace

absl::StatusOr<ForwardOutput> MoeClient::Forward(const FloatTensor& x,
                                                 const ForwardOptions& options) {
  const v1::ForwardRequest request = ForwardRequestOf(x, options);
  grpc::ClientContext context;
  context.set_deadline(After(options.timeout));
  v1::ForwardResponse response;
  MOE_RETURN_IF_ERROR(FromGrpcStatus(stub_->Forward(&context, request, &response)));
  return ForwardOutputOf(response);
}

std::unique_ptr<ForwardStreamClient> MoeClient::OpenForwardStream() {
  return std::unique_ptr<ForwardStreamClient>(new ForwardStreamClient(*stub_));
}

ForwardStreamClient::ForwardStreamClient(v1::Router::Stub& stub)
    : stream_(stub.ForwardStream(&context_)) {}

ForwardStreamClient::~ForwardStreamClient() {
  stream_->WritesDone();
  (void)stream_->Finish();
}

absl::StatusOr<ForwardOutput> ForwardStreamClient::Forward(const FloatTensor& x,
                                                           const ForwardOptions& options) {
  v1::ForwardRequest request = ForwardRequestOf(x, options);
  const uint64_t id = next_client_id_++;
  request.set_client_id(id);
  v1::ForwardResponse response;
  if (!stream_->Write(request) || !stream_->Read(&response)) {
    return absl::UnavailableError("ForwardStream ended");
  }
  if (response.client_id() != id) {
    return absl::InternalError(absl::StrCat("ForwardStream answered request ",
                                            response.client_id(), ", expected ", id));
  }
  if (response.has_error()) return FromProtoStatus(response.error());
  return ForwardOutputOf(response);
}

absl::StatusOr<FloatTensor> MoeClient::Backward(uint64_t request_id,
                                                const FloatTensor& grad_output,
                                                absl::Duration timeout) {
  v1::BackwardRequest request;
  request.set_request_id(request_id);
  EncodeFloats(grad_output.values(), grad_output.shape(), DType::kFloat32,
               request.mutable_grad_output());
  grpc::ClientContext context;
  context.set_deadline(After(timeout));
  v1::BackwardResponse response;
  MOE_RETURN_IF_ERROR(FromGrpcStatus(stub_->Backward(&context, request, &response)));
  return DecodeBatch(response.grad_input(), "grad_input");
}

absl::StatusOr<StepOutput> MoeClient::Step(float learning_rate, absl::Duration timeout) {
  v1::StepRequest request;
  request.set_learning_rate(learning_rate);
  grpc::ClientContext context;
  context.set_deadline(After(timeout));
  v1::StepResponse response;
  MOE_RETURN_IF_ERROR(FromGrpcStatus(stub_->Step(&context, request, &response)));
  return StepOutput{response.step(),
                    absl::Seconds(response.step_seconds()),
                    absl::Seconds(response.allreduce_seconds()),
                    absl::Seconds(response.optimizer_seconds()),
                    absl::Seconds(response.commit_seconds()),
                    {response.servers_behind().begin(), response.servers_behind().end()},
                    {response.servers_left_out().begin(), response.servers_left_out().end()}};
}

absl::Status MoeClient::HealthCheck() {
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckResponse response;
  return FromGrpcStatus(health_->Check(&context, {}, &response));
}

absl::StatusOr<SavedCheckpoint> MoeClient::SaveCheckpoint(DType dtype, absl::Duration timeout) {
  v1::SaveCheckpointRequest request;
  request.set_dtype(ToProtoDType(dtype));
  grpc::ClientContext context;
  context.set_deadline(After(timeout));
  v1::SaveCheckpointResponse response;
  MOE_RETURN_IF_ERROR(FromGrpcStatus(stub_->SaveCheckpoint(&context, request, &response)));
  return SavedCheckpoint{response.step(),
                         response.directory(),
                         {response.files().begin(), response.files().end()},
                         response.bytes(),
                         absl::Seconds(response.seconds()),
                         response.lineage()};
}

absl::StatusOr<v1::RebalanceResponse> MoeClient::PlanRebalance(absl::Duration timeout) {
  return CallRebalance(/*dry_run=*/true, {}, timeout);
}

absl::StatusOr<v1::RebalanceResponse> MoeClient::Rebalance(const std::vector<std::string>& drain,
                                                           absl::Duration timeout) {
  return CallRebalance(/*dry_run=*/false, drain, timeout);
}

absl::StatusOr<v1::RebalanceResponse> MoeClient::CallRebalance(
    bool dry_run, const std::vector<std::string>& drain, absl::Duration timeout) {
  v1::RebalanceRequest request;
  request.set_dry_run(dry_run);
  for (const std::string& name : drain) request.add_drain(name);
  grpc::ClientContext context;
  context.set_deadline(After(timeout));
  v1::RebalanceResponse response;
  MOE_RETURN_IF_ERROR(FromGrpcStatus(stub_->Rebalance(&context, request, &response)));
  return response;
}

}  // namespace moe::client
