// The Router gRPC service: the adapter between the wire API and the Router
// core. Handlers only validate the call and hand it to the compute pool;
// the core answers through callbacks. ForwardStream carries many requests
// at once, answered in completion order, each tagged with its client_id; a
// failing request is answered with `error` and the stream goes on. Step,
// GetClusterState and Rebalance are not overridden yet and answer
// UNIMPLEMENTED.
// Thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
#define MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "common/compute_pool.h"
#include "common/stream_reactor.h"
#include "proto/router.grpc.pb.h"
#include "router_service/router.h"
#include "router_service/router_metrics.h"

namespace moe::router {

class RouterServiceImpl final : public v1::Router::CallbackService,
                                private StreamRegistry {
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
  grpc::ServerBidiReactor<v1::ForwardRequest, v1::ForwardResponse>* ForwardStream(
      grpc::CallbackServerContext* context) override;

  // New streams are refused; open ones answer what they accepted, then end
  // with UNAVAILABLE.
  void BeginDrain() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  bool Register(DrainableStream* stream) override ABSL_LOCKS_EXCLUDED(mu_);
  void Unregister(DrainableStream* stream) override ABSL_LOCKS_EXCLUDED(mu_);
  // Fills `response` from a forward's outcome, with metrics.
  void FillForward(const v1::ForwardRequest& request,
                   absl::StatusOr<Router::ForwardResult>& result, absl::Time start,
                   v1::ForwardResponse* response) const;

  Router& router_;
  ComputePool& pool_;
  const RouterMetrics& metrics_;
  absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<DrainableStream*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_SERVICE_H_
