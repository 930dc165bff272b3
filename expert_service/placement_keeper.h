// One expert server's placement, and its half of a placement change (add
// before remove). The server is the source of truth for what it hosts:
// this owns the epoch it serves and that epoch's whole placement (which
// Info reports, so routers and restarted servers learn it).
//
// Prepare(from -> to): a compare-and-set from the epoch served (ABORTED
// otherwise, or while another change is prepared); holds training steps;
// refuses when an expert leaving this server holds training state or
// gradients (they would be lost: Step first); pulls each expert the new
// placement adds here from a server holding it (paced, digest-checked, at
// this server's committed step) and then serves both epochs, refusing
// training forwards of the experts leaving. Commit(to): serves the new
// epoch only, releases the leaving experts (calls in flight finish first),
// moves the step's rings to the new placement, releases the steps.
// Abort(to): releases what Prepare added and serves the old epoch again.
// Transport-free: peers are the SyncPeers seam (weight_sync.h), the
// rings a callback. Thread-safe; Prepare blocks for the pulls.
#ifndef MOE_EXPERT_SERVICE_PLACEMENT_KEEPER_H_
#define MOE_EXPERT_SERVICE_PLACEMENT_KEEPER_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/expert_store.h"
#include "expert_service/step_executor.h"
#include "expert_service/weight_sync.h"
#include "proto/expert.pb.h"

namespace moe::expert {

class PlacementKeeper {
 public:
  struct Options {
    ModelConfig model;
    ClusterConfig cluster;
    // This server's index in cluster.servers.
    int server = 0;
    // The SyncPeers index of server s (another than `server`).
    std::function<int(int server)> peer_of;
    // Installs this server's rings for a placement (between steps).
    std::function<absl::Status(const Placement&)> set_rings;
    // A change prepared this long ago with no commit or abort (its router
    // died) is aborted by the next Prepare.
    absl::Duration prepared_timeout = absl::Seconds(60);
  };

  // The references must outlive the keeper. Starts at `epoch` (1: the
  // config's placement) serving `placement`.
  PlacementKeeper(Options options, Placement placement, uint64_t epoch, ExpertStore& store,
                  ExpertDispatcher& dispatcher, StepExecutor& steps, SyncPeers& peers);

  absl::Status Prepare(const v1::PreparePlacementRequest& request,
                       v1::PreparePlacementResponse* response) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Commit(const v1::CommitPlacementRequest& request,
                      v1::CommitPlacementResponse* response) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Abort(const v1::AbortPlacementRequest& request) ABSL_LOCKS_EXCLUDED(mu_);

  // The epoch served (the new one while a change is prepared) and its
  // placement, into an Info answer.
  void FillInfo(v1::InfoResponse* response) const ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t epoch() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Pending {
    uint64_t from_epoch = 0;
    uint64_t epoch = 0;
    Placement placement;
    std::vector<ExpertKey> added;
    std::vector<ExpertKey> leaving;
    // Still pulling (Prepare has not returned), and asked meanwhile to abort.
    bool pulling = true;
    bool abort_requested = false;
    absl::Time prepared_at;
  };

  // Pulls `expert` from a server holding it in the current placement.
  absl::StatusOr<v1::ExpertDigest> Pull(ExpertKey expert, const Placement& current,
                                        absl::Time deadline, int64_t bytes_per_second,
                                        int64_t& bytes);
  // Undoes a prepared (or failed) change: its added experts go.
  void Undo(const Pending& pending, const std::string& reason) ABSL_LOCKS_EXCLUDED(mu_);
  std::string name() const { return options_.cluster.servers[options_.server].name; }

  const Options options_;
  ExpertStore& store_;
  ExpertDispatcher& dispatcher_;
  StepExecutor& steps_;
  SyncPeers& peers_;

  mutable absl::Mutex mu_;
  Placement placement_ ABSL_GUARDED_BY(mu_);
  uint64_t epoch_ ABSL_GUARDED_BY(mu_);
  std::optional<Pending> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_PLACEMENT_KEEPER_H_
