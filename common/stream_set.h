// The open streams of one service and the bounds they share: how many may
// be open, how much one may hold, how much all together may hold. Used by
// StreamReactor (stream_reactor.h) and by the services to drain.
//
// What a stream holds is the bytes of the requests it has accepted and not
// yet answered (an answer is about as large as its request). Past a
// stream's own bound it stops reading (HTTP/2 flow control pushes back on
// that client alone); past the service's bound new requests are refused
// with RESOURCE_EXHAUSTED. So a client that sends and never reads holds at
// most its stream's bound, and memory stays within the service's.
// Thread-safe.
#ifndef MOE_COMMON_STREAM_SET_H_
#define MOE_COMMON_STREAM_SET_H_

#include <atomic>
#include <cstdint>
#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace moe {

struct StreamBounds {
  // Streams open at once.
  int max_streams = 1024;
  // Requests one stream has accepted and not yet answered.
  int max_outstanding = 1024;
  // Request bytes one stream holds before it reads no more.
  int64_t max_stream_bytes = int64_t{64} << 20;
  // Request bytes every stream together holds before new ones are refused.
  int64_t max_buffered_bytes = int64_t{512} << 20;
};

// A stream the set can drain. Reference counted: gRPC holds one reference
// until OnDone, and the set takes one while it calls Drain() outside its
// lock (a stream may finish, and gRPC run OnDone, at any moment).
class DrainableStream {
 public:
  virtual ~DrainableStream() = default;
  virtual void Drain() = 0;

  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

 private:
  std::atomic<int> refs_{1};
};

class StreamSet {
 public:
  // `on_count` hears the number of open streams after each change (a gauge).
  explicit StreamSet(StreamBounds bounds = {}, std::function<void(int)> on_count = nullptr)
      : bounds_(bounds), on_count_(std::move(on_count)) {}

  const StreamBounds& bounds() const { return bounds_; }

  // UNAVAILABLE while draining, RESOURCE_EXHAUSTED at max_streams: the
  // stream must then finish at once.
  absl::Status Register(DrainableStream* stream) ABSL_LOCKS_EXCLUDED(mu_);
  void Unregister(DrainableStream* stream) ABSL_LOCKS_EXCLUDED(mu_);

  // Takes `bytes` of the shared budget; false (nothing taken) past it.
  bool TryReserve(int64_t bytes);
  void Release(int64_t bytes);
  int64_t buffered_bytes() const { return buffered_.load(std::memory_order_relaxed); }

  // New streams are refused; open ones drain (answer what they accepted,
  // then finish UNAVAILABLE). Returns at once.
  void BeginDrain() ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until no stream is open or `deadline` passes; true if none is.
  bool WaitForStreams(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  int open_streams() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const StreamBounds bounds_;
  const std::function<void(int)> on_count_;
  std::atomic<int64_t> buffered_{0};
  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<DrainableStream*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COMMON_STREAM_SET_H_
