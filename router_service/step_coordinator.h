// The router's side of the two-phase training step. Step(lr): PrepareStep on
// every expert server (each sums its replica groups' gradients over their
// rings and holds the updated weights aside) and the gate's update computed
// aside here; when every server has prepared, CommitStep everywhere and the
// new gate installed; if any fails or misses the deadline, AbortStep
// everywhere, the gate's gradient put back, and the error names the servers.
// After a commit, the replicas' digests are compared: replicas of an expert
// must be bit-identical. SaveCheckpoint writes a consistent checkpoint of
// the last committed step. One step or save at a time. Thread-safe; Step
// and SaveCheckpoint block.
#ifndef MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_
#define MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/tensor.h"
#include "router_service/expert_client.h"
#include "router_service/router.h"

namespace moe::router {

class StepCoordinator {
 public:
  struct Options {
    // Used when a Step gives none (0).
    float default_learning_rate = 0.0f;
    // A Step without a deadline gets this one.
    absl::Duration default_timeout = absl::Seconds(60);
    // How long a commit, or an abort, may take.
    absl::Duration abort_timeout = absl::Seconds(5);
    // Where checkpoints go (step-N/ below it, on a volume every expert
    // server mounts at its own --checkpoint_dir); empty: SaveCheckpoint is
    // refused.
    std::string checkpoint_dir;
    // A checkpoint after every committed step that is a multiple of this;
    // 0: only when asked.
    int checkpoint_every_steps = 0;
    // How long a periodic checkpoint may take.
    absl::Duration checkpoint_timeout = absl::Minutes(10);
    // The training run's id, written into every checkpoint's metadata.
    std::string lineage;
    // Called after each checkpoint saved (for metrics).
    std::function<void(uint64_t step)> on_saved;
  };

  struct Result {
    uint64_t step = 0;
    absl::Duration step_time;
    // The slowest server's all-reduces and optimizer.
    absl::Duration allreduce_time;
    absl::Duration optimizer_time;
    // The commit phase, as seen here.
    absl::Duration commit_time;
    // Servers that did not confirm the commit, each with its error: they
    // commit it when they hear from a peer or the next step.
    std::vector<std::string> servers_behind;
    // Servers behind the committed step when it began, left out of it
    // (Numbers::left_out): they sync to it afterwards.
    std::vector<std::string> servers_left_out;
  };

  struct Saved {
    uint64_t step = 0;
    // checkpoint_dir/step-N, and its shards (the gate's last).
    std::string directory;
    std::vector<std::string> files;
    int64_t bytes = 0;
    absl::Duration time;
  };

  // `router` and `client` must outlive the coordinator.
  StepCoordinator(Options options, Router& router, ExpertClient& client);

  // Runs one step, answering a little before `deadline` (the abort of a
  // failed step is sent, not waited for). FAILED_PRECONDITION while another
  // step runs here; ABORTED while another router runs one (the step lease,
  // kept by server 0, decides).
  //
  // The step is decided when every server has prepared it: from then on it
  // is committed, also on a server whose CommitStep fails (it commits when
  // it hears from its peers or the next step: Result::servers_behind).
  // Before that, it is aborted everywhere and nothing changes.
  absl::StatusOr<Result> Step(float learning_rate, absl::Time deadline)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Writes checkpoint_dir/step-N for the last committed step N: each
  // expert once, from a healthy replica, as a shard written by its server,
  // the gate as the last shard, then model.safetensors.index.json (durably,
  // last: a directory without it is not a checkpoint). No step runs
  // meanwhile (FAILED_PRECONDITION while one does); Forwards go on.
  absl::StatusOr<Saved> SaveCheckpoint(DType dtype, absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  const std::string& lineage() const { return options_.lineage; }

  // Marks a step, a save or another state change (a placement change) as
  // running: one at a time. FAILED_PRECONDITION naming the one that runs.
  absl::Status StartRunning(const char* what) ABSL_LOCKS_EXCLUDED(mu_);
  void DoneRunning() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Numbers {
    // This step's number: past every step any server has committed,
    // prepared or aborted, and past this router's last.
    uint64_t step = 0;
    // The last step committed anywhere.
    uint64_t committed = 0;
    // Servers behind it, left out of this step (LeftOut), by index and by
    // name.
    std::vector<bool> left_out;
    std::vector<std::string> left_out_names;
  };
  // Which servers of `infos` (every server's) sit this step out: those
  // behind the committed step (they missed a commit and hold no gradient
  // of it) whose every expert has a replica that is not behind, never the
  // lease keeper (it keeps the gate's gradients). A behind server that
  // holds an expert's only current replica runs the step, which it
  // refuses until it has synced.
  void LeaveOutServersBehind(const std::vector<absl::StatusOr<v1::InfoResponse>>& infos,
                             Numbers& numbers) const;
  // Asks every server (a router that restarted, or another router's steps,
  // leave this one's view behind).
  absl::StatusOr<Numbers> NextStep(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The cluster-wide step lease (on server 0), held for `ttl`; ABORTED
  // naming the holder when another router holds it.
  absl::Status AcquireStepLease(absl::Duration ttl, absl::Time deadline);
  void ReleaseStepLease();
  absl::StatusOr<Result> RunStep(float learning_rate, absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  // The step, once this router holds the lease.
  absl::StatusOr<Result> LeasedStep(float lr, absl::Time start, absl::Time deadline)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<Saved> Save(DType dtype, absl::Time deadline);
  void AbortEverywhere(uint64_t step, const std::string& reason);
  // The sum of the gate gradients the servers' answers carry (zeros when
  // none).
  absl::StatusOr<FloatTensor> GateGradient(
      uint64_t step, const std::vector<absl::StatusOr<v1::PrepareStepResponse>>& prepared);
  // CommitStep on every server not `left_out`, again (a few times, within
  // abort_timeout) on those that fail for a reason other than a refusal;
  // an empty answer stands for a server left out.
  std::vector<absl::StatusOr<v1::CommitStepResponse>> CommitEverywhere(
      const v1::CommitStepRequest& commit, const std::vector<bool>& left_out);
  int NumServers() const;

  const Options options_;
  Router& router_;
  ExpertClient& client_;

  mutable absl::Mutex mu_;
  // "a step", "a checkpoint save" or "a placement change" while one runs.
  const char* running_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t next_step_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_
