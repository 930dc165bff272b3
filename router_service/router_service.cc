#include "router_service/router_service.h"

#include <memory>

#include "common/grpc_status.h"

namespace moe::router {
namespace {

absl::Time DeadlineOf(const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  // gRPC's "no deadline" is the far future.
  if (deadline >= std::chrono::system_clock::now() + std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

int64_t Rows(const v1::Tensor& t) { return t.shape_size() > 0 ? t.shape(0) : 0; }

}  // namespace

grpc::ServerUnaryReactor* RouterServiceImpl::Forward(grpc::CallbackServerContext* context,
                                                     const v1::ForwardRequest* request,
                                                     v1::ForwardResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  const absl::Time deadline = DeadlineOf(*context);
  auto finish = [this, reactor, request, response, start](
                    absl::StatusOr<Router::ForwardResult> result) {
    response->set_client_id(request->client_id());
    if (result.ok()) {
      *response->mutable_y() = std::move(result->y);
      response->set_request_id(result->request_id);
      const Routing& routing = result->routing;
      response->set_dropped_pairs(routing.dropped_pairs);
      if (request->return_routing()) {
        v1::Routing* out = response->mutable_routing();
        out->set_top_k(routing.top_k);
        out->mutable_expert_ids()->Assign(routing.expert_ids.begin(), routing.expert_ids.end());
        out->mutable_weights()->Assign(routing.weights.begin(), routing.weights.end());
        for (uint8_t d : routing.dropped) out->add_dropped(d != 0);
      }
      for (size_t e = 0; e < routing.expert_tokens.size(); ++e) {
        metrics_.expert_tokens[e]->Increment(static_cast<double>(routing.expert_tokens[e]));
      }
      metrics_.dropped_pairs->Increment(static_cast<double>(routing.dropped_pairs));
      metrics_.batch_tokens->Observe(static_cast<double>(routing.num_tokens));
    }
    const absl::Status status = result.status();
    metrics_.CountRequest(RouterMethod::kForward, status, Rows(request->x()),
                          absl::ToDoubleSeconds(absl::Now() - start));
    reactor->Finish(ToGrpcStatus(status));
  };
  auto shared = std::make_shared<decltype(finish)>(std::move(finish));
  if (!pool_.Submit([this, request, deadline, shared] {
        router_.Forward(request->x(), request->training(), deadline,
                        [shared](absl::StatusOr<Router::ForwardResult> r) {
                          (*shared)(std::move(r));
                        });
      })) {
    (*shared)(absl::ResourceExhaustedError("router is overloaded: compute queue full"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* RouterServiceImpl::Backward(grpc::CallbackServerContext* context,
                                                      const v1::BackwardRequest* request,
                                                      v1::BackwardResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  const absl::Time deadline = DeadlineOf(*context);
  auto finish = [this, reactor, request, response, start](absl::StatusOr<v1::Tensor> dx) {
    if (dx.ok()) *response->mutable_grad_input() = *std::move(dx);
    metrics_.CountRequest(RouterMethod::kBackward, dx.status(), Rows(request->grad_output()),
                          absl::ToDoubleSeconds(absl::Now() - start));
    reactor->Finish(ToGrpcStatus(dx.status()));
  };
  auto shared = std::make_shared<decltype(finish)>(std::move(finish));
  if (!pool_.Submit([this, request, deadline, shared] {
        router_.Backward(request->request_id(), request->grad_output(), deadline,
                         [shared](absl::StatusOr<v1::Tensor> r) { (*shared)(std::move(r)); });
      })) {
    (*shared)(absl::ResourceExhaustedError("router is overloaded: compute queue full"));
  }
  return reactor;
}

}  // namespace moe::router
