#include "expert_service/allreduce/collective_registry.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moe::allreduce {

CollectiveRegistry::CollectiveRegistry(absl::Duration park_timeout)
    : park_timeout_(park_timeout) {}

CollectiveRegistry::~CollectiveRegistry() { Shutdown(); }

void CollectiveRegistry::Shutdown() {
  std::vector<std::unique_ptr<Parked>> parked;
  std::vector<std::shared_ptr<RingAllReduce>> running;
  {
    absl::MutexLock lock(&mu_);
    shut_down_ = true;
    for (auto& [id, group] : groups_) {
      for (auto& p : group.parked) parked.push_back(std::move(p));
      group.parked.clear();
      if (group.running != nullptr) running.push_back(group.running);
    }
  }
  const absl::Status why = absl::UnavailableError("server shutting down");
  for (auto& p : parked) {
    timer_.Cancel(p->timer_id);
    std::move(p->ack)(why);
  }
  for (auto& c : running) c->Fail(absl::UnavailableError(absl::StrCat(c->Name(), ": ", why.message())));
}

void CollectiveRegistry::AddGroup(uint64_t group_id) {
  absl::MutexLock lock(&mu_);
  groups_[group_id];
}

void CollectiveRegistry::RemoveGroup(uint64_t group_id) {
  Group removed;
  {
    absl::MutexLock lock(&mu_);
    auto it = groups_.find(group_id);
    if (it == groups_.end()) return;
    removed = std::move(it->second);
    groups_.erase(it);
  }
  const absl::Status why = absl::FailedPreconditionError(
      absl::StrCat("group ", absl::Hex(group_id), " was removed from this server"));
  for (auto& p : removed.parked) {
    timer_.Cancel(p->timer_id);
    std::move(p->ack)(why);
  }
  if (removed.running != nullptr) removed.running->Fail(why);
}

bool CollectiveRegistry::HasGroup(uint64_t group_id) const {
  absl::MutexLock lock(&mu_);
  return groups_.contains(group_id);
}

void CollectiveRegistry::Register(std::shared_ptr<RingAllReduce> collective) {
  std::vector<std::unique_ptr<Parked>> ready;
  std::vector<std::unique_ptr<Parked>> stale;
  {
    absl::MutexLock lock(&mu_);
    Group& group = groups_[collective->group_id()];
    group.running = collective;
    for (auto& p : group.parked) {
      (p->segment->header().step == collective->step() ? ready : stale).push_back(std::move(p));
    }
    group.parked.clear();
    // Segments of a later step (cannot happen while steps run in order)
    // stay parked.
    for (auto& p : stale) {
      if (p->segment->header().step > collective->step()) group.parked.push_back(std::move(p));
    }
    stale.erase(std::remove(stale.begin(), stale.end(), nullptr), stale.end());
  }
  for (auto& p : stale) {
    timer_.Cancel(p->timer_id);
    std::move(p->ack)(absl::FailedPreconditionError(
        absl::StrCat("segment of step ", p->segment->header().step, ": this server is at step ",
                     collective->step(), " of group ", absl::Hex(collective->group_id()))));
  }
  for (auto& p : ready) {
    timer_.Cancel(p->timer_id);
    std::move(p->ack)(collective->OnChunk(*p->segment));
  }
}

void CollectiveRegistry::Unregister(const RingAllReduce& collective) {
  absl::MutexLock lock(&mu_);
  auto it = groups_.find(collective.group_id());
  if (it == groups_.end()) return;  // removed meanwhile
  Group& group = it->second;
  if (group.running.get() == &collective) group.running.reset();
  group.over = group.has_over ? std::max(group.over, collective.step()) : collective.step();
  group.has_over = true;
}

