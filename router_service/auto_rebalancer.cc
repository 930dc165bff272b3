#include "router_service/auto_rebalancer.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/placement.h"
#include "router_service/absent_servers.h"
#include "router_service/on_every_server.h"
#include "router_service/rebalance.h"

namespace moe::router {
namespace {

constexpr char kLease[] = "auto-rebalance";
constexpr absl::Duration kCallTimeout = absl::Seconds(2);

}  // namespace

const char* AutoRebalancer::DecisionName(Decision decision) {
  switch (decision) {
    case Decision::kNotLeader:
      return "another router decides";
    case Decision::kMeasuring:
      return "measuring";
    case Decision::kBalanced:
      return "balanced";
    case Decision::kCoolingDown:
      return "cooling down";
    case Decision::kNoBetterPlan:
      return "no plan gains enough";
    case Decision::kChanged:
      return "changed";
    case Decision::kFailed:
      return "failed";
  }
  return "?";
}

AutoRebalancer::AutoRebalancer(Options options, Router& router, ExpertClient& client,
                               PlacementCoordinator& placements, const RoutingSample* sample)
    : options_(std::move(options)),
      router_(router),
      client_(client),
      placements_(placements),
      sample_(sample) {}

AutoRebalancer::~AutoRebalancer() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void AutoRebalancer::Start() {
  MOE_LOG(INFO, "automatic rebalance: every ", absl::FormatDuration(options_.interval),
          ", load over ", absl::FormatDuration(options_.window), ", above ", options_.threshold,
          " max/mean when a plan gets below ", options_.threshold - options_.hysteresis,
          ", at most once per ", absl::FormatDuration(options_.cooldown));
  thread_ = std::thread([this] {
    Decision last = Decision::kMeasuring;
    while (!stop_.WaitForNotificationWithTimeout(options_.interval)) {
      const Look look = LookOnce(absl::Now());
      if (look.decision != last || look.decision == Decision::kChanged ||
          look.decision == Decision::kFailed) {
        MOE_LOG(INFO, "automatic rebalance: ", DecisionName(look.decision), " (servers max/mean ",
                look.imbalance,
                look.decision == Decision::kNoBetterPlan || look.decision == Decision::kChanged
                    ? absl::StrCat(", planned ", look.planned)
                    : std::string(),
                ")");
      }
      last = look.decision;
    }
  });
}

bool AutoRebalancer::HoldsLease(absl::Time now) {
  v1::AcquireLeaseRequest request;
  request.set_name(kLease);
  request.set_holder(options_.holder);
  // Three looks' worth, and at least 30 s (a look that changes the
  // placement takes seconds): a router that stops looking loses it soon
  // after.
  request.set_ttl_ms(absl::ToInt64Milliseconds(std::max(3 * options_.interval, absl::Seconds(30))));
  const std::vector<absl::StatusOr<v1::AcquireLeaseResponse>> answer =
      OnEveryServer<v1::AcquireLeaseResponse>(1, [&](int, auto done) {
        client_.AcquireLease(kLeaseKeeper, request, now + kCallTimeout, std::move(done));
      });
  return answer[0].ok() && answer[0]->granted();
}

absl::StatusOr<AutoRebalancer::Counts> AutoRebalancer::ReadCounts(absl::Time now) {
  const Router::PlacementSnapshot placement = router_.placement();
  const int num_servers = placement->value.num_servers();
  // Servers that host nothing and are not running count nothing (absent).
  const ServerInfos asked = AskEveryServer(client_, placement->value, now + kCallTimeout);
  const std::vector<absl::StatusOr<v1::InfoResponse>>& infos = asked.infos;
  const int experts = static_cast<int>(options_.model.total_experts());
  Counts counts{now, std::vector<int64_t>(experts, 0), std::vector<int64_t>(num_servers, 0)};
  counts.absent = asked.absent_servers();
  for (int s = 0; s < num_servers; ++s) {
    if (asked.absent[s]) continue;
    if (!infos[s].ok()) return infos[s].status();
    if (infos[s]->expert_tokens_size() != experts) {
      return absl::FailedPreconditionError(
          absl::StrCat("server ", s, " reports ", infos[s]->expert_tokens_size(),
                       " experts' tokens, not ", experts, " (", options_.model.num_layers,
                       " layer(s) of ", options_.model.experts_per_layer(), ")"));
    }
    for (int e = 0; e < experts; ++e) {
      counts.expert[e] += infos[s]->expert_tokens(e);
      counts.server[s] += infos[s]->expert_tokens(e);
    }
  }
  return counts;
}

AutoRebalancer::Look AutoRebalancer::LookOnce(absl::Time now) {
  Look look;
  if (!HoldsLease(now)) {
    look.decision = Decision::kNotLeader;
    return look;
  }
  absl::StatusOr<Counts> counts = ReadCounts(now);
  if (!counts.ok()) {
    MOE_LOG(WARNING, "automatic rebalance: reading the servers' load: ", counts.status().message());
    return look;  // measuring: no decision without every server's counts
  }
  LoadStats::Snapshot load;
  {
    absl::MutexLock lock(&mu_);
    history_.push_back(*counts);
    while (history_.size() > 1 && history_[1].at <= now - options_.window) history_.pop_front();
    const Counts& base = history_.front();
    if (now - base.at < options_.window / 2) return look;
    load.window = now - base.at;
    std::vector<double> servers;
    for (size_t s = 0; s < counts->server.size(); ++s) {
      servers.push_back(static_cast<double>(counts->server[s] - base.server[s]));
    }
    for (size_t e = 0; e < counts->expert.size(); ++e) {
      load.expert_tokens.push_back(counts->expert[e] - base.expert[e]);
    }
    for (int64_t t : load.expert_tokens) {
      if (t < 0) {
        // A server restarted (its counters began again): measure anew.
        history_ = {*counts};
        return look;
      }
    }
    std::vector<int> room(servers.size(), 1);
    for (int s : counts->absent) room[s] = 0;
    look.imbalance = Imbalance(servers, room);
    if (look.imbalance <= options_.threshold) {
      look.decision = Decision::kBalanced;
      return look;
    }
    if (now - last_change_ < options_.cooldown) {
      look.decision = Decision::kCoolingDown;
      return look;
    }
  }
  std::optional<PlacementPlan> plan;
  {
    // Released before the change: its drain waits for every holder.
    const Router::PlacementSnapshot current = router_.placement();
    RebalanceInputs inputs;
    inputs.model = &options_.model;
    inputs.cluster = &options_.cluster;
    inputs.current = &current->value;
    inputs.load = std::move(load);
    if (sample_ != nullptr) inputs.tokens = sample_->Tokens();
    inputs.absent = counts->absent;
    absl::StatusOr<PlacementPlan> planned = PlanRebalance(inputs);
    if (!planned.ok()) {
      MOE_LOG(WARNING, "automatic rebalance: planning: ", planned.status().message());
      look.decision = Decision::kFailed;
      return look;
    }
    plan = *std::move(planned);
  }
  look.planned = plan->imbalance_after;
  // The placement is already the plan's (the imbalance comes from how
  // replicas share the load), or the gain is too small to move weights.
  if ((plan->replicas_added == 0 && plan->replicas_removed == 0) ||
      look.planned > options_.threshold - options_.hysteresis) {
    look.decision = Decision::kNoBetterPlan;
    return look;
  }
  const absl::StatusOr<PlacementCoordinator::Result> changed =
      placements_.Change(std::move(plan->placement), now + absl::Minutes(10));
  if (options_.on_change) options_.on_change(changed);
  if (!changed.ok()) {
    MOE_LOG(WARNING, "automatic rebalance: ", changed.status().message());
    look.decision = Decision::kFailed;
    return look;
  }
  absl::MutexLock lock(&mu_);
  last_change_ = now;
  // Loads per server under the old placement say nothing of the new one.
  history_.clear();
  look.decision = Decision::kChanged;
  return look;
}

}  // namespace moe::router
