// The seam between the router and its expert servers: sends one expert's
// share of a batch to one server and delivers the answer. Implementations:
// GrpcExpertClient (persistent Dispatch streams, the product) and
// InProcessExpertClient (real ExpertStores in this process, for tests; it
// fails on command).
// Thread-safe: calls may come from any thread, concurrently.
#ifndef MOE_ROUTER_SERVICE_EXPERT_CLIENT_H_
#define MOE_ROUTER_SERVICE_EXPERT_CLIENT_H_

#include <memory>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "proto/expert.pb.h"
#include "router_service/expert_answer.h"

namespace moe::router {

// The server that keeps the routers' leases (AcquireLease): the step lease
// and the automatic Rebalance's.
inline constexpr int kLeaseKeeper = 0;

class ExpertClient {
 public:
  using ForwardDone = absl::AnyInvocable<void(absl::StatusOr<std::unique_ptr<ExpertAnswer>>) &&>;
  using BackwardDone = absl::AnyInvocable<void(
      absl::StatusOr<std::unique_ptr<v1::BackwardDispatchResponse>>) &&>;

  virtual ~ExpertClient() = default;

  // Sends `request` to server `server` (its index in the cluster config),
  // its tokens' bytes being `rows` (request.tokens holds their shape and
  // dtype): a transport sends them without copying them into the message.
  // `request` and `rows` must stay valid until `done` runs, and its
  // sequence_id must be unique among the caller's requests in flight
  // (answers are matched by it). `done` runs exactly once, on an
  // unspecified thread, and must not block. A transport failure is the
  // status (UNAVAILABLE when the server is unreachable); a per-request
  // error from the server is in the answer's response().error.
  virtual void Forward(int server, const v1::DispatchRequest& request, absl::string_view rows,
                       ForwardDone done) = 0;
  virtual void Backward(int server, const v1::BackwardDispatchRequest& request,
                        BackwardDone done) = 0;

  // Tells `server` that the Forward with `sequence_id` is no longer wanted:
  // if it has not started there, it is answered CANCELLED without running.
  // Best effort: the Forward's `done` still runs, with whatever comes back.
  virtual void CancelForward(int server, uint64_t sequence_id) = 0;

  // The unary calls of the training step, and Info. `done` runs exactly
  // once, on an unspecified thread; `deadline` bounds the call.
  template <typename Response>
  using UnaryDone = absl::AnyInvocable<void(absl::StatusOr<Response>) &&>;
  virtual void PrepareStep(int server, const v1::PrepareStepRequest& request,
                           absl::Time deadline, UnaryDone<v1::PrepareStepResponse> done) = 0;
  virtual void CommitStep(int server, const v1::CommitStepRequest& request, absl::Time deadline,
                          UnaryDone<v1::CommitStepResponse> done) = 0;
  virtual void AbortStep(int server, const v1::AbortStepRequest& request, absl::Time deadline,
                         UnaryDone<v1::AbortStepResponse> done) = 0;
  // Info waits for the server to be reachable, up to `deadline`.
  virtual void Info(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) = 0;
  // Info without waiting for a connection: UNAVAILABLE at once when the
  // server cannot be reached now (its channel's reconnect back-off, at most
  // a few seconds, may hide one that has just started). Tells a server that
  // is not running from a slow one (absent_servers.h).
  virtual void Probe(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) {
    Info(server, deadline, std::move(done));
  }
  // The gate of the last step `server` committed.
  virtual void GetGate(int server, absl::Time deadline, UnaryDone<v1::GetGateResponse> done) = 0;
  // With gradient clipping, between PrepareStep and CommitStep.
  virtual void UpdateStep(int server, const v1::UpdateStepRequest& request, absl::Time deadline,
                          UnaryDone<v1::UpdateStepResponse> done) = 0;
  // A Backward's gate gradient, for the next step (sent to kLeaseKeeper).
  virtual void AddGateGradient(int server, const v1::AddGateGradientRequest& request,
                               absl::Time deadline,
                               UnaryDone<v1::AddGateGradientResponse> done) = 0;
  // One shard of a checkpoint (SaveCheckpoint).
  virtual void SaveExperts(int server, const v1::SaveExpertsRequest& request, absl::Time deadline,
                           UnaryDone<v1::SaveExpertsResponse> done) = 0;
  // A placement change's phases (Rebalance).
  virtual void PreparePlacement(int server, const v1::PreparePlacementRequest& request,
                                absl::Time deadline,
                                UnaryDone<v1::PreparePlacementResponse> done) = 0;
  virtual void CommitPlacement(int server, const v1::CommitPlacementRequest& request,
                               absl::Time deadline,
                               UnaryDone<v1::CommitPlacementResponse> done) = 0;
  virtual void AbortPlacement(int server, const v1::AbortPlacementRequest& request,
                              absl::Time deadline, UnaryDone<v1::AbortPlacementResponse> done) = 0;
  // A lease `server` keeps (one router decides an automatic Rebalance).
  virtual void AcquireLease(int server, const v1::AcquireLeaseRequest& request, absl::Time deadline,
                            UnaryDone<v1::AcquireLeaseResponse> done) = 0;

  // Whether the transport to `server` is believed up (a hint for replica
  // choice; a call may still fail).
  [[nodiscard]] virtual bool IsHealthy(int server) const = 0;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_EXPERT_CLIENT_H_
