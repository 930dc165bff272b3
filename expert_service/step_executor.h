// One expert server's half of the two-phase training step.
//
// Prepare(step, lr): takes the accumulated gradients of every hosted expert;
// for each replica group this server is in, fuses the gradients of the
// group's experts into one buffer (one collective per group, as DDP's
// buckets) and sums it over the group's ring; then the shared optimizer
// reads the sums where they are (in the fused buffer) and writes the updated
// weights (and momentum) aside, in one pass. Commit(step) swaps them in (no
// copy). Abort(step) or a failure puts each replica's own gradients back and
// leaves every weight as it was. A prepared step that hears nothing from its
// router asks the peers what became of it and commits or aborts as they did
// (DecideFromPeers); the next PrepareStep also says (its committed_step).
// Replicas start equal and apply the same sums with the
// same optimizer, so they stay bit-identical. Per step, a gradient is copied
// once (into the fused buffer) and a weight written once (by the
// optimizer). Thread-safe.
#ifndef MOE_EXPERT_SERVICE_STEP_EXECUTOR_H_
#define MOE_EXPERT_SERVICE_STEP_EXECUTOR_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/deadline_timer.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/tensor.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/ring_allreduce.h"
#include "expert_service/expert_store.h"
#include "expert_service/step_verdict.h"

namespace moe::expert {

// A server of a replica group's ring.
struct RingMember {
  // Its name in the ClusterConfig, and how messages name it.
  std::string name;
  std::string label;
  // To it (null for this server); outlives the executor.
  allreduce::RingLink* link = nullptr;
};

// This server's place in one replica group's ring.
struct StepRing {
  uint64_t group_id = 0;
  // Fused in this order (ascending keys), tensors as kAllExpertTensors.
  std::vector<ExpertKey> experts;
  int rank = 0;
  int size = 1;
  std::string predecessor;
  std::string successor;
  // To the successor; outlives the executor.
  allreduce::RingLink* link = nullptr;
  // Every server of the group in ring order, this one included: how a
  // step that leaves some out closes the ring over the others.
  std::vector<RingMember> members;
};

// `ring` without the servers named in `left_out`, closed over the others
// (a ring of one when none is left). INVALID_ARGUMENT when this server is
// named, or when a server is to be left out of a ring without its member
// list.
absl::StatusOr<StepRing> LeaveOut(const StepRing& ring,
                                  const absl::flat_hash_set<std::string>& left_out);

// What PrepareStep orders.
struct StepOrder {
  uint64_t step = 0;
  float learning_rate = 0.0f;
  // For the all-reduces.
  absl::Time deadline = absl::InfiniteFuture();
  // The last step committed anywhere, as the step's router learnt it (see
  // Prepare).
  uint64_t committed_step = 0;
  // Who runs the step; only its Abort ends it (empty: anyone's).
  std::string coordinator;
  // Global norm clipping: all-reduce only, report the squared norm of the
  // gradients this server counts, and compute the update when Update
  // brings the scale.
  bool defer_update = false;
  // Servers (by name) behind the committed step: this step's rings close
  // over the other replicas, and they sync to it afterwards.
  absl::flat_hash_set<std::string> left_out;
};

// Server `server`'s rings: one per replica group of `placement` it is in
// (ascending group order). `name(s)` is server s's name in the config,
// `label(s)` names it in messages; `link_to(s)` is the link to server s
// (called for every other member of each ring: a step that leaves servers
// out sends to another successor).
std::vector<StepRing> StepRingsOf(const Placement& placement, int server,
                                  absl::FunctionRef<std::string(int)> name,
                                  absl::FunctionRef<std::string(int)> label,
                                  absl::FunctionRef<allreduce::RingLink*(int)> link_to);

class StepExecutor {
 public:
  struct Options {
    OptimizerOptions optimizer;
    std::string server_name;
    // The rings it starts with (SetRings changes them).
    std::vector<StepRing> rings;
    allreduce::RingOptions ring;
    // A prepared step with no commit or abort within this (after its
    // deadline) asks the peers what became of it (DecideFromPeers), and
    // again every this long while in doubt.
    absl::Duration prepared_timeout = absl::Seconds(60);
    // The other servers' answers; null: there are none to ask, and a
    // prepared step that hears nothing is aborted.
    std::function<std::vector<PeerAnswer>()> ask_peers;
    // Told (it must not block) when a PrepareStep shows that the cluster
    // committed step `committed` and this server did not: it must sync to
    // it (SyncFromPeers, then AdoptCommitted) before it trains again.
    std::function<void(uint64_t committed)> on_behind;
    // Told when a step is committed or aborted here without its router's
    // word (by the peers' answers or the next step's), for metrics.
    std::function<void(uint64_t step, bool committed)> on_resolved;
  };

