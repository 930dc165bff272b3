// The router's side of a placement change (Router.Rebalance), add before
// remove:
//  1. PreparePlacement on every server, a compare-and-set from this
//     router's epoch N to N+1: new replicas pull their weights from current
//     holders (paced), and every server serves both epochs. Any failure
//     (a server at another epoch: ABORTED, another change won) aborts the
//     change everywhere; no replica has moved.
//  2. The router installs epoch N+1: calls that start later use it, calls
//     in flight finish on N (the versioned snapshot).
//  3. Once no call holds epoch N (or the drain timeout passed: a late call
//     meets the new epoch and runs again on it), CommitPlacement everywhere:
//     servers serve N+1 only and release the replicas it drops.
// One state change at a time: it takes the StepCoordinator's slot, so a
// rebalance never overlaps a Step or a checkpoint save. Other routers learn
// the new epoch from the servers (Router::Refresh). Thread-safe;
// Change blocks.
#ifndef MOE_ROUTER_SERVICE_PLACEMENT_COORDINATOR_H_
#define MOE_ROUTER_SERVICE_PLACEMENT_COORDINATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "router_service/expert_client.h"
#include "router_service/router.h"
#include "router_service/step_coordinator.h"

namespace moe::router {

class PlacementCoordinator {
 public:
  struct Options {
    ClusterConfig cluster;
    // Pace of each server's weight pulls (0: unpaced).
    int64_t max_bytes_per_second = int64_t{256} << 20;
    // How long calls planned with the old placement may take to finish.
    absl::Duration drain_timeout = absl::Seconds(10);
    // How long a commit or an abort may take.
    absl::Duration commit_timeout = absl::Seconds(10);
  };

  struct Result {
    uint64_t from_epoch = 0;
    // Equal to from_epoch when the placement asked for is the current one.
    uint64_t epoch = 0;
    int replicas_added = 0;
    int replicas_removed = 0;
    int64_t bytes = 0;
    absl::Duration pull_time;
    absl::Duration drain_time;
    absl::Duration time;
  };

  // The references must outlive the coordinator.
  PlacementCoordinator(Options options, Router& router, ExpertClient& client,
                       StepCoordinator& steps);

  // Moves the cluster to `next` by `deadline` (the pulls end before it).
  // ABORTED when another change won, FAILED_PRECONDITION while a step runs
  // or an expert leaving a server holds training state or gradients; the
  // error names the servers. After the commit phase, an error means the
  // new epoch is in force but the servers named did not commit.
  absl::StatusOr<Result> Change(Placement next, absl::Time deadline);

  // Adopts the highest placement epoch the servers report, when newer than
  // the router's (a router that starts after a change). Servers that do
  // not answer by `deadline` are skipped.
  absl::Status AdoptServersPlacement(absl::Time deadline);

  // The servers that host nothing in `current` and are not running
  // (absent_servers.h): plans give them no experts.
  std::vector<int> AbsentServers(const Placement& current, absl::Time deadline);

 private:
  // Commits retried on servers that did not answer OK.
  static constexpr int kCommitRetries = 3;

  absl::StatusOr<Result> Run(Placement next, absl::Time deadline);
  // AbortPlacement on every server but the absent ones.
  void AbortEverywhere(uint64_t epoch, const std::string& reason, const std::vector<bool>& absent);

  const Options options_;
  Router& router_;
  ExpertClient& client_;
  StepCoordinator& steps_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_PLACEMENT_COORDINATOR_H_
