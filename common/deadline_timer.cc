#include "common/deadline_timer.h"

namespace moe {

DeadlineTimer::DeadlineTimer() : thread_([this] { Loop(); }) {}

DeadlineTimer::~DeadlineTimer() { Stop(); }

void DeadlineTimer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

uint64_t DeadlineTimer::Schedule(absl::Time deadline, absl::AnyInvocable<void() &&> callback) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  pending_.emplace(std::make_pair(deadline, id), std::move(callback));
  deadline_of_.emplace(id, deadline);
  return id;
}

bool DeadlineTimer::Cancel(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = deadline_of_.find(id);
  if (it == deadline_of_.end()) return false;
  pending_.erase({it->second, id});
  deadline_of_.erase(it);
  return true;
}

void DeadlineTimer::Loop() {
  while (true) {
    absl::AnyInvocable<void() &&> due;
    {
      absl::MutexLock lock(&mu_);
      while (true) {
        if (stopping_) return;
        const absl::Time next =
            pending_.empty() ? absl::InfiniteFuture() : pending_.begin()->first.first;
        if (next <= absl::Now()) break;
        // Wake for the deadline, a new earlier one, or stopping.
        auto changed = [this, next]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return stopping_ || (!pending_.empty() && pending_.begin()->first.first < next);
        };
        mu_.AwaitWithDeadline(absl::Condition(&changed), next);
      }
      auto first = pending_.begin();
      deadline_of_.erase(first->first.second);
      due = std::move(first->second);
      pending_.erase(first);
    }
    std::move(due)();
  }
}

}  // namespace moe
