// A fixed set of threads running queued work: where the services compute,
// so gRPC threads only parse, validate and enqueue. The queue is bounded:
// Submit refuses work beyond it (the caller answers RESOURCE_EXHAUSTED)
// instead of queueing without limit. Thread-safe.
#ifndef MOE_COMMON_COMPUTE_POOL_H_
#define MOE_COMMON_COMPUTE_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace moe {

class ComputePool {
 public:
  // `on_thread_start` runs first on every worker (e.g. to size oneDNN's
  // per-thread OpenMP pool). REQUIRES: num_threads >= 1, max_queued >= 1.
  ComputePool(int num_threads, size_t max_queued,
              std::function<void()> on_thread_start = nullptr);
  // Runs everything already queued, then joins the threads.
  ~ComputePool();

  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  // Queues `work`; false (and `work` dropped unrun) when the queue is full
  // or the pool is stopping.
  [[nodiscard]] bool Submit(absl::AnyInvocable<void() &&> work) ABSL_LOCKS_EXCLUDED(mu_);

  size_t queued() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run(const std::function<void()>& on_thread_start);

  const size_t max_queued_;
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace moe

#endif  // MOE_COMMON_COMPUTE_POOL_H_
