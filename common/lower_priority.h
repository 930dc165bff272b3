// Background work that must not take CPU from serving: weight pulls of a
// placement change, checkpoint writes. Thread-safe.
#ifndef MOE_COMMON_LOWER_PRIORITY_H_
#define MOE_COMMON_LOWER_PRIORITY_H_

#include "absl/functional/function_ref.h"

namespace moe {

// Runs `work` on a thread of its own at a lower CPU priority (nice 10),
// so that it yields to serving on a busy machine, and waits for it. A
// thread of its own: an unprivileged thread cannot raise its priority back.
void AtLowerPriority(absl::FunctionRef<void()> work);

// Lowers the calling thread's CPU priority (nice 10) for good, best effort:
// for a thread of its own that does background work.
void LowerThisThreadsPriority();

}  // namespace moe

#endif  // MOE_COMMON_LOWER_PRIORITY_H_
