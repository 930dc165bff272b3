#include "common/mutex_checks.h"

#include "absl/synchronization/mutex.h"

namespace moe {

void SkipMutexDeadlockDetection() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace moe
