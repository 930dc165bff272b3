#include "router_service/router_service.h"

#include <algorithm>
#include <memory>
#include <optional>

#include "common/expert_key.h"
#include "common/grpc_status.h"
#include "common/placement_proto.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/stream_reactor.h"
#include "common/tensor_codec.h"
#include "router_service/rebalance.h"

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

void RouterServiceImpl::FillForward(const v1::ForwardRequest& request,
                                    absl::StatusOr<Router::ForwardResult>& result,
                                    absl::Time start, v1::ForwardResponse* response) const {
  response->set_client_id(request.client_id());
  if (result.ok()) {
    *response->mutable_y() = std::move(result->y);
    response->set_request_id(result->request_id);
    if (result->request_id != 0) response->set_router(router_.identity());
    const Routing& routing = result->routing;
    response->set_dropped_pairs(routing.dropped_pairs);
    response->set_aux_loss(routing.aux_loss);
    response->set_z_loss(routing.z_loss);
    if (request.return_routing()) {
      v1::Routing* out = response->mutable_routing();
      out->set_top_k(routing.per_token());
      out->mutable_expert_ids()->Assign(routing.expert_ids.begin(), routing.expert_ids.end());
      out->mutable_weights()->Assign(routing.weights.begin(), routing.weights.end());
      for (uint8_t d : routing.dropped) out->add_dropped(d != 0);
    }
    metrics_.CountExpertTokens(request.layer(), routing.expert_tokens);
    metrics_.dropped_pairs->Increment(static_cast<double>(routing.dropped_pairs));
    metrics_.batch_tokens->Observe(static_cast<double>(routing.num_tokens));
  }
  metrics_.CountRequest(RouterMethod::kForward, result.status(), Rows(request.x()),
                        absl::ToDoubleSeconds(absl::Now() - start));
  if (cluster_.load_stats != nullptr) {
    const LoadStats::Snapshot load = cluster_.load_stats->Get(absl::Now());
    metrics_.expert_imbalance->Set(load.expert_imbalance);
    metrics_.server_imbalance->Set(load.server_imbalance);
  }
  if (cluster_.stream_opens) metrics_.ReportStreamOpens(cluster_.stream_opens());
}

namespace {

// A unary reactor that passes the client's cancellation on to the router.
class CancellableReactor final : public grpc::ServerUnaryReactor {
 public:
  CancellableReactor() : cancellation_(std::make_shared<Cancellation>()) {}
  const std::shared_ptr<Cancellation>& cancellation() const { return cancellation_; }
  void OnCancel() override { cancellation_->Cancel(); }
  void OnDone() override { delete this; }

 private:
  const std::shared_ptr<Cancellation> cancellation_;
};

}  // namespace

grpc::ServerUnaryReactor* RouterServiceImpl::Forward(grpc::CallbackServerContext* context,
                                                     const v1::ForwardRequest* request,
                                                     v1::ForwardResponse* response) {
  auto* reactor = new CancellableReactor();
  const absl::Time start = absl::Now();
  const absl::Time deadline = DeadlineOf(*context);
  auto finish = [this, reactor, request, response,
                 start](absl::StatusOr<Router::ForwardResult> result) {
    FillForward(*request, result, start, response);
    reactor->Finish(ToGrpcStatus(result.status()));
  };
  auto shared = std::make_shared<decltype(finish)>(std::move(finish));
  auto forward = [this, request, deadline, shared, cancellation = reactor->cancellation()] {
    router_.Forward(
        request->x(), request->layer(), request->training(), deadline,
        [shared](absl::StatusOr<Router::ForwardResult> r) { (*shared)(std::move(r)); },
        cancellation);
  };
  if (router_.RunsWhereReceived(Rows(request->x()))) {
    forward();
  } else if (!pool_.Submit(std::move(forward))) {
    (*shared)(absl::ResourceExhaustedError("router is overloaded: compute queue full"));
  }
  return reactor;
}

