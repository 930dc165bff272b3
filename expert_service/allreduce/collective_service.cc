#include "expert_service/allreduce/collective_service.h"

#include <deque>
#include <vector>

#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/server_callback.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/proto_status.h"

namespace moe::allreduce {
namespace {

class RingReactor final : public grpc::ServerBidiReactor<ReceivedSegment, v1::RingAck> {
 public:
  RingReactor(CollectiveRegistry* registry, std::string peer)
      : registry_(registry), peer_(std::move(peer)) {
    StartRead(&segment_);
  }

  // gRPC may run a reaction inline from a Start*() call: no Start*() or
  // Finish() is called with mu_ held.
  void OnReadDone(bool ok) override {
    if (!ok) {
      std::vector<uint64_t> groups;
      bool finish = false;
      {
        absl::MutexLock lock(&mu_);
        groups.assign(groups_.begin(), groups_.end());
        reads_over_ = true;
        finish = !writing_ && TakeFinish();
      }
      registry_->PredecessorLost(groups,
                                 absl::UnavailableError(absl::StrCat("stream from ", peer_,
                                                                     " ended")));
      if (finish) Finish(grpc::Status::OK);
      return;
    }
    if (!segment_.wire_status().ok()) {
      // Not a segment: the stream ends with why, and the collectives it fed
      // fail now rather than at their deadline.
      const grpc::Status refused(segment_.wire_status().error_code(),
                                 absl::StrCat("ring segment from ", peer_, ": ",
                                              segment_.wire_status().error_message()));
      std::vector<uint64_t> groups;
      bool finish = false;
      {
        absl::MutexLock lock(&mu_);
        groups.assign(groups_.begin(), groups_.end());
        reads_over_ = true;
        end_status_ = refused;
        finish = !writing_ && TakeFinish();
      }
      registry_->PredecessorLost(groups, absl::InvalidArgumentError(refused.error_message()));
      if (finish) Finish(refused);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      groups_.insert(segment_.header().group_id);
    }
    // The verdict may come later, on another thread (a parked segment).
    registry_->Deliver(&segment_, [this](absl::Status verdict) { OnVerdict(verdict); });
  }

  void OnWriteDone(bool ok) override {
    const v1::RingAck* next = nullptr;
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      acks_.pop_front();
      if (ok && !acks_.empty()) {
        next = &acks_.front();  // a deque keeps it in place while others are pushed
      } else {
        writing_ = false;
        if (!ok) acks_.clear();
        finish = reads_over_ && TakeFinish();
      }
    }
    if (next != nullptr) StartWrite(next);
    if (finish) Finish(end_status());
  }

  void OnDone() override { delete this; }

 private:
  void OnVerdict(const absl::Status& verdict) {
    const v1::RingChunk& chunk = segment_.wire_header();
    v1::RingAck ack;
    *ack.mutable_id() = chunk.id();
    ack.set_ring_step(chunk.ring_step());
    ack.set_chunk_index(chunk.chunk_index());
    ack.set_offset_elements(chunk.offset_elements());
    ack.set_sequence_id(chunk.sequence_id());
    if (!verdict.ok()) ToProtoStatus(verdict, ack.mutable_error());
    const v1::RingAck* write = nullptr;
    {
      absl::MutexLock lock(&mu_);
      acks_.push_back(std::move(ack));
      if (!writing_) {
        writing_ = true;
        write = &acks_.front();
      }
    }
    if (write != nullptr) StartWrite(write);
    // segment_ is free again. No read was outstanding, so the stream cannot
    // have finished meanwhile.
    StartRead(&segment_);
  }

  grpc::Status end_status() {
    absl::MutexLock lock(&mu_);
    return end_status_;
  }

  // True the first time: the caller then calls Finish().
  bool TakeFinish() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return false;
    finished_ = true;
    return true;
  }

  CollectiveRegistry* const registry_;
  const std::string peer_;
  ReceivedSegment segment_;
  absl::Mutex mu_;
  // std::deque: pushing does not move the ack being written.
  std::deque<v1::RingAck> acks_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> groups_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_over_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // OK, or why a message was refused.
  grpc::Status end_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

CollectiveService::CollectiveService(CollectiveRegistry* registry) : registry_(registry) {
  AddMethod(new grpc::internal::RpcServiceMethod(
      kRingMethod, grpc::internal::RpcMethod::BIDI_STREAMING, /*handler=*/nullptr));
  MarkMethodCallback(0, new grpc::internal::CallbackBidiHandler<ReceivedSegment, v1::RingAck>(
                            [this](grpc::CallbackServerContext* context) {
                              return new RingReactor(registry_, context->peer());
                            }));
}

}  // namespace moe::allreduce
