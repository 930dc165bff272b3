// Automatic Rebalance (off by default): DYNAMIC placement that follows the
// traffic. Every `interval` it
//  1. takes (or renews) the lease "auto-rebalance" that the cluster's first
//     expert server keeps: with several routers, one decides; the others
//     only watch (and when that server is unreachable, none changes
//     anything);
//  2. reads every server's per-expert token counters (Info), which count
//     what every router sent, and keeps them over `window`;
//  3. when the servers' max/mean load over the window is above `threshold`
//     and the last change is `cooldown` ago, plans a placement from that
//     load (PlanRebalance, with this router's sampled co-activation), and
//     moves to it (PlacementCoordinator) only if the plan predicts at most
//     `threshold - hysteresis`: a small gain never pays for moving weights.
// A step, a save or another router's change meanwhile makes it wait for
// the next look. Thread-safe.
#ifndef MOE_ROUTER_SERVICE_AUTO_REBALANCER_H_
#define MOE_ROUTER_SERVICE_AUTO_REBALANCER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "router_service/expert_client.h"
#include "router_service/placement_coordinator.h"
#include "router_service/router.h"
#include "router_service/routing_sample.h"

namespace moe::router {

class AutoRebalancer {
 public:
  struct Options {
    ModelConfig model;
    ClusterConfig cluster;
    absl::Duration interval = absl::Seconds(10);
    absl::Duration window = absl::Seconds(60);
    double threshold = 1.25;
    double hysteresis = 0.1;
    absl::Duration cooldown = absl::Minutes(10);
    // This router, as the lease names it.
    std::string holder;
    // Called with each change's outcome (for metrics).
    std::function<void(const absl::StatusOr<PlacementCoordinator::Result>&)> on_change;
  };

  // What a look decided.
  enum class Decision {
    kNotLeader,     // another router holds the lease (or its keeper is down)
    kMeasuring,     // less than half a window of counts yet
    kBalanced,      // at or below the threshold
    kCoolingDown,   // changed less than `cooldown` ago
    kNoBetterPlan,  // the plan moves nothing, or would not get below
                    // threshold - hysteresis
    kChanged,       // moved to a new placement
    kFailed,        // the change was refused or failed (logged)
  };
  static const char* DecisionName(Decision decision);

  struct Look {
    Decision decision = Decision::kMeasuring;
    // The servers' max/mean over the window, and the plan's (when planned).
    double imbalance = 1;
    double planned = 1;
  };

  // The references must outlive it. `sample` may be null. Start() runs
  // the looks on a thread of its own.
  AutoRebalancer(Options options, Router& router, ExpertClient& client,
                 PlacementCoordinator& placements, const RoutingSample* sample);
  ~AutoRebalancer();
  void Start();

  // One look at `now` (the thread's; tests call it directly).
  Look LookOnce(absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // Cumulative tokens per expert (summed over servers) and per server.
  struct Counts {
    absl::Time at;
    std::vector<int64_t> expert;
    std::vector<int64_t> server;
    // Servers that host nothing and did not answer (absent_servers.h).
    std::vector<int> absent;
  };
  bool HoldsLease(absl::Time now);
  absl::StatusOr<Counts> ReadCounts(absl::Time now);

  const Options options_;
  Router& router_;
  ExpertClient& client_;
  PlacementCoordinator& placements_;
  const RoutingSample* const sample_;

  absl::Mutex mu_;
  std::deque<Counts> history_ ABSL_GUARDED_BY(mu_);
  absl::Time last_change_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();

  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_AUTO_REBALANCER_H_
