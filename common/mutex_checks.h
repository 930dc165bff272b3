// Abseil's debug-only mutex checks, off in our binaries.
#ifndef MOE_COMMON_MUTEX_CHECKS_H_
#define MOE_COMMON_MUTEX_CHECKS_H_

namespace moe {

// Debian's Abseil is built without NDEBUG, so every absl::Mutex lock (ours
// and gRPC's, whose mutex is Abseil's) also updates the deadlock detector's
// graph of lock orders, under one global lock: 1.3% of the router's CPU at
// batch 1. A release build of Abseil skips it; our binaries turn it off
// first thing in main(), tests keep it.
void SkipMutexDeadlockDetection();

}  // namespace moe

#endif  // MOE_COMMON_MUTEX_CHECKS_H_
