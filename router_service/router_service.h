// The Router gRPC service: the adapter between the wire API and the Router
// core. Handlers only validate the call and hand it to the compute pool;
// the core answers through callbacks. ForwardStream, Step, GetClusterState
// and Rebalance are not overridden yet and answer UNIMPLEMENTED.
// Thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
#define MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_

#include "common/compute_pool.h"
#include "proto/router.grpc.pb.h"
#include "router_service/router.h"
#include "router_service/router_metrics.h"

namespace moe::router {

class RouterServiceImpl final : public v1::Router::CallbackService {
 public:
  // All references must outlive the service.
  RouterServiceImpl(Router& router, ComputePool& pool, const RouterMetrics& metrics)
      : router_(router), pool_(pool), metrics_(metrics) {}

  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const v1::ForwardRequest* request,
                                    v1::ForwardResponse* response) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* context,
                                     const v1::BackwardRequest* request,
                                     v1::BackwardResponse* response) override;

 private:
  Router& router_;
  ComputePool& pool_;
  const RouterMetrics& metrics_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
