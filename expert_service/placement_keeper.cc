#include "expert_service/placement_keeper.h"

#include <algorithm>
#include <iterator>
#include <optional>
#include <thread>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/lower_priority.h"
#include "common/placement_proto.h"
#include "common/status_macros.h"
#include "expert_service/weight_transfer.h"

namespace moe::expert {
namespace {

// Experts in `a` and not in `b` (both ascending).
std::vector<ExpertKey> Minus(absl::Span<const ExpertKey> a, absl::Span<const ExpertKey> b) {
  std::vector<ExpertKey> out;
  std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

}  // namespace

PlacementKeeper::PlacementKeeper(Options options, Placement placement, uint64_t epoch,
                                 ExpertStore& store, ExpertDispatcher& dispatcher,
                                 StepExecutor& steps, SyncPeers& peers)
    : options_(std::move(options)),
      store_(store),
      dispatcher_(dispatcher),
      steps_(steps),
      peers_(peers),
      placement_(std::move(placement)),
      epoch_(epoch) {
  dispatcher_.SetPlacementEpochs(epoch, epoch);
}

absl::Status PlacementKeeper::Prepare(const v1::PreparePlacementRequest& request,
                                      v1::PreparePlacementResponse* response) {
  const absl::Time start = absl::Now();
  const uint64_t from = request.from_epoch();
  const uint64_t to = request.epoch();
  // One epoch at a time: a far epoch would leave no room for the next.
  if (from == ~uint64_t{0} || to != from + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("epoch ", to, " must follow from_epoch ", from, " (from_epoch + 1)"));
  }
  if (request.max_bytes_per_second() < 0) {
    return absl::InvalidArgumentError("max_bytes_per_second must be >= 0");
  }
  MOE_ASSIGN_OR_RETURN(Placement next, PlacementFromProto(request.placement(), options_.model,
                                                          options_.cluster, "placement"));
  std::optional<Placement> from_placement;
  if (request.has_from_placement()) {
    MOE_ASSIGN_OR_RETURN(from_placement,
                         PlacementFromProto(request.from_placement(), options_.model,
                                            options_.cluster, "from_placement"));
  }
  const absl::Time deadline = request.deadline_unix_micros() > 0
                                  ? absl::FromUnixMicros(request.deadline_unix_micros())
                                  : start + absl::Minutes(10);
  const int self = options_.server;
  std::optional<Pending> expired;
  std::optional<Placement> current;
  std::vector<ExpertKey> added;
  {
    absl::MutexLock lock(&mu_);
    if (pending_ && !pending_->pulling &&
        start - pending_->prepared_at > options_.prepared_timeout) {
      expired = std::move(pending_);
      pending_.reset();
    }
  }
  if (expired) {
    Undo(*expired,
         absl::StrCat("prepared more than ", absl::FormatDuration(options_.prepared_timeout),
                      " ago with no commit or abort"));
  }
  {
    absl::MutexLock lock(&mu_);
    if (pending_) {
      if (pending_->from_epoch == from && pending_->epoch == to && pending_->placement == next &&
          !pending_->pulling) {
        return absl::OkStatus();  // a retry of the Prepare that got here
      }
      return absl::AbortedError(absl::StrCat("server ", name(), " is preparing placement epoch ",
                                             pending_->epoch, " from ", pending_->from_epoch,
                                             "; one change at a time"));
    }
    if (epoch_ < from && from_placement && placement_.ExpertsOn(self).empty()) {
      // Changes were made while this server was not running (absent): it
      // hosts nothing, so it catches up with nothing to lose.
      MOE_LOG(INFO, "server ", name(), " hosts nothing at placement epoch ", epoch_,
              "; catches up to epoch ", from, " to prepare ", to);
      placement_ = *std::move(from_placement);
      epoch_ = from;
    }
    if (epoch_ != from) {
      return absl::AbortedError(absl::StrCat("server ", name(), " serves placement epoch ", epoch_,
                                             ", not ", from, ": another change got there first"));
    }
    Pending pending{from, to, next, Minus(next.ExpertsOn(self), placement_.ExpertsOn(self)),
                    Minus(placement_.ExpertsOn(self), next.ExpertsOn(self))};
    // Training forwards of the leaving experts are refused from here on,
    // so none can slip in after the check below.
    dispatcher_.SetPlacementEpochs(from, from, pending.leaving);
    const absl::Time now = absl::Now();
    absl::Status refused;
    for (ExpertKey expert : pending.leaving) {
      const size_t forwards = store_.training_state().CountFor(expert, now);
      absl::StatusOr<bool> has_gradients = store_.HasGradients(expert);
      if (forwards > 0) {
        refused = absl::FailedPreconditionError(absl::StrCat(
            expert.ToString(), " would leave server ", name(), " holding the state of ", forwards,
            " training forward(s) waiting for their Backward; finish them and Step first"));
      } else if (has_gradients.ok() && *has_gradients) {
        refused = absl::FailedPreconditionError(
            absl::StrCat(expert.ToString(), " would leave server ", name(),
                         " holding gradients no Step has applied; Step first"));
      }
      if (!refused.ok()) break;
    }
    if (refused.ok()) refused = steps_.Hold(absl::StrCat("the placement change to epoch ", to));
    if (!refused.ok()) {
      dispatcher_.SetPlacementEpochs(from, from);
      return refused;
    }
    MOE_LOG(INFO, "server ", name(), ": preparing placement epoch ", to, " from ", from,
            "; pulling [", JoinExpertKeys(pending.added), "], leaving [",
            JoinExpertKeys(pending.leaving), "]");
    current = placement_;
    added = pending.added;
    pending_ = std::move(pending);
  }

