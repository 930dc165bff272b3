// The expert server's per-request logic, without a transport: every RPC of
// proto/expert.proto as a call on messages. Checks the deadline and that the
// expert is hosted, decodes and validates tensors, allocates each answer's
// tensor and computes into it, batches inference requests (when a
// MicroBatcher is given), counts metrics, and runs the training step's
// phases. Per-request errors go into the answer's `error`; whole-call
// errors are the returned status. The gRPC adapter (expert_service.h) and
// the router's in-process test client both call this.
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_DISPATCHER_H_
#define MOE_EXPERT_SERVICE_EXPERT_DISPATCHER_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_store.h"
#include "expert_service/micro_batcher.h"
#include "expert_service/step_executor.h"
#include "expert_service/weight_transfer.h"
#include "proto/expert.pb.h"

namespace moe::expert {

class ExpertDispatcher {
 public:
  struct Options {
    std::string server_name;
    // The clock for deadlines and training-state expiry (tests inject one).
    std::function<absl::Time()> clock = [] { return absl::Now(); };
    // Root of the checkpoint shards SaveExperts writes; empty: refused.
    std::string checkpoint_dir;
    // Inference calls of at most this many multiply-adds (rows x the
    // expert's parameters) run where received (RunsWhereReceived); 0: none.
    int64_t inline_call_multiply_adds = int64_t{1} << 17;
  };

  // All references must outlive the dispatcher. `batcher` may be null (no
  // micro-batching); with `steps` null (a store served without a ring) the
  // step calls answer FAILED_PRECONDITION.
  ExpertDispatcher(Options options, ExpertStore& store, const ExpertMetrics& metrics,
                   MicroBatcher* batcher, StepExecutor* steps);

  // Runs one expert on the request's tokens. `reply` runs once with the
  // answer: at once, or when its micro-batch has run. A large batch stops
  // between blocks of rows once its deadline has passed or `cancelled`
  // (if set) turns true, answering DEADLINE_EXCEEDED or CANCELLED.
  using DispatchReply = absl::AnyInvocable<void(std::unique_ptr<v1::DispatchResponse>) &&>;
  void Dispatch(std::unique_ptr<v1::DispatchRequest> request,
                std::unique_ptr<v1::DispatchResponse> response, DispatchReply reply,
                std::function<bool()> cancelled = nullptr);
  // Whether `request` (not yet validated) is an inference call small
  // enough to run on the thread that received it: a thread hand-off would
  // cost more than its work. Dispatch runs such a call at once, never
  // merged with others.
  bool RunsWhereReceived(const v1::DispatchRequest& request) const;
  void Backward(const v1::BackwardDispatchRequest& request,
                v1::BackwardDispatchResponse* response);

  void Info(v1::InfoResponse* response) const;
  // The expert's chunks, for GetExpertWeights.
  absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> ExpertChunks(
      const v1::GetExpertWeightsRequest& request) const;
  // Installs what `assembler` received (LoadExpertWeights).
  absl::Status InstallExpert(ExpertAssembler& assembler, v1::LoadExpertWeightsResponse* response);
  absl::Status ReleaseExpert(const v1::ReleaseExpertRequest& request);
  // Writes the experts, each at the request's step, as one checkpoint
  // shard under Options::checkpoint_dir. Blocks on the disk: call it off
  // the transport's threads.
  absl::Status SaveExperts(const v1::SaveExpertsRequest& request,
                           v1::SaveExpertsResponse* response) const;

  // The training step's phases. PrepareStep blocks for the all-reduces (up
  // to `deadline`, or the request's own when it has one): call it off the
  // transport's threads. AbortStep returns at once.
  absl::Status PrepareStep(const v1::PrepareStepRequest& request, absl::Time deadline,
                           v1::PrepareStepResponse* response);
  absl::Status UpdateStep(const v1::UpdateStepRequest& request, v1::UpdateStepResponse* response);
  absl::Status CommitStep(const v1::CommitStepRequest& request, v1::CommitStepResponse* response)
      ABSL_LOCKS_EXCLUDED(gate_mu_);
  absl::Status AbortStep(const v1::AbortStepRequest& request);
  // The gate the last CommitStep carried (NOT_FOUND without one).
  absl::Status GetGate(v1::GetGateResponse* response) const ABSL_LOCKS_EXCLUDED(gate_mu_);
  // The gate of this server's committed step from a peer (the step was
  // committed here without its CommitStep: on a peer's word, or by a
  // sync), kept unless a gate as new is. FAILED_PRECONDITION for a gate of
  // another step; INVALID_ARGUMENT for a malformed one.
  absl::Status AdoptGate(const v1::GetGateResponse& gate) ABSL_LOCKS_EXCLUDED(gate_mu_);
  // A Backward's gate gradient, summed here for the next step.
  absl::Status AddGateGradient(const v1::AddGateGradientRequest& request);
  bool runs_steps() const { return steps_ != nullptr; }

  // The placement epochs this server serves calls of: [oldest, newest]
  // (both 1 at start: the config's). While a placement change moves experts
  // (add before remove) a server serves the old epoch and the new one, and
  // refuses training forwards for the experts `leaving` it (their state
  // would be released with them).
  void SetPlacementEpochs(uint64_t oldest, uint64_t newest, std::vector<ExpertKey> leaving = {})
      ABSL_LOCKS_EXCLUDED(epoch_mu_);
  uint64_t placement_epoch() const ABSL_LOCKS_EXCLUDED(epoch_mu_);

  const ModelConfig& model() const { return store_.model(); }
  const ExpertMetrics& metrics() const { return metrics_; }

 private:
  absl::Status CheckDeadline(int64_t deadline_unix_micros) const;
  // For a versioned call (`has_version`): FAILED_PRECONDITION unless it is
  // for this server's placement epoch; the step is checked by the store.
  absl::Status CheckEpoch(bool has_version, const v1::StateVersion& version) const;
  // FAILED_PRECONDITION for a training forward of an expert leaving.
  absl::Status CheckNotLeaving(ExpertKey expert) const;
  // This server's version of `expert`, for an answer to a versioned call.
  void ServerVersion(ExpertKey expert, v1::StateVersion* out) const;
  // Finishes a dispatch after its forward ran (or failed), with metrics.
  void CompleteDispatch(const absl::Status& status, ExpertKey expert, int64_t rows,
                        absl::Duration elapsed, bool versioned,
                        v1::DispatchResponse& response) const;

  const Options options_;
  ExpertStore& store_;
  const ExpertMetrics& metrics_;
  MicroBatcher* const batcher_;
  StepExecutor* const steps_;
  mutable absl::Mutex epoch_mu_;
  uint64_t oldest_epoch_ ABSL_GUARDED_BY(epoch_mu_) = 1;
  uint64_t newest_epoch_ ABSL_GUARDED_BY(epoch_mu_) = 1;
  std::vector<ExpertKey> leaving_ ABSL_GUARDED_BY(epoch_mu_);
  // The gate of the last committed step, as its CommitStep carried it.
  mutable absl::Mutex gate_mu_;
  std::optional<v1::GetGateResponse> gate_ ABSL_GUARDED_BY(gate_mu_);
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_DISPATCHER_H_
