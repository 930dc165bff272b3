// A persistent client bidi stream whose requests are answered by sequence
// id: the router's Dispatch streams and the ring all-reduce links use it.
#ifndef MOE_COMMON_CLIENT_STREAM_SESSION_H_
#define MOE_COMMON_CLIENT_STREAM_SESSION_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_callback.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/transport_credentials.h"

namespace moe {

// A channel to a peer that finds a dead or stopped peer within seconds even
// when idle (keepalive pings every 2 s), and reconnects with the given
// back-off.
inline std::shared_ptr<grpc::Channel> KeepaliveChannel(const std::string& address,
                                                       const TransportCredentials& credentials,
                                                       int max_message_bytes,
                                                       absl::Duration min_backoff,
                                                       absl::Duration max_backoff) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 2000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 2000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(min_backoff)));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(max_backoff)));
  return grpc::CreateCustomChannel(address, credentials.ForChannel(), args);
}

// One persistent client bidi stream to one server, shared by many calls:
// each request is answered by the response with its sequence_id. The live
// stream, if any, and the back-off after failures. A stream that breaks fails
// its pending calls with UNAVAILABLE naming the session; the next Send after
// the back-off opens a new one. Thread-safe.
template <typename Request, typename Response>
class ClientStreamSession {
 public:
  using Done = absl::AnyInvocable<void(absl::StatusOr<std::unique_ptr<Response>>) &&>;
  using Start =
      std::function<void(grpc::ClientContext*, grpc::ClientBidiReactor<Request, Response>*)>;

  ClientStreamSession(std::string name, Start start, absl::Duration min_backoff,
                absl::Duration max_backoff)
      : name_(std::move(name)),
        start_(std::move(start)),
        min_backoff_(min_backoff),
        max_backoff_(max_backoff),
        backoff_(min_backoff) {}

