// ExpertClient over gRPC: per expert server, one channel, a few long-lived
// Dispatch streams and one BackwardDispatch stream shared by all requests,
// answers matched by sequence id.
// Dispatch calls take the server's streams in turn: a stream has one write
// in flight at a time, so a forward's calls for two experts on one server
// would otherwise wait for each other's write to finish (at batch 1 that
// wait was ~40% of the call). A stream that breaks fails its pending calls with
// UNAVAILABLE (the router then fails over) and is reopened on demand after
// an exponential back-off; while backing off the server reports unhealthy.
// Thread-safe.
#ifndef MOE_ROUTER_SERVICE_GRPC_EXPERT_CLIENT_H_
#define MOE_ROUTER_SERVICE_GRPC_EXPERT_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "common/transport_credentials.h"
#include "router_service/expert_client.h"

namespace moe::router {

class GrpcExpertClient : public ExpertClient {
 public:
  struct Options {
    std::vector<ServerSpec> servers;
    TransportCredentials credentials = TransportCredentials::Plaintext();
    int max_message_bytes = 512 << 20;
    // Back-off between reconnection attempts to a failed server.
    absl::Duration min_backoff = absl::Milliseconds(100);
    absl::Duration max_backoff = absl::Seconds(5);
    // Dispatch streams per server (>= 1).
    int dispatch_streams = 2;
  };

  // Opens the streams to every server (a server that is down is retried
  // later; this does not fail for it).
  static std::unique_ptr<GrpcExpertClient> Create(Options options);
  // Closes the streams; calls still pending fail with CANCELLED.
  ~GrpcExpertClient() override;

  void Forward(int server, const v1::DispatchRequest& request, absl::string_view rows,
               ForwardDone done) override;
  void Backward(int server, const v1::BackwardDispatchRequest& request,
                BackwardDone done) override;
  void CancelForward(int server, uint64_t sequence_id) override;
  void PrepareStep(int server, const v1::PrepareStepRequest& request, absl::Time deadline,
                   UnaryDone<v1::PrepareStepResponse> done) override;
  void CommitStep(int server, const v1::CommitStepRequest& request, absl::Time deadline,
                  UnaryDone<v1::CommitStepResponse> done) override;
  void SaveExperts(int server, const v1::SaveExpertsRequest& request, absl::Time deadline,
                   UnaryDone<v1::SaveExpertsResponse> done) override;
  void PreparePlacement(int server, const v1::PreparePlacementRequest& request, absl::Time deadline,
                        UnaryDone<v1::PreparePlacementResponse> done) override;
  void CommitPlacement(int server, const v1::CommitPlacementRequest& request, absl::Time deadline,
                       UnaryDone<v1::CommitPlacementResponse> done) override;
  void AbortPlacement(int server, const v1::AbortPlacementRequest& request, absl::Time deadline,
                      UnaryDone<v1::AbortPlacementResponse> done) override;
  void AcquireLease(int server, const v1::AcquireLeaseRequest& request, absl::Time deadline,
                    UnaryDone<v1::AcquireLeaseResponse> done) override;
  void AbortStep(int server, const v1::AbortStepRequest& request, absl::Time deadline,
                 UnaryDone<v1::AbortStepResponse> done) override;
  void Info(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) override;
  void Probe(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) override;
  void GetGate(int server, absl::Time deadline, UnaryDone<v1::GetGateResponse> done) override;
  void AddGateGradient(int server, const v1::AddGateGradientRequest& request, absl::Time deadline,
                       UnaryDone<v1::AddGateGradientResponse> done) override;
  void UpdateStep(int server, const v1::UpdateStepRequest& request, absl::Time deadline,
                  UnaryDone<v1::UpdateStepResponse> done) override;
  bool IsHealthy(int server) const override;

  // Streams (re)opened so far, over all servers.
  int64_t reconnects() const;

 private:
  class Connection;
  explicit GrpcExpertClient(Options options);

  const Options options_;
  std::vector<std::unique_ptr<Connection>> connections_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_GRPC_EXPERT_CLIENT_H_