  struct PrepareResult {
    // The gate gradient taken for this step (AddGateGradient), every
    // layer's stacked (ModelConfig::gate_shape()), row-major; empty when
    // none was added.
    std::vector<float> gate_gradient;
    int64_t allreduce_bytes_sent = 0;
    // With defer_update: the sum of the squares of the gradients this
    // server counts (each expert counts once in the cluster).
    bool update_deferred = false;
    double grad_squared_norm = 0.0;
    absl::Duration allreduce_time;
    // Computing the updated weights (and momentum) aside.
    absl::Duration optimizer_time;
  };

  // `store` and `registry` must outlive the executor; the registry must know
  // the rings' groups.
  StepExecutor(Options options, ExpertStore& store, allreduce::CollectiveRegistry& registry);
  // Aborts a prepared step.
  ~StepExecutor();

  // Blocks for the all-reduces (up to `order.deadline`). A step still
  // prepared here is first committed when `order.committed_step` covers
  // it (its commit was lost), else dropped (it was aborted).
  // FAILED_PRECONDITION for a step not after the last committed or aborted
  // one, and when this server is behind `order.committed_step` (on_behind
  // is told); the all-reduce's status (naming the group and peer) when one
  // fails.
  absl::StatusOr<PrepareResult> Prepare(const StepOrder& order) ABSL_LOCKS_EXCLUDED(mu_);
  // A step prepared with defer_update: computes the updated weights aside
  // from the sums scaled by `grad_scale` (in [0, 1]); the optimizer's time.
  // FAILED_PRECONDITION when no such step awaits its update; OUT_OF_RANGE
  // (the step is dropped here) when a result is not finite.
  absl::StatusOr<absl::Duration> Update(uint64_t step, float learning_rate, float grad_scale)
      ABSL_LOCKS_EXCLUDED(mu_);
  // (expert, digest of its new weights), ascending. FAILED_PRECONDITION
  // when `step` is not prepared here; a step past the last committed one
  // while nothing is prepared or preparing means this server sat it out
  // (behind): on_behind is told.
  absl::StatusOr<std::vector<std::pair<ExpertKey, uint64_t>>> Commit(uint64_t step)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Idempotent; also stops a Prepare of `step` that is still running. An
  // abort from another coordinator than the step's is ignored.
  void Abort(uint64_t step, const std::string& reason, const std::string& coordinator = "")
      ABSL_LOCKS_EXCLUDED(mu_);

  // Adds a Backward's gradient of layer `layer`'s gate [d_model,
  // num_experts] to the sum the next Prepare takes (put back if that step aborts, dropped when
  // it commits). FAILED_PRECONDITION when `gate_step` is not the last
  // committed step (the gradient is of an older gate); INVALID_ARGUMENT
  // for a wrong shape or a non-finite value.
  absl::Status AddGateGradient(uint64_t gate_step, int layer, absl::Span<const float> gradient)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The gate gradient summed here since the last step (empty: none).
  std::vector<float> gate_gradient() const ABSL_LOCKS_EXCLUDED(mu_);
  // Drops the gradients accumulated here (a sync replaced the weights they
  // are of); names the experts that had some.
  std::vector<ExpertKey> DropGradients() ABSL_LOCKS_EXCLUDED(mu_);

  uint64_t last_committed() const ABSL_LOCKS_EXCLUDED(mu_);
  // For peers' inquiries (PeerSteps).
  PeerSteps steps() const ABSL_LOCKS_EXCLUDED(mu_);
  // The hosted weights were synced from peers at committed step `step`
  // (weight_sync.h): the next step follows it. FAILED_PRECONDITION while a
  // step is preparing or prepared, or for a step before the last committed.
  absl::Status AdoptCommitted(uint64_t step) ABSL_LOCKS_EXCLUDED(mu_);

  // Replaces this server's rings (a placement change; the registry's groups
  // change with them, by the caller). FAILED_PRECONDITION while a step is
  // preparing or prepared: a step runs on the rings it started with.
  absl::Status SetRings(std::vector<StepRing> rings) ABSL_LOCKS_EXCLUDED(mu_);

