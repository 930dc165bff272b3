// The ExpertServer gRPC service: the adapter between the wire API and the
// ExpertStore. Dispatch and BackwardDispatch are long-lived streams whose
// messages are validated and computed on the ComputePool; Info and the
// weight-transfer RPCs are small callback handlers. The step RPCs run on
// their own thread (PrepareStep waits for all-reduces; AbortStep, which must
// be able to stop it, runs at once). Statuses become grpc::Status here and
// only here.
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
#define MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_store.h"
#include "expert_service/micro_batcher.h"
#include "expert_service/step_executor.h"
#include "common/stream_reactor.h"
#include "proto/expert.grpc.pb.h"

namespace moe::expert {

class ExpertServiceImpl final : public v1::ExpertServer::CallbackService,
                                private StreamRegistry {
 public:
  struct Options {
    std::string server_name;
    // The clock for deadlines and training-state expiry (tests inject one).
    std::function<absl::Time()> clock = [] { return absl::Now(); };
  };

  // All references must outlive the service. `batcher` may be null (no
  // micro-batching). `step_pool` runs PrepareStep and CommitStep; with
  // `steps` null (a store served without a ring: router unit tests) the
  // step RPCs answer FAILED_PRECONDITION.
  ExpertServiceImpl(Options options, ExpertStore& store, ComputePool& pool,
                    const ExpertMetrics& metrics, MicroBatcher* batcher,
                    StepExecutor* steps = nullptr, ComputePool* step_pool = nullptr);

  // Stops accepting streams; open streams answer what they accepted and
  // finish with UNAVAILABLE. Returns at once; WaitForStreams() waits.
  void BeginDrain() ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until no stream is open or `deadline` passes; true if none is.
  bool WaitForStreams(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  int open_streams() const ABSL_LOCKS_EXCLUDED(mu_);

  // The per-message work. Dispatch replies at once, or when its micro-batch
  // has run (inference requests, when a batcher is configured).
  using DispatchReply = absl::AnyInvocable<void(std::unique_ptr<v1::DispatchResponse>) &&>;
  void HandleDispatch(std::unique_ptr<v1::DispatchRequest> request,
                      std::unique_ptr<v1::DispatchResponse> response, DispatchReply reply);
  void HandleBackward(const v1::BackwardDispatchRequest& request,
                      v1::BackwardDispatchResponse* response);

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
  grpc::ServerUnaryReactor* PrepareStep(grpc::CallbackServerContext* context,
                                        const v1::PrepareStepRequest* request,
                                        v1::PrepareStepResponse* response) override;
  grpc::ServerUnaryReactor* CommitStep(grpc::CallbackServerContext* context,
                                       const v1::CommitStepRequest* request,
                                       v1::CommitStepResponse* response) override;
  grpc::ServerUnaryReactor* AbortStep(grpc::CallbackServerContext* context,
                                      const v1::AbortStepRequest* request,
                                      v1::AbortStepResponse* response) override;

 private:
  bool Register(DrainableStream* stream) override ABSL_LOCKS_EXCLUDED(mu_);
  void Unregister(DrainableStream* stream) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status CheckDeadline(int64_t deadline_unix_micros) const;
  // Runs `work` on the step thread, or finishes `reactor` with why not.
  void RunStep(grpc::ServerUnaryReactor* reactor, absl::AnyInvocable<void() &&> work);
  // Answers a dispatch after its forward ran (or failed), with metrics.
  void CompleteDispatch(const absl::Status& status, int expert, int64_t rows,
                        absl::Duration elapsed, v1::DispatchResponse& response) const;

  const Options options_;
  ExpertStore& store_;
  ComputePool& pool_;
  const ExpertMetrics& metrics_;
  MicroBatcher* const batcher_;
  StepExecutor* const steps_;
  ComputePool* const step_pool_;

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<DrainableStream*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_SERVICE_H_
