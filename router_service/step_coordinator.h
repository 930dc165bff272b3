// The router's side of the two-phase training step. Step(lr): PrepareStep on
// every expert server (each sums its replica groups' gradients over their
// rings and holds the updated weights aside) and the gate's update computed
// aside here; when every server has prepared, CommitStep everywhere and the
// new gate installed; if any fails or misses the deadline, AbortStep
// everywhere, the gate's gradient put back, and the error names the servers.
// After a commit, the replicas' digests are compared: replicas of an expert
// must be bit-identical. One step at a time. Thread-safe; Step blocks.
#ifndef MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_
#define MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_

#include <cstdint>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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
  };

  struct Result {
    uint64_t step = 0;
    absl::Duration step_time;
    // The slowest server's all-reduces and optimizer.
    absl::Duration allreduce_time;
    absl::Duration optimizer_time;
    // The commit phase, as seen here.
    absl::Duration commit_time;
  };

  // `router` and `client` must outlive the coordinator.
  StepCoordinator(Options options, Router& router, ExpertClient& client);

  // Runs one step, answering a little before `deadline` (the abort of a
  // failed step is sent, not waited for). FAILED_PRECONDITION while another
  // step runs.
  absl::StatusOr<Result> Step(float learning_rate, absl::Time deadline)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // The next step number: one past the highest any server has committed
  // (asked once, so a restarted router goes on where the servers are).
  absl::StatusOr<uint64_t> NextStep(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AbortEverywhere(uint64_t step, const std::string& reason);
  int NumServers() const;

  const Options options_;
  Router& router_;
  ExpertClient& client_;

  mutable absl::Mutex mu_;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<uint64_t> next_step_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_STEP_COORDINATOR_H_
