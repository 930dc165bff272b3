// The ExpertServer gRPC service: a thin adapter between the wire API and the
// ExpertDispatcher, which holds the per-request logic. Dispatch and
// BackwardDispatch are long-lived streams whose messages run on the
// ComputePool; Info and the weight-transfer RPCs are small callback
// handlers (GetExpertWeights copies its expert on a thread of its own). The
// step RPCs run on their own thread (PrepareStep waits for
// all-reduces; AbortStep, which must be able to stop it, runs at once).
// Statuses become grpc::Status here and only here.
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
#define MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_

#include <atomic>
#include <functional>

#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "common/stream_set.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/lease_table.h"
#include "expert_service/placement_keeper.h"
#include "proto/expert.grpc.pb.h"

namespace moe::expert {

class ExpertServiceImpl final : public v1::ExpertServer::CallbackService {
 public:
  // `dispatcher` and `pool` must outlive the service. `step_pool` runs
  // PrepareStep and CommitStep (may be null when the dispatcher runs no
  // steps). The Dispatch and BackwardDispatch streams share `bounds`.
  // `placement` (may be null: placement changes are refused) serves the
  // placement RPCs, also on `step_pool`; `leases` (may be null: refused)
  // AcquireLease. Dispatch calls small enough
  // (ExpertDispatcher::RunsWhereReceived) run on the gRPC thread that read
  // them, after `prepare_compute_thread` (may be null) readies it for the
  // kernels as `pool`'s threads are (oneDNN's thread count).
  ExpertServiceImpl(ExpertDispatcher& dispatcher, ComputePool& pool,
                    ComputePool* step_pool = nullptr, StreamBounds bounds = {},
                    PlacementKeeper* placement = nullptr, LeaseTable* leases = nullptr,
                    std::function<void()> prepare_compute_thread = nullptr);

  // Stops accepting streams; open streams answer what they accepted and
  // finish with UNAVAILABLE. Returns at once; WaitForStreams() waits.
  void BeginDrain() { streams_.BeginDrain(); }
  // Waits until no stream is open or `deadline` passes; true if none is.
  bool WaitForStreams(absl::Time deadline) { return streams_.WaitForStreams(deadline); }
  int open_streams() const { return streams_.open_streams(); }

  grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse>* Dispatch(
      grpc::CallbackServerContext* context) override;
  grpc::ServerBidiReactor<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>*
  BackwardDispatch(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* context,
                                 const v1::InfoRequest* request,
                                 v1::InfoResponse* response) override;
  grpc::ServerWriteReactor<v1::ExpertWeightsChunk>* GetExpertWeights(
      grpc::CallbackServerContext* context,
      const v1::GetExpertWeightsRequest* request) override;
  grpc::ServerReadReactor<v1::ExpertWeightsChunk>* LoadExpertWeights(
      grpc::CallbackServerContext* context,
      v1::LoadExpertWeightsResponse* response) override;
  grpc::ServerUnaryReactor* ReleaseExpert(grpc::CallbackServerContext* context,
                                          const v1::ReleaseExpertRequest* request,
                                          v1::ReleaseExpertResponse* response) override;
  grpc::ServerUnaryReactor* SaveExperts(grpc::CallbackServerContext* context,
                                        const v1::SaveExpertsRequest* request,
                                        v1::SaveExpertsResponse* response) override;
  grpc::ServerUnaryReactor* PrepareStep(grpc::CallbackServerContext* context,
                                        const v1::PrepareStepRequest* request,
                                        v1::PrepareStepResponse* response) override;
  grpc::ServerUnaryReactor* UpdateStep(grpc::CallbackServerContext* context,
                                       const v1::UpdateStepRequest* request,
                                       v1::UpdateStepResponse* response) override;
  grpc::ServerUnaryReactor* CommitStep(grpc::CallbackServerContext* context,
                                       const v1::CommitStepRequest* request,
                                       v1::CommitStepResponse* response) override;
  grpc::ServerUnaryReactor* AbortStep(grpc::CallbackServerContext* context,
                                      const v1::AbortStepRequest* request,
                                      v1::AbortStepResponse* response) override;
  grpc::ServerUnaryReactor* PreparePlacement(grpc::CallbackServerContext* context,
                                             const v1::PreparePlacementRequest* request,
                                             v1::PreparePlacementResponse* response) override;
  grpc::ServerUnaryReactor* CommitPlacement(grpc::CallbackServerContext* context,
                                            const v1::CommitPlacementRequest* request,
                                            v1::CommitPlacementResponse* response) override;
  grpc::ServerUnaryReactor* AbortPlacement(grpc::CallbackServerContext* context,
                                           const v1::AbortPlacementRequest* request,
                                           v1::AbortPlacementResponse* response) override;
  grpc::ServerUnaryReactor* GetGate(grpc::CallbackServerContext* context,
                                    const v1::GetGateRequest* request,
                                    v1::GetGateResponse* response) override;
  grpc::ServerUnaryReactor* AddGateGradient(grpc::CallbackServerContext* context,
                                            const v1::AddGateGradientRequest* request,
                                            v1::AddGateGradientResponse* response) override;
  grpc::ServerUnaryReactor* AcquireLease(grpc::CallbackServerContext* context,
                                         const v1::AcquireLeaseRequest* request,
                                         v1::AcquireLeaseResponse* response) override;

 private:
  // FAILED_PRECONDITION when this server changes no placement.
  absl::Status CheckPlacementKeeper() const;

  // Runs `work` on the step thread, or finishes `reactor` with why not.
  void RunStep(grpc::ServerUnaryReactor* reactor, absl::AnyInvocable<void() &&> work);

  // Weight transfers (GetExpertWeights) under way, at most
  // kMaxWeightTransfers: each holds a copy of its expert.
  static constexpr int kMaxWeightTransfers = 4;
  std::atomic<int> weight_transfers_{0};

  ExpertDispatcher& dispatcher_;
  const ExpertMetrics& metrics_;
  ComputePool& pool_;
  ComputePool* const step_pool_;
  PlacementKeeper* const placement_;
  LeaseTable* const leases_;
  const std::function<void()> prepare_compute_thread_;
  StreamSet streams_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