void CollectiveRegistry::Deliver(const ReceivedRingSegment* segment, Ack ack) {
  const uint64_t step = segment->header().step;
  const uint64_t group_id = segment->header().group_id;
  std::shared_ptr<RingAllReduce> target;
  absl::Status rejected;
  {
    absl::MutexLock lock(&mu_);
    auto it = groups_.find(group_id);
    if (shut_down_) {
      rejected = absl::UnavailableError("server shutting down");
    } else if (it == groups_.end()) {
      rejected = absl::InvalidArgumentError(absl::StrCat(
          "segment of group ", absl::Hex(group_id), ": not a replica group of this server"));
    } else if (Group& group = it->second;
               group.running != nullptr && group.running->step() == step) {
      target = group.running;
    } else if (group.running != nullptr && step < group.running->step()) {
      rejected = absl::FailedPreconditionError(
          absl::StrCat("segment of step ", step, " group ", absl::Hex(group_id),
                       ": this server is running step ", group.running->step()));
    } else if (aborted_.contains(step)) {
      rejected = absl::AbortedError(absl::StrCat("segment of step ", step, " group ",
                                                 absl::Hex(group_id),
                                                 ": that step was aborted on this server"));
    } else if (group.has_over && step <= group.over) {
      rejected = absl::FailedPreconditionError(
          absl::StrCat("segment of step ", step, " group ", absl::Hex(group_id),
                       ": that step is over on this server (last: ", group.over, ")"));
    } else {
      // A later step than this server has started (its predecessor is
      // ahead): wait for it.
      auto parked = std::make_unique<Parked>();
      Parked* raw = parked.get();
      raw->segment = segment;
      raw->ack = std::move(ack);
      group.parked.push_back(std::move(parked));
      raw->timer_id = timer_.Schedule(absl::Now() + park_timeout_,
                                      [this, group_id, raw] { Expire(group_id, raw); });
      return;
    }
  }
  std::move(ack)(target != nullptr ? target->OnChunk(*segment) : rejected);
}

void CollectiveRegistry::Expire(uint64_t group_id, Parked* parked) {
  std::unique_ptr<Parked> mine;
  {
    absl::MutexLock lock(&mu_);
    auto& list = groups_[group_id].parked;
    auto it = std::find_if(list.begin(), list.end(),
                           [parked](const auto& p) { return p.get() == parked; });
    if (it == list.end()) return;  // delivered or rejected meanwhile
    mine = std::move(*it);
    list.erase(it);
  }
  std::move(mine->ack)(absl::DeadlineExceededError(absl::StrCat(
      "segment of step ", mine->segment->header().step, " group ", absl::Hex(group_id),
      ": this server did not start that step within ", absl::FormatDuration(park_timeout_))));
}

void CollectiveRegistry::PredecessorLost(const std::vector<uint64_t>& groups,
                                         const absl::Status& why) {
  std::vector<std::shared_ptr<RingAllReduce>> running;
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t id : groups) {
      auto it = groups_.find(id);
      if (it != groups_.end() && it->second.running != nullptr) {
        running.push_back(it->second.running);
      }
    }
  }
  for (auto& c : running) c->PredecessorLost(why);
}

void CollectiveRegistry::AbortStep(uint64_t step, const absl::Status& why) {
  std::vector<std::shared_ptr<RingAllReduce>> running;
  std::vector<std::unique_ptr<Parked>> rejected;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, group] : groups_) {
      if (group.running != nullptr && group.running->step() == step) {
        running.push_back(group.running);
      }
      for (auto& p : group.parked) {
        if (p->segment->header().step == step) rejected.push_back(std::move(p));
      }
      group.parked.erase(std::remove(group.parked.begin(), group.parked.end(), nullptr),
                         group.parked.end());
    }
    // Its late segments are refused. Only this step: an abort of step
    // 2^64-1 must not make every later step "over".
    aborted_.insert(step);
    if (aborted_.size() > kMaxAborted) aborted_.erase(--aborted_.end());
  }
  for (auto& c : running) c->Fail(absl::AbortedError(absl::StrCat(c->Name(), ": ", why.message())));
  for (auto& p : rejected) {
    timer_.Cancel(p->timer_id);
    std::move(p->ack)(absl::AbortedError(absl::StrCat("step ", step, " aborted: ", why.message())));
  }
}

}  // namespace moe::allreduce