  // The pulls, without the lock (Info and Abort stay answered), yielding
  // the CPU to serving.
  int64_t bytes = 0;
  absl::Status pulled;
  AtLowerPriority([&] {
    for (ExpertKey expert : added) {
      absl::StatusOr<v1::ExpertDigest> digest =
          Pull(expert, *current, deadline, request.max_bytes_per_second(), bytes);
      if (!digest.ok()) {
        pulled = digest.status();
        return;
      }
      *response->add_added() = *digest;
    }
  });
  std::optional<Pending> undo;
  {
    absl::MutexLock lock(&mu_);
    if (pulled.ok() && pending_->abort_requested) {
      pulled = absl::AbortedError(absl::StrCat("placement epoch ", to, " was aborted meanwhile"));
    }
    if (!pulled.ok()) {
      undo = std::move(pending_);
      pending_.reset();
    } else {
      pending_->pulling = false;
      pending_->prepared_at = absl::Now();
      dispatcher_.SetPlacementEpochs(from, to, pending_->leaving);
    }
  }
  if (undo) {
    Undo(*undo, std::string(pulled.message()));
    return pulled;
  }
  response->set_bytes(bytes);
  response->set_seconds(absl::ToDoubleSeconds(absl::Now() - start));
  MOE_LOG(INFO, "server ", name(), ": prepared placement epoch ", to, " (", bytes >> 20,
          " MiB pulled in ", absl::FormatDuration(absl::Now() - start), "); serving epochs ", from,
          "-", to);
  return absl::OkStatus();
}

absl::StatusOr<v1::ExpertDigest> PlacementKeeper::Pull(ExpertKey expert, const Placement& current,
                                                       absl::Time deadline,
                                                       int64_t bytes_per_second, int64_t& bytes) {
  const uint64_t step = steps_.last_committed();
  // Left over from a change that could not release it: pulled afresh.
  if (store_.CheckHosted(expert).ok()) MOE_RETURN_IF_ERROR(store_.RemoveExpert(expert));
  std::vector<std::string> failures;
  for (int holder : current.ServersOf(expert)) {
    if (holder == options_.server) continue;
    const std::string& from = options_.cluster.servers[holder].name;
    ExpertAssembler assembler(options_.model);
    const absl::Time started = absl::Now();
    int64_t received = 0;
    absl::Status status = peers_.FetchExpert(
        options_.peer_of(holder), expert, deadline, [&](const v1::ExpertWeightsChunk& chunk) {
          received += static_cast<int64_t>(chunk.data().size());
          if (bytes_per_second > 0) {
            // Paced: the pull takes at least received / rate, so that
            // serving keeps the memory bandwidth and the wire it needs.
            const absl::Time due =
                started + absl::Seconds(static_cast<double>(received) / bytes_per_second);
            const absl::Time now = absl::Now();
            if (due > now) absl::SleepFor(std::min(due, deadline) - now);
          }
          return assembler.Add(chunk);
        });
    absl::StatusOr<ExpertSnapshot> snapshot =
        status.ok() ? assembler.Finish() : absl::StatusOr<ExpertSnapshot>(status);
    if (snapshot.ok() && assembler.expert() != expert) {
      snapshot = absl::DataLossError("the server sent another expert");
    }
    if (snapshot.ok() && assembler.step() != step) {
      snapshot = absl::FailedPreconditionError(absl::StrCat(
          "it holds the weights of step ", assembler.step(), ", this server is at step ", step));
    }
    if (!snapshot.ok()) {
      failures.push_back(absl::StrCat(from, ": ", snapshot.status().message()));
      continue;
    }
    v1::ExpertDigest digest;
    SetExpertKey(expert, &digest);
    digest.set_weights_digest(assembler.digest());
    digest.set_step(step);
    MOE_RETURN_IF_ERROR(store_.AddExpert(expert, *std::move(snapshot), step));
    bytes += received;
    MOE_LOG(INFO, "server ", name(), ": pulled ", expert.ToString(), " (step ", step, ") from ",
            from, ", ", received >> 20, " MiB in ", absl::FormatDuration(absl::Now() - started));
    return digest;
  }
  return absl::UnavailableError(absl::StrCat(
      expert.ToString(), ": no server could give it to server ", name(), " (",
      failures.empty() ? std::string("no other server holds it") : absl::StrJoin(failures, "; "),
      ")"));
}

absl::Status PlacementKeeper::Commit(const v1::CommitPlacementRequest& request,
                                     v1::CommitPlacementResponse* response) {
  absl::MutexLock lock(&mu_);
  if (!pending_ && epoch_ == request.epoch()) return absl::OkStatus();  // a retry
  if (!pending_ || pending_->epoch != request.epoch() || pending_->pulling) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server ", name(), " has no prepared placement epoch ", request.epoch(), " (it serves ",
        epoch_,
        pending_ ? absl::StrCat(", ", pending_->pulling ? "is preparing" : "has prepared",
                                " epoch ", pending_->epoch)
                 : std::string(),
        ")"));
  }
  Pending pending = *std::move(pending_);
  pending_.reset();
  // The old epoch's calls are refused from here on (their routers refresh
  // and retry); then the leaving experts go, once their calls in flight
  // have finished.
  dispatcher_.SetPlacementEpochs(pending.epoch, pending.epoch);
  for (ExpertKey expert : pending.leaving) {
    const absl::Status removed = store_.RemoveExpert(expert);
    if (!removed.ok()) {
      MOE_LOG(WARNING, "server ", name(), ": releasing ", expert.ToString(), ": ",
              removed.message());
      continue;
    }
    v1::ExpertRef* ref = response->add_released();
    ref->set_layer(expert.layer);
    ref->set_expert_id(expert.expert);
  }
  // Steps are held: nothing runs on the old rings.
  const absl::Status rings = options_.set_rings(pending.placement);
  placement_ = std::move(pending.placement);
  epoch_ = pending.epoch;
  steps_.Unhold();
  MOE_LOG(INFO, "server ", name(), ": placement epoch ", epoch_, " committed; released [",
          JoinExpertKeys(pending.leaving), "], hosting [",
          JoinExpertKeys(placement_.ExpertsOn(options_.server)), "]");
  if (!rings.ok()) {
    return absl::InternalError(absl::StrCat("server ", name(), " committed placement epoch ",
                                            epoch_,
                                            " but its rings did not follow: ", rings.message()));
  }
  return absl::OkStatus();
}

