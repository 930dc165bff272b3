#include "common/compute_pool.h"

#include "common/log.h"

namespace moe {

ComputePool::ComputePool(int num_threads, size_t max_queued,
                         std::function<void()> on_thread_start)
    : max_queued_(max_queued) {
  MOE_CHECK(num_threads >= 1 && max_queued >= 1);
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) {
    threads_.emplace_back([this, on_thread_start] { Run(on_thread_start); });
  }
}

ComputePool::~ComputePool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

bool ComputePool::Submit(absl::AnyInvocable<void() &&> work) {
  absl::MutexLock lock(&mu_);
  if (stopping_ || queue_.size() >= max_queued_) return false;
  queue_.push_back(std::move(work));
  return true;
}

size_t ComputePool::queued() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

void ComputePool::Run(const std::function<void()>& on_thread_start) {
  if (on_thread_start) on_thread_start();
  while (true) {
    absl::AnyInvocable<void() &&> work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and everything has run
      work = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(work)();
  }
}

}  // namespace moe