grpc::ServerBidiReactor<v1::ForwardRequest, v1::ForwardResponse>*
RouterServiceImpl::ForwardStream(grpc::CallbackServerContext* context) {
  const absl::Time stream_deadline = DeadlineOf(*context);
  using Reply = absl::AnyInvocable<void(std::unique_ptr<v1::ForwardResponse>) &&>;
  return new StreamReactor<v1::ForwardRequest, v1::ForwardResponse>(
      streams_, pool_,
      [this, stream_deadline](std::unique_ptr<v1::ForwardRequest> request,
                              std::unique_ptr<v1::ForwardResponse> response, Reply reply,
                              std::function<bool()>) {
        const absl::Time start = absl::Now();
        const v1::ForwardRequest& r = *request;
        const absl::Duration timeout =
            r.timeout_ms() > 0 ? absl::Milliseconds(r.timeout_ms()) : stream_request_timeout_;
        router_.Forward(r.x(), r.layer(), r.training(), std::min(stream_deadline, start + timeout),
                        [this, request = std::move(request), response = std::move(response),
                         reply = std::move(reply),
                         start](absl::StatusOr<Router::ForwardResult> result) mutable {
                          FillForward(*request, result, start, response.get());
                          if (!result.ok())
                            ToProtoStatus(result.status(), response->mutable_error());
                          std::move(reply)(std::move(response));
                        });
      },
      [](const v1::ForwardRequest&) {}, [](const v1::ForwardResponse&) {},
      [](const v1::ForwardRequest& request, const absl::Status& status,
         v1::ForwardResponse* response) {
        response->set_client_id(request.client_id());
        ToProtoStatus(status, response->mutable_error());
      },
      /*tag_of=*/nullptr, /*cancel_target=*/nullptr,
      [this](const v1::ForwardRequest& request) {
        return router_.RunsWhereReceived(Rows(request.x()));
      });
}

grpc::ServerUnaryReactor* RouterServiceImpl::Step(grpc::CallbackServerContext* context,
                                                  const v1::StepRequest* request,
                                                  v1::StepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  const absl::Time deadline = DeadlineOf(*context);
  const bool accepted = step_pool_.Submit([this, reactor, request, response, deadline, start] {
    absl::StatusOr<StepCoordinator::Result> result =
        steps_.Step(request->learning_rate(), deadline);
    if (result.ok()) {
      response->set_step(result->step);
      response->set_step_seconds(absl::ToDoubleSeconds(result->step_time));
      response->set_allreduce_seconds(absl::ToDoubleSeconds(result->allreduce_time));
      response->set_optimizer_seconds(absl::ToDoubleSeconds(result->optimizer_time));
      response->set_commit_seconds(absl::ToDoubleSeconds(result->commit_time));
      for (const std::string& behind : result->servers_behind) response->add_servers_behind(behind);
      for (const std::string& name : result->servers_left_out) {
        response->add_servers_left_out(name);
      }
      metrics_.step_allreduce_seconds->Observe(absl::ToDoubleSeconds(result->allreduce_time));
    }
    metrics_.CountRequest(RouterMethod::kStep, result.status(), 0,
                          absl::ToDoubleSeconds(absl::Now() - start));
    reactor->Finish(ToGrpcStatus(result.status()));
  });
  if (!accepted) {
    reactor->Finish(ToGrpcStatus(absl::ResourceExhaustedError("step queue full")));
  }
  return reactor;
}

