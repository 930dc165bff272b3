#include "router_service/placement_coordinator.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/placement_proto.h"
#include "common/status_macros.h"
#include "router_service/absent_servers.h"
#include "router_service/on_every_server.h"

namespace moe::router {
namespace {

// The failures of one phase as one status: ABORTED when any server saw
// another change win, else the first failure's code; every message.
// Absent servers (absent_servers.h) are not counted.
template <typename Response>
absl::Status Summarize(absl::string_view what, const std::vector<absl::StatusOr<Response>>& results,
                       const std::vector<bool>& absent = {}) {
  std::vector<std::string> messages;
  absl::StatusCode code = absl::StatusCode::kOk;
  for (size_t s = 0; s < results.size(); ++s) {
    const auto& r = results[s];
    if (r.ok() || (s < absent.size() && absent[s])) continue;
    messages.emplace_back(r.status().message());
    if (code == absl::StatusCode::kOk || absl::IsAborted(r.status())) code = r.status().code();
  }
  if (messages.empty()) return absl::OkStatus();
  return absl::Status(code, absl::StrCat(what, ": ", absl::StrJoin(messages, "; ")));
}

// Server names from the cluster config, for logs.
std::function<std::string(int)> Name(const PlacementCoordinator::Options& options) {
  return [&options](int s) { return options.cluster.servers.at(s).name; };
}

}  // namespace

PlacementCoordinator::PlacementCoordinator(Options options, Router& router, ExpertClient& client,
                                           StepCoordinator& steps)
    : options_(std::move(options)), router_(router), client_(client), steps_(steps) {}

absl::StatusOr<PlacementCoordinator::Result> PlacementCoordinator::Change(Placement next,
                                                                          absl::Time deadline) {
  MOE_RETURN_IF_ERROR(steps_.StartRunning("a placement change"));
  absl::StatusOr<Result> result = Run(std::move(next), deadline);
  steps_.DoneRunning();
  return result;
}

absl::StatusOr<PlacementCoordinator::Result> PlacementCoordinator::Run(Placement next,
                                                                       absl::Time deadline) {
  const absl::Time start = absl::Now();
  Result result;
  Router::PlacementSnapshot from = router_.placement();
  result.from_epoch = result.epoch = from->version;
  if (from->value == next) return result;
  const uint64_t epoch = from->version + 1;
  const int num_servers = from->value.num_servers();
  for (int s = 0; s < num_servers; ++s) {
    for (ExpertKey e : next.ExpertsOn(s)) result.replicas_added += !from->value.Holds(s, e);
    for (ExpertKey e : from->value.ExpertsOn(s)) result.replicas_removed += !next.Holds(s, e);
  }
  MOE_LOG(INFO, "placement epoch ", epoch, " from ", from->version, ": ", result.replicas_added,
          " replica(s) to add, ", result.replicas_removed, " to remove");

  // 0. Every server reachable (Info waits out a reconnect back-off), so
  // that a server that just came back is not taken for a dead one; but
  // servers that host nothing before or after and are not running (absent)
  // are left out of the change.
  const ServerInfos reachable = AskEveryServer(
      client_, num_servers,
      [&](int s) { return from->value.ExpertsOn(s).empty() && next.ExpertsOn(s).empty(); },
      std::min(deadline, absl::Now() + options_.commit_timeout));
  const std::vector<bool>& absent = reachable.absent;
  if (reachable.any_absent()) {
    MOE_LOG(INFO, "placement epoch ", epoch, ": server(s) ", AbsentNames(reachable, Name(options_)),
            " host nothing and are not running: left out");
  }
  MOE_RETURN_IF_ERROR(
      Summarize(absl::StrCat("placement epoch ", epoch, " not started, a server is unreachable"),
                reachable.infos, absent));

  // 1. Every server prepares (pulls), or nothing changes.
  const absl::Duration margin = std::min(absl::Seconds(1), (deadline - start) / 10);
  v1::PreparePlacementRequest prepare;
  prepare.set_from_epoch(from->version);
  prepare.set_epoch(epoch);
  *prepare.mutable_placement() = PlacementToProto(next, options_.cluster);
  *prepare.mutable_from_placement() = PlacementToProto(from->value, options_.cluster);
  prepare.set_deadline_unix_micros(absl::ToUnixMicros(deadline - 2 * margin));
  prepare.set_max_bytes_per_second(options_.max_bytes_per_second);
  const std::vector<absl::StatusOr<v1::PreparePlacementResponse>> prepared =
      OnEveryServer<v1::PreparePlacementResponse>(num_servers, [&](int s, auto done) {
        if (absent[s]) return std::move(done)(v1::PreparePlacementResponse());
        client_.PreparePlacement(s, prepare, deadline - margin, std::move(done));
      });
  const absl::Status prepare_failed =
      Summarize(absl::StrCat("placement epoch ", epoch, " aborted, no replica moved"), prepared);
  if (!prepare_failed.ok()) {
    AbortEverywhere(epoch, std::string(prepare_failed.message()), absent);
    return prepare_failed;
  }
  for (const auto& r : prepared) {
    result.bytes += r->bytes();
    result.pull_time = std::max(result.pull_time, absl::Seconds(r->seconds()));
  }

  // 2. New calls use the new epoch; those in flight keep the old one.
  absl::StatusOr<Router::PlacementSnapshot> installed =
      router_.InstallPlacement(std::move(next), from->version, epoch);
  if (!installed.ok()) {
    const std::string reason = absl::StrCat("placement epoch ", epoch, " aborted: this router ",
                                            installed.status().message());
    AbortEverywhere(epoch, reason, absent);
    return absl::AbortedError(reason);
  }
  result.epoch = epoch;

  // 3. Drain: every call holding the old snapshot has finished when this
  // is its last holder.
  const absl::Time drain_start = absl::Now();
  const absl::Time drained_by = drain_start + options_.drain_timeout;
  while (from.use_count() > 1 && absl::Now() < drained_by) absl::SleepFor(absl::Milliseconds(1));
  result.drain_time = absl::Now() - drain_start;
  if (from.use_count() > 1) {
    MOE_LOG(WARNING, "placement epoch ", epoch, ": ", from.use_count() - 1, " call(s) of epoch ",
            from->version, " still running after ", absl::FormatDuration(options_.drain_timeout),
            "; they run again on the new epoch");
  }
  from.reset();

  // 4. Servers serve the new epoch only and release what it drops.
  v1::CommitPlacementRequest commit;
  commit.set_epoch(epoch);
  std::vector<absl::StatusOr<v1::CommitPlacementResponse>> committed =
      OnEveryServer<v1::CommitPlacementResponse>(num_servers, [&](int s, auto done) {
        if (absent[s]) return std::move(done)(v1::CommitPlacementResponse());
        client_.CommitPlacement(s, commit, absl::Now() + options_.commit_timeout, std::move(done));
      });
  // A commit is idempotent: a server that missed it (a lost answer, a
  // reconnect) gets it again, a few times.
  for (int attempt = 0; attempt < kCommitRetries; ++attempt) {
    std::vector<int> missed;
    for (int s = 0; s < num_servers; ++s) {
      if (!committed[s].ok()) missed.push_back(s);
    }
    if (missed.empty()) break;
    absl::SleepFor(absl::Milliseconds(200));  // back-off between attempts
    const auto again = OnEveryServer<v1::CommitPlacementResponse>(
        static_cast<int>(missed.size()), [&](int i, auto done) {
          client_.CommitPlacement(missed[i], commit, absl::Now() + options_.commit_timeout,
                                  std::move(done));
        });
    for (size_t i = 0; i < missed.size(); ++i) committed[missed[i]] = again[i];
  }
  result.time = absl::Now() - start;
  if (absl::Status failed =
          Summarize(absl::StrCat("placement epoch ", epoch, " is in force, but the commit failed"),
                    committed);
      !failed.ok()) {
    return absl::InternalError(absl::StrCat(
        failed.message(), " (those servers serve both epochs' experts until they commit)"));
  }
  MOE_LOG(INFO, "placement epoch ", epoch, " committed: ", result.replicas_added, " added (",
          result.bytes >> 20, " MiB pulled in ", absl::FormatDuration(result.pull_time), "), ",
          result.replicas_removed, " removed, drained in ", absl::FormatDuration(result.drain_time),
          ", ", absl::FormatDuration(result.time), " in all");
  return result;
}

void PlacementCoordinator::AbortEverywhere(uint64_t epoch, const std::string& reason,
                                           const std::vector<bool>& absent) {
  v1::AbortPlacementRequest abort;
  abort.set_epoch(epoch);
  abort.set_reason(reason);
  const int num_servers = static_cast<int>(absent.size());
  const auto aborted =
      OnEveryServer<v1::AbortPlacementResponse>(num_servers, [&](int s, auto done) {
        if (absent[s]) return std::move(done)(v1::AbortPlacementResponse());
        client_.AbortPlacement(s, abort, absl::Now() + options_.commit_timeout, std::move(done));
      });
  for (int s = 0; s < num_servers; ++s) {
    if (!aborted[s].ok()) {
      MOE_LOG(WARNING, "placement epoch ", epoch, ": abort on server ", s, ": ",
              aborted[s].status().message());
    }
  }
  MOE_LOG(WARNING, reason);
}

std::vector<int> PlacementCoordinator::AbsentServers(const Placement& current,
                                                     absl::Time deadline) {
  return AskEveryServer(client_, current, deadline).absent_servers();
}

absl::Status PlacementCoordinator::AdoptServersPlacement(absl::Time deadline) {
  const Router::PlacementSnapshot current = router_.placement();
  // Servers that host nothing are only probed: those not running (absent)
  // do not hold up the start.
  const ServerInfos asked = AskEveryServer(client_, current->value, deadline);
  const v1::InfoResponse* newest = nullptr;
  for (const auto& info : asked.infos) {
    if (info.ok() && (newest == nullptr || info->placement_epoch() > newest->placement_epoch())) {
      newest = &*info;
    }
  }
  if (newest == nullptr || newest->placement_epoch() <= router_.placement()->version) {
    return absl::OkStatus();
  }
  return router_.AdoptReported(*newest);
}

}  // namespace moe::router
