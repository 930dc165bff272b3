#include "expert_service/training_state.h"

#include "absl/strings/str_cat.h"

namespace moe::expert {

int TrainingStateStore::ExpireLocked(absl::Time now) {
  int dropped = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.expiry <= now) {
      bytes_ -= it->second.saved.bytes();
      entries_.erase(it++);
      ++dropped;
    } else {
      ++it;
    }
  }
  return dropped;
}

absl::Status TrainingStateStore::Put(uint64_t request_id, ExpertKey expert, SavedForward saved,
                                     absl::Time now) {
  absl::MutexLock lock(&mu_);
  ExpireLocked(now);
  const int64_t size = saved.bytes();
  if (bytes_ + size > options_.max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("training state for request ", request_id, ", ", expert.ToString(), " needs ",
                     size, " bytes; ", bytes_, " of the ", options_.max_bytes,
                     "-byte budget are held (run Backward or let them expire)"));
  }
  auto [it, inserted] =
      entries_.try_emplace(Key{request_id, expert}, Entry{std::move(saved), now + options_.ttl});
  if (!inserted) {
    return absl::AlreadyExistsError(absl::StrCat(
        "request ", request_id, " already has training state for ", expert.ToString()));
  }
  bytes_ += size;
  return absl::OkStatus();
}

absl::StatusOr<SavedForward> TrainingStateStore::Take(uint64_t request_id, ExpertKey expert,
                                                      absl::Time now, std::optional<int64_t> rows) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(Key{request_id, expert});
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat("request ", request_id, ": no training state for ", expert.ToString(),
                     " (unknown request id, backward already done, or not a training forward)"));
  }
  if (it->second.expiry <= now) {
    bytes_ -= it->second.saved.bytes();
    entries_.erase(it);
    return absl::NotFoundError(absl::StrCat("request ", request_id, ": training state for ",
                                            expert.ToString(), " expired (kept for ",
                                            absl::FormatDuration(options_.ttl), ")"));
  }
  if (rows.has_value() && *rows != it->second.saved.rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("grad_output: request ", request_id, " sent ", it->second.saved.rows,
                     " tokens to ", expert.ToString(), " in forward, backward has ", *rows));
  }
  SavedForward saved = std::move(it->second.saved);
  bytes_ -= saved.bytes();
  entries_.erase(it);
  return saved;
}

int TrainingStateStore::Expire(absl::Time now) {
  absl::MutexLock lock(&mu_);
  return ExpireLocked(now);
}

int64_t TrainingStateStore::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

size_t TrainingStateStore::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

size_t TrainingStateStore::CountFor(ExpertKey expert, absl::Time now) const {
  absl::MutexLock lock(&mu_);
  size_t count = 0;
  for (const auto& [key, entry] : entries_) {
    if (key.second == expert && entry.expiry > now) ++count;
  }
  return count;
}

}  // namespace moe::expert
