// Runs callbacks at deadlines on one background thread: how a server stops
// waiting for a call whose deadline has passed, without a thread per call.
// Callbacks must be short and must not block. Thread-safe.
#ifndef MOE_COMMON_DEADLINE_TIMER_H_
#define MOE_COMMON_DEADLINE_TIMER_H_

#include <cstdint>
#include <map>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace moe {

class DeadlineTimer {
 public:
  DeadlineTimer();
  // Drops what has not fired (Stop).
  ~DeadlineTimer();

  // Runs nothing more: drops what has not fired and waits for a callback
  // that is running. Before what the callbacks use goes away.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  // Runs `callback` at `deadline` (at once if it has passed) unless
  // cancelled first. Returns an id for Cancel.
  uint64_t Schedule(absl::Time deadline, absl::AnyInvocable<void() &&> callback)
      ABSL_LOCKS_EXCLUDED(mu_);
  // True if the callback will not run (it had not started).
  bool Cancel(uint64_t id) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop();

  absl::Mutex mu_;
  std::map<std::pair<absl::Time, uint64_t>, absl::AnyInvocable<void() &&>> pending_
      ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, absl::Time> deadline_of_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace moe

#endif  // MOE_COMMON_DEADLINE_TIMER_H_