  ~ClientStreamSession() {
    std::shared_ptr<Stream> live;
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      live = std::move(live_);
    }
    if (live != nullptr) live->Close();
    // Wait until every stream reported OnDone (they reference this session).
    absl::MutexLock lock(&mu_);
    auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_streams_ == 0; };
    mu_.Await(absl::Condition(&none));
  }

  // `request` must stay valid until `done` runs.
  void Send(const Request& request, Done done) {
    std::shared_ptr<Stream> stream = LiveStream();
    if (stream == nullptr) {
      std::move(done)(absl::UnavailableError(
          absl::StrCat(name_, ": not connected (reconnecting after a failure)")));
      return;
    }
    stream->Send(request, std::move(done));
  }

  // Writes `request` with no answer expected (a cancel); dropped when the
  // stream is down.
  void SendOneWay(std::unique_ptr<Request> request) {
    std::shared_ptr<Stream> stream;
    {
      absl::MutexLock lock(&mu_);
      stream = live_;
    }
    if (stream != nullptr) stream->SendOneWay(std::move(request));
  }

  // Up, or due for another attempt.
  bool healthy() const {
    absl::MutexLock lock(&mu_);
    return live_ != nullptr || absl::Now() >= retry_at_;
  }

  int64_t opened() const {
    absl::MutexLock lock(&mu_);
    return opened_;
  }

  // Opens the stream now (at start), instead of on the first call.
  void Connect() { (void)LiveStream(); }

  // Ends a back-off: the next Send tries to open a stream.
  void RetryNow() {
    absl::MutexLock lock(&mu_);
    retry_at_ = absl::InfinitePast();
  }

 private:
  class Stream : public grpc::ClientBidiReactor<Request, Response> {
   public:
    struct Outgoing {
      const Request* request;
      std::unique_ptr<Request> owned;  // one-way messages only
    };

    explicit Stream(ClientStreamSession* session) : session_(session) {}

    void Begin(std::shared_ptr<Stream> self) {
      self_ = std::move(self);
      session_->start_(&context_, this);
      this->StartRead(&response_);
      // Held until Close(): writes start from outside reactions.
      this->AddHold();
      {
        // Other threads may have queued writes since the stream was
        // published: gRPC 1.51's reactor has no backlog, and its stream
        // pointer is unset until start_ binds it, so writes start only now.
        absl::MutexLock lock(&mu_);
        bound_ = true;
        if (!queue_.empty() && !writing_) {
          writing_ = true;
          this->StartWrite(queue_.front().request);
        }
      }
      this->StartCall();
    }

    void Send(const Request& request, Done done) {
      bool duplicate = false;
      {
        absl::MutexLock lock(&mu_);
        // Once the hold is released the call may finish at any moment: no
        // new operation may start on it.
        if (!dead_ && !hold_released_) {
          if (pending_.contains(request.sequence_id())) {
            // Answers are matched by sequence id: a second request with
            // the same one would never get its own.
            duplicate = true;
          } else {
            pending_.emplace(request.sequence_id(), std::move(done));
            EnqueueLocked({&request, nullptr});
            return;
          }
        }
      }
      if (duplicate) {
        std::move(done)(absl::InternalError(absl::StrCat(
            session_->name_, ": sequence id ", request.sequence_id(), " is already in flight")));
        return;
      }
      std::move(done)(absl::UnavailableError(absl::StrCat(session_->name_, ": stream closed")));
    }

    void SendOneWay(std::unique_ptr<Request> request) {
      absl::MutexLock lock(&mu_);
      if (dead_ || hold_released_) return;
      const Request* raw = request.get();
      EnqueueLocked({raw, std::move(request)});
    }

    void EnqueueLocked(Outgoing outgoing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      const Request* request = outgoing.request;
      queue_.push_back(std::move(outgoing));
      if (!writing_ && bound_) {
        writing_ = true;
        // Under mu_, so ReleaseHold() cannot slip in between the check and
        // the start (gRPC never runs a reaction inline here).
        this->StartWrite(request);
      }
    }

    // Ends the stream (at shutdown).
    void Close() {
      context_.TryCancel();
      ReleaseHold();
    }

    void OnWriteDone(bool ok) override {
      const Request* next = nullptr;
      {
        absl::MutexLock lock(&mu_);
        queue_.pop_front();
        if (ok && !queue_.empty()) {
          next = queue_.front().request;
        } else {
          writing_ = false;
          if (!ok) queue_.clear();  // the stream is failing; OnDone fails them
        }
      }
      if (next != nullptr) this->StartWrite(next);
    }

    void OnReadDone(bool ok) override {
      if (!ok) {
        // The stream ended, or an answer could not be read (gRPC fails the
        // read and leaves the call open): end it, let OnDone come, and fail
        // what is pending there.
        context_.TryCancel();
        ReleaseHold();
        return;
      }
      Done done;
      {
        absl::MutexLock lock(&mu_);
        auto it = pending_.find(response_.sequence_id());
        if (it != pending_.end()) {
          done = std::move(it->second);
          pending_.erase(it);
        }
      }
      session_->MarkWorking();
      if (done) {
        std::move(done)(std::make_unique<Response>(std::move(response_)));
      } else {
        MOE_LOG(WARNING, session_->name_, ": answer for unknown sequence id ",
                response_.sequence_id());
      }
      response_.Clear();
      this->StartRead(&response_);
    }

    void OnDone(const grpc::Status& status) override {
      absl::flat_hash_map<uint64_t, Done> pending;
      {
        absl::MutexLock lock(&mu_);
        dead_ = true;
        pending.swap(pending_);
        queue_.clear();
      }
      const absl::Status failure = absl::UnavailableError(absl::StrCat(
          session_->name_, ": stream ended: ",
          status.ok() ? "closed by the server" : status.error_message()));
      for (auto& [sequence, done] : pending) std::move(done)(failure);
      ClientStreamSession* session = session_;
      std::shared_ptr<Stream> self = std::move(self_);
      session->Detach(this, status);
      // `self` may be the last reference: this object dies here.
    }

   private:
    // The hold taken in Begin() keeps OnDone away while other threads may
    // still start writes; released once, when the stream has ended or is
    // being closed.
    void ReleaseHold() {
      {
        absl::MutexLock lock(&mu_);
        if (hold_released_) return;
        hold_released_ = true;
      }
      this->RemoveHold();
    }

    ClientStreamSession* const session_;
    grpc::ClientContext context_;
    Response response_;
    std::shared_ptr<Stream> self_;  // alive until OnDone
    absl::Mutex mu_;
    absl::flat_hash_map<uint64_t, Done> pending_ ABSL_GUARDED_BY(mu_);
    // Writes in order; one-way messages are owned here until written.
    std::deque<Outgoing> queue_ ABSL_GUARDED_BY(mu_);
    bool writing_ ABSL_GUARDED_BY(mu_) = false;
    // start_ has bound this reactor to its call (Begin).
    bool bound_ ABSL_GUARDED_BY(mu_) = false;
    bool dead_ ABSL_GUARDED_BY(mu_) = false;
    bool hold_released_ ABSL_GUARDED_BY(mu_) = false;
  };

  std::shared_ptr<Stream> LiveStream() {
    std::shared_ptr<Stream> stream;
    {
      absl::MutexLock lock(&mu_);
      if (live_ != nullptr || closing_) return live_;
      if (absl::Now() < retry_at_) return nullptr;
      live_ = std::make_shared<Stream>(this);
      stream = live_;
      ++open_streams_;
      ++opened_;
    }
    stream->Begin(stream);
    return stream;
  }

  void MarkWorking() {
    absl::MutexLock lock(&mu_);
    backoff_ = min_backoff_;
  }

  void Detach(Stream* stream, const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    if (live_.get() == stream) live_.reset();
    --open_streams_;
    if (!closing_) {
      retry_at_ = absl::Now() + backoff_;
      MOE_LOG(WARNING, name_, ": stream failed (", status.error_message(),
              "); next attempt in ", absl::FormatDuration(backoff_));
      backoff_ = std::min(backoff_ * 2, max_backoff_);
    }
  }

  const std::string name_;
  const Start start_;
  const absl::Duration min_backoff_;
  const absl::Duration max_backoff_;
  mutable absl::Mutex mu_;
  std::shared_ptr<Stream> live_ ABSL_GUARDED_BY(mu_);
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_);
  absl::Time retry_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int open_streams_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t opened_ ABSL_GUARDED_BY(mu_) = 0;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace moe

#endif  // MOE_COMMON_CLIENT_STREAM_SESSION_H_
