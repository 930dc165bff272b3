// A bidirectional stream that answers each request once, in any order, from
// a compute pool (the expert server's Dispatch streams, the router's
// ForwardStream): the reactor only parses, enqueues and posts the next read
// (nothing blocks a gRPC thread), but for requests of a few microseconds'
// work (RunsHere), which it handles in place because the hand-off would
// cost more; compute threads push answers onto the
// stream's write queue, one write in flight at a time. A bad request fails
// itself in its answer, never the stream. On Drain() the stream stops
// reading, answers everything it has accepted, then finishes UNAVAILABLE so
// the client knows to go elsewhere: no accepted request is lost. A request
// may be cancelled by a later message on the stream until it starts.
// Bounds (stream_set.h): requests and bytes held per stream (then it reads
// no more until answers have gone out), bytes held by every stream of the
// service (then requests are refused with RESOURCE_EXHAUSTED).
// Thread-safe; deletes itself in OnDone.
#ifndef MOE_COMMON_STREAM_REACTOR_H_
#define MOE_COMMON_STREAM_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <deque>
#include <functional>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/compute_pool.h"
#include "common/grpc_status.h"
#include "common/stream_set.h"

namespace moe {

template <typename Request, typename Response>
class StreamReactor final : public grpc::ServerBidiReactor<Request, Response>,
                            public DrainableStream {
 public:
  // Delivers the answer to a request; call exactly once, from any thread.
  using Reply = absl::AnyInvocable<void(std::unique_ptr<Response>) &&>;
  // True once the client has cancelled the request (a cancel message on the
  // stream), for work that can stop part-way; callable until the reply.
  using Cancelled = std::function<bool()>;
  // Computes the answer to one request; runs on a pool thread and may hand
  // the work on (to a batcher) and reply later.
  using Handler =
      std::function<void(std::unique_ptr<Request>, std::unique_ptr<Response>, Reply, Cancelled)>;
  // Observes each request on arrival and each answer before it is written
  // (metrics).
  using OnReceive = std::function<void(const Request&)>;
  using OnSend = std::function<void(const Response&)>;
  // Copies the request's tag (sequence_id, client_id) into an answer and
  // sets its error: used when the pool refuses the request.
  using Refuse = std::function<void(const Request&, const absl::Status&, Response*)>;

  // Optional: a request's tag, and which tag a message cancels (nullopt:
  // not a cancel). A cancelled request that has not started is refused with
  // CANCELLED instead of handled; one that has started sees Cancelled()
  // turn true. A cancel message is not answered.
  using TagOf = std::function<uint64_t(const Request&)>;
  using CancelTarget = std::function<std::optional<uint64_t>(const Request&)>;
  // Optional: whether a request is small enough to handle on the gRPC
  // thread that read it instead of a pool thread (the hand-off would cost
  // more than its work); the next read is posted after it.
  using RunsHere = std::function<bool(const Request&)>;

  // `streams` registers the stream and bounds it (a client that sends and
  // never reads holds at most its stream's bounds here, not an unbounded
  // queue); it must outlive the stream.
  StreamReactor(StreamSet& streams, ComputePool& pool, Handler handler, OnReceive on_receive,
                OnSend on_send, Refuse refuse, TagOf tag_of = nullptr,
                CancelTarget cancel_target = nullptr, RunsHere runs_here = nullptr)
      : streams_(streams),
        pool_(pool),
        bounds_(streams.bounds()),
        handler_(std::move(handler)),
        on_receive_(std::move(on_receive)),
        on_send_(std::move(on_send)),
        refuse_(std::move(refuse)),
        tag_of_(std::move(tag_of)),
        cancel_target_(std::move(cancel_target)),
        runs_here_(std::move(runs_here)) {
    if (absl::Status registered = streams_.Register(this); !registered.ok()) {
      absl::MutexLock lock(&mu_);
      draining_ = true;
      finished_ = true;
      registered_ = false;
      this->Finish(ToGrpcStatus(registered));
      return;
    }
    this->StartRead(&request_);
  }

  void Drain() override {
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      draining_ = true;
      finish = ShouldFinishLocked();
    }
    if (finish) FinishStream();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      bool finish = false;
      {
        absl::MutexLock lock(&mu_);
        reads_done_ = true;
        finish = ShouldFinishLocked();
      }
      if (finish) FinishStream();
      return;
    }
    if (cancel_target_ && tag_of_) {
      if (const std::optional<uint64_t> target = cancel_target_(request_)) {
        {
          absl::MutexLock lock(&mu_);
          if (finished_) return;
          if (queued_.contains(*target) || started_.contains(*target)) {
            cancelled_.insert(*target);
          }
        }
        request_.Clear();
        ReadNext();
        return;
      }
    }
    {
      absl::MutexLock lock(&mu_);
      // A read that completes after a drain finished the stream was never
      // accepted: the client sees the stream end and re-sends it elsewhere.
      if (finished_) return;
      ++pending_;
    }
    auto request = std::make_unique<Request>(std::move(request_));
    request_.Clear();
    on_receive_(*request);
    const int64_t bytes = static_cast<int64_t>(request->ByteSizeLong());
    if (!streams_.TryReserve(bytes)) {
      auto refusal = std::make_unique<Response>();
      refuse_(*request,
              absl::ResourceExhaustedError(
                  absl::StrCat("server holds ", streams_.buffered_bytes() >> 20,
                               " MiB of requests, its limit; retry, or go elsewhere")),
              refusal.get());
      Answer(std::move(refusal), 0);
      ReadNext();
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      held_bytes_ += bytes;
    }
    const uint64_t tag = tag_of_ ? tag_of_(*request) : 0;
    if (tag_of_) {
      absl::MutexLock lock(&mu_);
      queued_.insert(tag);
    }
    // Prepared now: if the pool refuses, the request goes with the closure.
    auto refusal = std::make_unique<Response>();
    refuse_(*request,
            absl::ResourceExhaustedError("compute queue is full; retry, or go elsewhere"),
            refusal.get());
    const bool here = runs_here_ && runs_here_(*request);
    auto work = [this, tag, bytes, request = std::move(request)]() mutable {
      if (TakeQueued(tag)) {
        auto cancelled = std::make_unique<Response>();
        refuse_(*request, absl::CancelledError("cancelled by the client before it ran"),
                cancelled.get());
        Answer(std::move(cancelled), bytes);
        return;
      }
      handler_(
          std::move(request), std::make_unique<Response>(),
          [this, bytes, tag](std::unique_ptr<Response> response) {
            Forget(tag);
            Answer(std::move(response), bytes);
          },
          [this, tag] {
            if (!tag_of_) return false;
            absl::MutexLock lock(&mu_);
            return cancelled_.contains(tag);
          });
    };
    if (here) {
      std::move(work)();
    } else if (!pool_.Submit(std::move(work))) {
      TakeQueued(tag);
      Forget(tag);
      Answer(std::move(refusal), bytes);
    }
    ReadNext();
  }

  void OnWriteDone(bool ok) override {
    Response* next = nullptr;
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      ReleaseLocked(queue_.front().bytes);
      queue_.pop_front();
      if (read_paused_ && !draining_ && !finished_ && HasRoomLocked()) {
        // Room again: read on (under mu_, as in ReadNext).
        read_paused_ = false;
        this->StartRead(&request_);
      }
      if (!queue_.empty()) {
        next = queue_.front().response.get();
      } else {
        writing_ = false;
        finish = ShouldFinishLocked();
      }
    }
    (void)ok;  // a failed write means the client is gone; reads end too
    if (next != nullptr) this->StartWrite(next);
    if (finish) FinishStream();
  }

  void OnDone() override {
    {
      // Answers never written (the client went away) give their bytes back.
      absl::MutexLock lock(&mu_);
      for (const Answered& answer : queue_) ReleaseLocked(answer.bytes);
      queue_.clear();
    }
    if (registered_) streams_.Unregister(this);
    Unref();
  }

 private:
  // Posts the next read, or finishes a draining stream.
  void ReadNext() {
    bool finish = false;
    {
      // StartRead under mu_: a concurrent Drain() must see either no read
      // posted or the read posted, never finish in between.
      absl::MutexLock lock(&mu_);
      if (draining_) {
        finish = ShouldFinishLocked();
      } else if (!HasRoomLocked()) {
        read_paused_ = true;  // OnWriteDone reads on
      } else {
        this->StartRead(&request_);
      }
    }
    if (finish) FinishStream();
  }

  // The request `tag` leaves the queue (it starts, or was refused); true if
  // it was cancelled meanwhile (then it does not start).
  bool TakeQueued(uint64_t tag) {
    if (!tag_of_) return false;
    absl::MutexLock lock(&mu_);
    queued_.erase(tag);
    if (cancelled_.erase(tag) > 0) return true;
    started_.insert(tag);
    return false;
  }

  // The started request `tag` has its answer.
  void Forget(uint64_t tag) {
    if (!tag_of_) return;
    absl::MutexLock lock(&mu_);
    started_.erase(tag);
    cancelled_.erase(tag);
  }

  // Queues an answer to a request that held `bytes`; starts writing if no
  // write is in flight.
  void Answer(std::unique_ptr<Response> response, int64_t bytes) {
    on_send_(*response);
    Response* start = nullptr;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      queue_.push_back({std::move(response), bytes});
      if (!writing_) {
        writing_ = true;
        start = queue_.front().response.get();
      }
    }
    if (start != nullptr) this->StartWrite(start);
  }

  // Whether the stream may accept another request: fewer than the bounds
  // accepted and not yet written back.
  bool HasRoomLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_ + static_cast<int>(queue_.size()) < bounds_.max_outstanding &&
           held_bytes_ < bounds_.max_stream_bytes;
  }

  void ReleaseLocked(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    held_bytes_ -= bytes;
    streams_.Release(bytes);
  }

  // Whether everything accepted has been answered and no more will come.
  bool ShouldFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || !(reads_done_ || draining_) || pending_ > 0 || writing_ ||
        !queue_.empty()) {
      return false;
    }
    finished_ = true;
    return true;
  }

  void FinishStream() {
    bool draining;
    {
      absl::MutexLock lock(&mu_);
      draining = draining_ && !reads_done_;
    }
    this->Finish(draining ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                         "server is draining; every accepted request "
                                         "was answered")
                          : grpc::Status::OK);
  }

  struct Answered {
    std::unique_ptr<Response> response;
    int64_t bytes;  // of its request, held until written
  };

  StreamSet& streams_;
  ComputePool& pool_;
  const StreamBounds bounds_;
  const Handler handler_;
  const OnReceive on_receive_;
  const OnSend on_send_;
  const Refuse refuse_;
  const TagOf tag_of_;
  const CancelTarget cancel_target_;
  const RunsHere runs_here_;
  bool registered_ = true;
  Request request_;  // the read in flight

  absl::Mutex mu_;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<Answered> queue_ ABSL_GUARDED_BY(mu_);
  int64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // No read is posted: a bound was reached.
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // Tags accepted and not yet started, started and not yet answered, and
  // those of either cancelled.
  absl::flat_hash_set<uint64_t> queued_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> started_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COMMON_STREAM_REACTOR_H_
