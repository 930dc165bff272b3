// The Router gRPC service: the adapter between the wire API and the Router
// core. Handlers only validate the call and hand it to the compute pool;
// the core answers through callbacks. ForwardStream carries many requests
// at once, answered in completion order, each tagged with its client_id; a
// failing request is answered with `error` and the stream goes on.
// GetClusterState reports placement, server health and the sliding-window
// load. Step runs the two-phase training step on its own thread (it waits
// for every server's all-reduce). Rebalance plans from the measured load
// (or takes the placement it is given) and, unless dry_run, moves the
// cluster to it while serving (PlacementCoordinator), on the step thread.
// Thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
#define MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_

#include "common/compute_pool.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/stream_set.h"
#include "proto/router.grpc.pb.h"
#include "router_service/expert_client.h"
#include "router_service/load_stats.h"
#include "router_service/placement_coordinator.h"
#include "router_service/router.h"
#include "router_service/router_metrics.h"
#include "router_service/routing_sample.h"
#include "router_service/step_coordinator.h"

namespace moe::router {

class RouterServiceImpl final : public v1::Router::CallbackService {
 public:
  // What GetClusterState reports on; everything must outlive the service.
  struct ClusterView {
    const ServingConfig* config = nullptr;
    const ExpertClient* client = nullptr;
    const LoadStats* load_stats = nullptr;
    // Sampled routing (co-activation) for Rebalance; may be null.
    const RoutingSample* routing_sample = nullptr;
    // Streams opened to expert servers so far.
    std::function<int64_t()> stream_opens;
  };

  // All references must outlive the service. `step_pool` runs Step.
  // ForwardStreams share `bounds`; a stream's request without its own
  // timeout_ms gets `stream_request_timeout`.
  RouterServiceImpl(Router& router, ComputePool& pool, const RouterMetrics& metrics,
                    ClusterView cluster, StepCoordinator& steps, PlacementCoordinator& placements,
                    ComputePool& step_pool, StreamBounds bounds = {},
                    absl::Duration stream_request_timeout = absl::Seconds(30))
      : router_(router),
        pool_(pool),
        metrics_(metrics),
        cluster_(std::move(cluster)),
        steps_(steps),
        placements_(placements),
        step_pool_(step_pool),
        streams_(bounds),
        stream_request_timeout_(stream_request_timeout) {}

  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const v1::ForwardRequest* request,
                                    v1::ForwardResponse* response) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* context,
                                     const v1::BackwardRequest* request,
                                     v1::BackwardResponse* response) override;
  grpc::ServerBidiReactor<v1::ForwardRequest, v1::ForwardResponse>* ForwardStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* context,
                                 const v1::StepRequest* request,
                                 v1::StepResponse* response) override;
  grpc::ServerUnaryReactor* SaveCheckpoint(grpc::CallbackServerContext* context,
                                           const v1::SaveCheckpointRequest* request,
                                           v1::SaveCheckpointResponse* response) override;
  grpc::ServerUnaryReactor* GetClusterState(grpc::CallbackServerContext* context,
                                            const v1::GetClusterStateRequest* request,
                                            v1::ClusterState* response) override;
  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* context,
                                      const v1::RebalanceRequest* request,
                                      v1::RebalanceResponse* response) override;

  // New streams are refused; open ones answer what they accepted, then end
  // with UNAVAILABLE.
  void BeginDrain() { streams_.BeginDrain(); }

 private:
  // Fills `response` from a forward's outcome, with metrics.
  void FillForward(const v1::ForwardRequest& request,
                   absl::StatusOr<Router::ForwardResult>& result, absl::Time start,
                   v1::ForwardResponse* response) const;
  // Rebalance's work: the plan into `response`, then (unless dry_run) the
  // change.
  absl::Status RunRebalance(const v1::RebalanceRequest& request, absl::Time deadline,
                            v1::RebalanceResponse* response);

  Router& router_;
  ComputePool& pool_;
  const RouterMetrics& metrics_;
  const ClusterView cluster_;
  StepCoordinator& steps_;
  PlacementCoordinator& placements_;
  ComputePool& step_pool_;
  StreamSet streams_;
  const absl::Duration stream_request_timeout_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