absl::Status PlacementKeeper::Abort(const v1::AbortPlacementRequest& request) {
  std::optional<Pending> undo;
  {
    absl::MutexLock lock(&mu_);
    if (!pending_ || pending_->epoch != request.epoch()) return absl::OkStatus();
    if (pending_->pulling) {
      // Prepare undoes it when its pulls stop.
      pending_->abort_requested = true;
      return absl::OkStatus();
    }
    undo = std::move(pending_);
    pending_.reset();
  }
  Undo(*undo, request.reason());
  return absl::OkStatus();
}

void PlacementKeeper::Undo(const Pending& pending, const std::string& reason) {
  for (ExpertKey expert : pending.added) {
    // Not yet pulled ones are not hosted: nothing to release.
    if (store_.CheckHosted(expert).ok()) (void)store_.RemoveExpert(expert);
  }
  dispatcher_.SetPlacementEpochs(pending.from_epoch, pending.from_epoch);
  steps_.Unhold();
  MOE_LOG(WARNING, "server ", name(), ": placement epoch ", pending.epoch,
          " aborted, serving epoch ", pending.from_epoch, " again (", reason, ")");
}

void PlacementKeeper::FillInfo(v1::InfoResponse* response) const {
  absl::MutexLock lock(&mu_);
  response->set_placement_epoch(epoch_);
  *response->mutable_placement() = PlacementToProto(placement_, options_.cluster);
}

uint64_t PlacementKeeper::epoch() const {
  absl::MutexLock lock(&mu_);
  return epoch_;
}

}  // namespace moe::expert