  // Keeps steps out while `why` (a placement change) runs: Prepare answers
  // FAILED_PRECONDITION naming it until Unhold. FAILED_PRECONDITION while a
  // step is preparing or prepared, or another hold is on.
  absl::Status Hold(std::string why) ABSL_LOCKS_EXCLUDED(mu_);
  void Unhold() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Prepared {
    uint64_t step = 0;
    std::string coordinator;
    // The local gradients taken, to put back on abort.
    std::map<ExpertKey, ExpertWeights> local_grads;
    std::vector<float> gate_grad;
    std::map<ExpertKey, ExpertSnapshot> updated;
    // The all-reduced sums (fused buffers, one per ring) and each
    // replicated expert's spans in them, until the update has read them.
    std::vector<std::vector<float>> sums;
    std::map<ExpertKey, ExpertTensorSpans> sum_spans;
    bool awaiting_update = false;
    absl::Time deadline;
    uint64_t timer_id = 0;
  };
  // The updates of every hosted expert into `prepared.updated`, from the
  // sums (or own gradients) scaled by `update.grad_scale`.
  absl::Status ComputeUpdates(const UpdateStep& update, Prepared& prepared)
      ABSL_LOCKS_EXCLUDED(mu_);
  double OwnedSquaredNorm(const std::vector<StepRing>& rings, const Prepared& prepared) const;
  // The end of a prepare (or update): `prepared` kept awaiting its commit
  // when `status` is OK and no abort came meanwhile, else its gradients
  // put back.
  absl::StatusOr<PrepareResult> KeepPrepared(Prepared prepared, absl::Status status,
                                             absl::Time deadline, PrepareResult result)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Sums the groups' fused gradients: one buffer per ring, in ring order;
  // `grads` gets spans over each replicated expert's sums in them.
  absl::StatusOr<std::vector<std::vector<float>>> AllReduce(
      uint64_t step, const std::vector<StepRing>& rings,
      const std::map<ExpertKey, ExpertWeights>& local, absl::Time deadline,
      std::map<ExpertKey, ExpertTensorSpans>& grads, PrepareResult& result);
  void PutBack(const Prepared& prepared) ABSL_LOCKS_EXCLUDED(mu_);
  // Arms the inquiry of prepared step `step` at `when`.
  uint64_t ScheduleInquiry(uint64_t step, absl::Time when) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Asks the peers what became of prepared `step` and acts on the verdict
  // (on inquirer_).
  void Inquire(uint64_t step) ABSL_LOCKS_EXCLUDED(mu_);
  void InquiryLoop() ABSL_LOCKS_EXCLUDED(mu_);
  // Commits prepared `step`, which the cluster committed (`why`); when it
  // cannot (its update was never computed), drops it and tells on_behind.
  absl::Status CommitOrSync(uint64_t step, const std::string& why) ABSL_LOCKS_EXCLUDED(mu_);
  // Buffers of the last commit, reused so that a step writes into memory
  // already mapped: the weights it swapped out (for the next updates) and
  // the gradients it took (the next accumulators). Empty nodes when none.
  std::map<ExpertKey, ExpertSnapshot>::node_type TakeSpare(ExpertKey expert)
      ABSL_LOCKS_EXCLUDED(mu_);
  std::map<ExpertKey, ExpertWeights>::node_type TakeSpareGradients(ExpertKey expert)
      ABSL_LOCKS_EXCLUDED(mu_);
  void KeepSpare(std::map<ExpertKey, ExpertSnapshot> updated,
                 std::map<ExpertKey, ExpertWeights> grads) ABSL_LOCKS_EXCLUDED(mu_);
  // Ring `ring`'s fused buffer of the last step, to fill again.
  std::vector<float> TakeSpareBuffer(size_t ring) ABSL_LOCKS_EXCLUDED(mu_);
  void KeepSpareBuffers(std::vector<std::vector<float>> buffers) ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  ExpertStore& store_;
  allreduce::CollectiveRegistry& registry_;

  mutable absl::Mutex mu_;
  uint64_t last_committed_ ABSL_GUARDED_BY(mu_) = 0;
  // Steps <= this were aborted (or superseded) here while preparing or
  // prepared.
  uint64_t last_aborted_ ABSL_GUARDED_BY(mu_) = 0;
  // Prepare refuses steps further than this past the last committed one.
  static constexpr uint64_t kMaxStepsAhead = 1 << 16;
  // Steps aborted before they started here; the largest go first.
  static constexpr size_t kMaxAbortedAhead = 64;
  absl::btree_set<uint64_t> aborted_ahead_ ABSL_GUARDED_BY(mu_);
  // The gate gradient added since the last Prepare took it (empty: none).
  std::vector<float> gate_gradient_ ABSL_GUARDED_BY(mu_);
  std::optional<uint64_t> preparing_ ABSL_GUARDED_BY(mu_);
  std::string preparing_coordinator_ ABSL_GUARDED_BY(mu_);
  std::optional<Prepared> prepared_ ABSL_GUARDED_BY(mu_);
  std::vector<StepRing> rings_ ABSL_GUARDED_BY(mu_);
  // Why steps are held (Hold); nullopt: they are not.
  std::optional<std::string> held_ ABSL_GUARDED_BY(mu_);
  std::map<ExpertKey, ExpertSnapshot> spare_ ABSL_GUARDED_BY(mu_);
  std::map<ExpertKey, ExpertWeights> spare_grads_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<float>> spare_buffers_ ABSL_GUARDED_BY(mu_);
  // A prepared step whose inquiry is due (the timer sets it, inquirer_
  // runs it: it blocks on the peers), and the inquirer's stop.
  std::optional<uint64_t> inquire_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread inquirer_;
  // Last: stopped before the state its callbacks touch.
  DeadlineTimer timer_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_STEP_EXECUTOR_H_