grpc::ServerUnaryReactor* RouterServiceImpl::SaveCheckpoint(
    grpc::CallbackServerContext* context, const v1::SaveCheckpointRequest* request,
    v1::SaveCheckpointResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  const absl::Time deadline = DeadlineOf(*context);
  // Disk and server round trips: on the step thread, never a gRPC one.
  const bool accepted = step_pool_.Submit([this, reactor, request, response, deadline, start] {
    absl::StatusOr<StepCoordinator::Saved> saved = [&]() -> absl::StatusOr<StepCoordinator::Saved> {
      MOE_ASSIGN_OR_RETURN(
          const DType dtype,
          FromProtoDType(
              request->dtype() == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FP32 : request->dtype(),
              "dtype"));
      return steps_.SaveCheckpoint(dtype, deadline);
    }();
    if (saved.ok()) {
      response->set_step(saved->step);
      response->set_directory(saved->directory);
      for (const std::string& file : saved->files) response->add_files(file);
      response->set_bytes(saved->bytes);
      response->set_seconds(absl::ToDoubleSeconds(saved->time));
      response->set_lineage(steps_.lineage());
    }
    metrics_.CountRequest(RouterMethod::kSaveCheckpoint, saved.status(), 0,
                          absl::ToDoubleSeconds(absl::Now() - start));
    reactor->Finish(ToGrpcStatus(saved.status()));
  });
  if (!accepted) {
    reactor->Finish(ToGrpcStatus(absl::ResourceExhaustedError("step queue full")));
  }
  return reactor;
}

grpc::ServerUnaryReactor* RouterServiceImpl::Rebalance(grpc::CallbackServerContext* context,
                                                       const v1::RebalanceRequest* request,
                                                       v1::RebalanceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  // Weights move for seconds: bounded even for a caller without a deadline.
  const absl::Time deadline = std::min(DeadlineOf(*context), start + absl::Minutes(10));
  // On the step thread: ordered with Steps and checkpoint saves.
  const bool accepted = step_pool_.Submit([this, reactor, request, response, deadline, start] {
    const absl::Status status = RunRebalance(*request, deadline, response);
    metrics_.CountRequest(RouterMethod::kRebalance, status, 0,
                          absl::ToDoubleSeconds(absl::Now() - start));
    reactor->Finish(ToGrpcStatus(status));
  });
  if (!accepted) {
    reactor->Finish(ToGrpcStatus(absl::ResourceExhaustedError("step queue full")));
  }
  return reactor;
}

