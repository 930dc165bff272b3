#include "common/stream_set.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace moe {

absl::Status StreamSet::Register(DrainableStream* stream) {
  int count;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("server is draining; use another replica");
    if (static_cast<int>(streams_.size()) >= bounds_.max_streams) {
      return absl::ResourceExhaustedError(
          absl::StrCat("server has ", streams_.size(), " streams open, its limit; retry later"));
    }
    streams_.insert(stream);
    count = static_cast<int>(streams_.size());
  }
  if (on_count_) on_count_(count);
  return absl::OkStatus();
}

void StreamSet::Unregister(DrainableStream* stream) {
  int count;
  {
    absl::MutexLock lock(&mu_);
    streams_.erase(stream);
    count = static_cast<int>(streams_.size());
  }
  if (on_count_) on_count_(count);
}

bool StreamSet::TryReserve(int64_t bytes) {
  int64_t held = buffered_.load(std::memory_order_relaxed);
  do {
    // At least one request always fits, however large: the bound is on
    // what accumulates, and a message is already bounded by gRPC's size.
    if (held > 0 && held + bytes > bounds_.max_buffered_bytes) return false;
  } while (!buffered_.compare_exchange_weak(held, held + bytes, std::memory_order_relaxed));
  return true;
}

void StreamSet::Release(int64_t bytes) { buffered_.fetch_sub(bytes, std::memory_order_relaxed); }

void StreamSet::BeginDrain() {
  std::vector<DrainableStream*> streams;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    for (DrainableStream* stream : streams_) {
      stream->Ref();  // keeps it alive if it finishes before Drain() returns
      streams.push_back(stream);
    }
  }
  // Outside mu_: Drain() may finish the stream, and its OnDone unregisters.
  for (DrainableStream* stream : streams) {
    stream->Drain();
    stream->Unref();
  }
}

bool StreamSet::WaitForStreams(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return streams_.empty(); };
  return mu_.AwaitWithDeadline(absl::Condition(&none), deadline);
}

int StreamSet::open_streams() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(streams_.size());
}

}  // namespace moe
