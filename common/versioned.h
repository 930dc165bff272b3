// One owner for a piece of state that changes as a whole (the placement,
// the gate): readers take an immutable snapshot, with its version, and keep
// it for as long as they use it (a request uses the snapshot it started
// with, even if a newer one is installed meanwhile); a writer installs a
// whole new value with a higher version, atomically. Thread-safe.
#ifndef MOE_COMMON_VERSIONED_H_
#define MOE_COMMON_VERSIONED_H_

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace moe {

template <typename T>
struct VersionedSnapshot {
  uint64_t version = 0;
  T value;
};

template <typename T>
class Versioned {
 public:
  using Snapshot = std::shared_ptr<const VersionedSnapshot<T>>;

  Versioned(T initial, uint64_t version)
      : current_(std::make_shared<const VersionedSnapshot<T>>(
            VersionedSnapshot<T>{version, std::move(initial)})) {}

  Snapshot Get() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return current_;
  }
  uint64_t version() const ABSL_LOCKS_EXCLUDED(mu_) { return Get()->version; }

  // Installs `next` as version current + 1.
  Snapshot Install(T next) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    current_ = std::make_shared<const VersionedSnapshot<T>>(
        VersionedSnapshot<T>{current_->version + 1, std::move(next)});
    return current_;
  }

  // Installs `next` as `version`, only if the current version is
  // `expected` and `version` is higher: FAILED_PRECONDITION naming both
  // versions otherwise (another writer got there first).
  absl::StatusOr<Snapshot> InstallIf(uint64_t expected, T next, uint64_t version)
      ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (current_->version != expected || version <= expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          "version ", version, " over ", expected, ": the current version is ",
          current_->version));
    }
    current_ = std::make_shared<const VersionedSnapshot<T>>(
        VersionedSnapshot<T>{version, std::move(next)});
    return current_;
  }

 private:
  mutable absl::Mutex mu_;
  Snapshot current_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COMMON_VERSIONED_H_