absl::Status RouterServiceImpl::RunRebalance(const v1::RebalanceRequest& request,
                                             absl::Time deadline, v1::RebalanceResponse* response) {
  const ServingConfig& config = *cluster_.config;
  std::optional<PlacementPlan> plan;
  {
    // Released before the change: its drain waits for every holder of the
    // old placement.
    const Router::PlacementSnapshot snapshot = router_.placement();
    RebalanceInputs inputs;
    inputs.model = &config.model;
    inputs.cluster = &config.cluster;
    inputs.current = &snapshot->value;
    inputs.load = cluster_.load_stats->Get(absl::Now());
    if (cluster_.routing_sample != nullptr) inputs.tokens = cluster_.routing_sample->Tokens();
    inputs.absent = placements_.AbsentServers(snapshot->value, deadline);
    for (const std::string& name : request.drain()) {
      const int server = config.cluster.FindServer(name);
      if (server < 0) return absl::InvalidArgumentError(absl::StrCat("drain: no server ", name));
      inputs.drain.push_back(server);
    }
    if (request.has_placement()) {
      if (!inputs.drain.empty()) {
        return absl::InvalidArgumentError("drain: not with an explicit placement");
      }
      MOE_ASSIGN_OR_RETURN(Placement target, PlacementFromProto(request.placement(), config.model,
                                                                config.cluster, "placement"));
      plan = PlanMoveTo(inputs, std::move(target));
    } else {
      MOE_ASSIGN_OR_RETURN(plan, PlanRebalance(inputs));
    }
    response->set_placement_epoch(snapshot->version);
    response->set_window_seconds(absl::ToDoubleSeconds(inputs.load.window));
  }
  metrics_.plan_imbalance_before->Set(plan->imbalance_before);
  metrics_.plan_imbalance_after->Set(plan->imbalance_after);
  metrics_.plan_bytes->Set(static_cast<double>(plan->bytes_moved));
  *response->mutable_placement() = PlacementToProto(plan->placement, config.cluster);
  response->set_experts_moved(plan->replicas_added);
  response->set_replicas_removed(plan->replicas_removed);
  response->set_bytes_moved(plan->bytes_moved);
  response->set_imbalance_before(plan->imbalance_before);
  response->set_imbalance_after(plan->imbalance_after);
  response->set_servers_per_token_before(plan->servers_per_token_before);
  response->set_servers_per_token_after(plan->servers_per_token_after);
  for (double load : plan->server_load_before) response->add_server_load_before(load);
  for (double load : plan->server_load_after) response->add_server_load_after(load);
  if (request.dry_run()) return absl::OkStatus();

  const absl::StatusOr<PlacementCoordinator::Result> changed =
      placements_.Change(std::move(plan->placement), deadline);
  // The placement it has already is no change.
  if (!changed.ok() || changed->epoch != changed->from_epoch) {
    metrics_.CountRebalance(changed.status(), changed.ok() ? changed->bytes : 0,
                            changed.ok() ? absl::ToDoubleSeconds(changed->time) : 0);
  }
  if (!changed.ok()) return changed.status();
  response->set_placement_epoch(changed->epoch);
  response->set_bytes_moved(changed->bytes);
  response->set_pull_seconds(absl::ToDoubleSeconds(changed->pull_time));
  response->set_drain_seconds(absl::ToDoubleSeconds(changed->drain_time));
  response->set_seconds(absl::ToDoubleSeconds(changed->time));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* RouterServiceImpl::GetClusterState(
    grpc::CallbackServerContext* context, const v1::GetClusterStateRequest* request,
    v1::ClusterState* response) {
  const ServingConfig& config = *cluster_.config;
  // One snapshot: servers and experts from the same placement.
  const Router::PlacementSnapshot snapshot = router_.placement();
  const Placement& placement = snapshot->value;
  const LoadStats::Snapshot load = cluster_.load_stats->Get(absl::Now());
  response->set_strategy(ClusterConfigToProto(config.cluster).strategy());
  response->set_placement_epoch(snapshot->version);
  response->set_step(router_.gate()->version);
  response->set_router(router_.identity());
  *response->mutable_model() = ModelConfigToProto(config.model);
  const bool layered = config.model.num_layers > 1;
  for (int s = 0; s < placement.num_servers(); ++s) {
    v1::ServerState* server = response->add_servers();
    server->set_name(config.cluster.servers[s].name);
    server->set_address(config.cluster.servers[s].address);
    server->set_healthy(cluster_.client->IsHealthy(s));
    for (ExpertKey e : placement.ExpertsOn(s)) {
      server->add_expert_ids(e.expert);
      if (layered) server->add_expert_layers(e.layer);
    }
    server->set_tokens(load.server_tokens[s]);
    for (ExpertKey e : router_.StaleExperts(s)) {
      server->add_stale_expert_ids(e.expert);
      if (layered) server->add_stale_expert_layers(e.layer);
    }
    server->set_ejected(router_.Ejected(s));
  }
  for (int l = 0; l < placement.num_layers(); ++l) {
    for (int e = 0; e < placement.num_experts(l); ++e) {
      v1::ExpertLoad* expert = response->add_experts();
      SetExpertKey(ExpertKey(l, e), expert);
      expert->set_tokens(load.expert_tokens[l * placement.num_experts(l) + e]);
      for (int s : placement.ServersOf(ExpertKey(l, e))) {
        expert->add_servers(config.cluster.servers[s].name);
      }
    }
  }
  response->set_window_seconds(absl::ToDoubleSeconds(load.window));
  response->set_expert_imbalance(load.expert_imbalance);
  response->set_server_imbalance(load.server_imbalance);
  response->set_dropped_pairs(load.dropped_pairs);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
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
