#include "expert_service/expert_service.h"

#include <atomic>
#include <memory>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "common/lower_priority.h"
#include "common/proto_status.h"
#include "common/stream_reactor.h"
#include "expert_service/weight_transfer.h"

namespace moe::expert {

ExpertServiceImpl::ExpertServiceImpl(ExpertDispatcher& dispatcher, ComputePool& pool,
                                     ComputePool* step_pool, StreamBounds bounds,
                                     PlacementKeeper* placement, LeaseTable* leases,
                                     std::function<void()> prepare_compute_thread)
    : dispatcher_(dispatcher),
      metrics_(dispatcher.metrics()),
      pool_(pool),
      step_pool_(step_pool),
      placement_(placement),
      leases_(leases),
      prepare_compute_thread_(std::move(prepare_compute_thread)),
      streams_(bounds, [gauge = metrics_.active_streams](int open) {
        gauge->Set(static_cast<double>(open));
      }) {
  MOE_CHECK(step_pool != nullptr || !dispatcher.runs_steps(),
            "PrepareStep blocks: it needs a step pool");
}

grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse>*
ExpertServiceImpl::Dispatch(grpc::CallbackServerContext* context) {
  return new StreamReactor<v1::DispatchRequest, v1::DispatchResponse>(
      streams_, pool_,
      [this](std::unique_ptr<v1::DispatchRequest> request,
             std::unique_ptr<v1::DispatchResponse> response, ExpertDispatcher::DispatchReply reply,
             std::function<bool()> cancelled) {
        dispatcher_.Dispatch(std::move(request), std::move(response), std::move(reply),
                             std::move(cancelled));
      },
      [this](const v1::DispatchRequest& request) {
        metrics_.inflight->Increment();
        metrics_.received_bytes->Increment(static_cast<double>(request.tokens().data().size()));
      },
      [this](const v1::DispatchResponse& response) {
        metrics_.inflight->Decrement();
        metrics_.sent_bytes->Increment(static_cast<double>(response.output().data().size()));
      },
      [](const v1::DispatchRequest& request, const absl::Status& status,
         v1::DispatchResponse* response) {
        response->set_sequence_id(request.sequence_id());
        ToProtoStatus(status, response->mutable_error());
      },
      [](const v1::DispatchRequest& request) { return request.sequence_id(); },
      [](const v1::DispatchRequest& request) -> std::optional<uint64_t> {
        if (!request.cancel()) return std::nullopt;
        return request.sequence_id();
      },
      [this](const v1::DispatchRequest& request) {
        if (!dispatcher_.RunsWhereReceived(request)) return false;
        if (prepare_compute_thread_) prepare_compute_thread_();
        return true;
      });
}

grpc::ServerBidiReactor<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>*
ExpertServiceImpl::BackwardDispatch(grpc::CallbackServerContext* context) {
  return new StreamReactor<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>(
      streams_, pool_,
      [this](std::unique_ptr<v1::BackwardDispatchRequest> request,
             std::unique_ptr<v1::BackwardDispatchResponse> response,
             absl::AnyInvocable<void(std::unique_ptr<v1::BackwardDispatchResponse>) &&> reply,
             std::function<bool()>) {
        dispatcher_.Backward(*request, response.get());
        std::move(reply)(std::move(response));
      },
      [this](const v1::BackwardDispatchRequest& request) {
        metrics_.inflight->Increment();
        metrics_.received_bytes->Increment(
            static_cast<double>(request.grad_output().data().size()));
      },
      [this](const v1::BackwardDispatchResponse& response) {
        metrics_.inflight->Decrement();
        metrics_.sent_bytes->Increment(
            static_cast<double>(response.grad_input().data().size()));
      },
      [](const v1::BackwardDispatchRequest& request, const absl::Status& status,
         v1::BackwardDispatchResponse* response) {
        response->set_sequence_id(request.sequence_id());
        ToProtoStatus(status, response->mutable_error());
      });
}

grpc::ServerUnaryReactor* ExpertServiceImpl::Info(grpc::CallbackServerContext* context,
                                                  const v1::InfoRequest* request,
                                                  v1::InfoResponse* response) {
  dispatcher_.Info(response);
  if (placement_ != nullptr) placement_->FillInfo(response);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<v1::ExpertWeightsChunk>* ExpertServiceImpl::GetExpertWeights(
    grpc::CallbackServerContext* context, const v1::GetExpertWeightsRequest* request) {
  // Writes the expert's chunks one at a time. Copying a large expert's
  // weights into chunks (and their digest) takes tens of milliseconds: done
  // on a thread of its own at a lower priority, not on the gRPC thread,
  // which also carries this server's Dispatch streams. At most
  // kMaxWeightTransfers at once.
  class Writer : public grpc::ServerWriteReactor<v1::ExpertWeightsChunk> {
   public:
    Writer(const ExpertDispatcher& dispatcher, const v1::GetExpertWeightsRequest& request,
           std::atomic<int>& transfers)
        : transfers_(transfers) {
      if (transfers_.fetch_add(1) >= kMaxWeightTransfers) {
        Finish(grpc::Status(
            grpc::StatusCode::RESOURCE_EXHAUSTED,
            absl::StrCat("weights transfer: ", kMaxWeightTransfers, " already under way here")));
        return;
      }
      std::thread([this, &dispatcher, request] {
        LowerThisThreadsPriority();
        absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> chunks =
            dispatcher.ExpertChunks(request);
        // The last use of `this` here: the reactor may end at once.
        if (!chunks.ok()) {
          Finish(ToGrpcStatus(chunks.status()));
          return;
        }
        chunks_ = *std::move(chunks);
        StartWrite(&chunks_[0]);
      }).detach();
    }
    void OnWriteDone(bool ok) override {
      if (!ok) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "weights transfer: reader gone"));
      } else if (++next_ < chunks_.size()) {
        StartWrite(&chunks_[next_]);
      } else {
        Finish(grpc::Status::OK);
      }
    }
    void OnDone() override {
      transfers_.fetch_sub(1);
      delete this;
    }

   private:
    std::atomic<int>& transfers_;
    std::vector<v1::ExpertWeightsChunk> chunks_;
    size_t next_ = 0;
  };

  return new Writer(dispatcher_, *request, weight_transfers_);
}

grpc::ServerReadReactor<v1::ExpertWeightsChunk>* ExpertServiceImpl::LoadExpertWeights(
    grpc::CallbackServerContext* context, v1::LoadExpertWeightsResponse* response) {
  // Reads every chunk, then installs the expert.
  class Reader : public grpc::ServerReadReactor<v1::ExpertWeightsChunk> {
   public:
    Reader(ExpertDispatcher& dispatcher, v1::LoadExpertWeightsResponse* response)
        : dispatcher_(dispatcher), response_(response), assembler_(dispatcher.model()) {
      StartRead(&chunk_);
    }
    void OnReadDone(bool ok) override {
      if (ok) {
        status_ = assembler_.Add(chunk_);
        if (status_.ok()) {
          StartRead(&chunk_);
          return;
        }
      } else {
        status_ = dispatcher_.InstallExpert(assembler_, response_);
      }
      Finish(ToGrpcStatus(status_));
    }
    void OnDone() override { delete this; }

   private:
    ExpertDispatcher& dispatcher_;
    v1::LoadExpertWeightsResponse* response_;
    ExpertAssembler assembler_;
    v1::ExpertWeightsChunk chunk_;
    absl::Status status_;
  };
  return new Reader(dispatcher_, response);
}

grpc::ServerUnaryReactor* ExpertServiceImpl::ReleaseExpert(
    grpc::CallbackServerContext* context, const v1::ReleaseExpertRequest* request,
    v1::ReleaseExpertResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(dispatcher_.ReleaseExpert(*request)));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::SaveExperts(grpc::CallbackServerContext* context,
                                                         const v1::SaveExpertsRequest* request,
                                                         v1::SaveExpertsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Disk writes, off the gRPC threads; on the step thread, so a save never
  // overlaps this server's step.
  RunStep(reactor, [this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(dispatcher_.SaveExperts(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::PrepareStep(grpc::CallbackServerContext* context,
                                                         const v1::PrepareStepRequest* request,
                                                         v1::PrepareStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time deadline = absl::FromChrono(context->deadline());
  RunStep(reactor, [this, reactor, request, response, deadline] {
    reactor->Finish(ToGrpcStatus(dispatcher_.PrepareStep(*request, deadline, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::UpdateStep(grpc::CallbackServerContext* context,
                                                        const v1::UpdateStepRequest* request,
                                                        v1::UpdateStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  RunStep(reactor, [this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(dispatcher_.UpdateStep(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::CommitStep(grpc::CallbackServerContext* context,
                                                        const v1::CommitStepRequest* request,
                                                        v1::CommitStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  RunStep(reactor, [this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(dispatcher_.CommitStep(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::AbortStep(grpc::CallbackServerContext* context,
                                                       const v1::AbortStepRequest* request,
                                                       v1::AbortStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(dispatcher_.AbortStep(*request)));
  return reactor;
}

absl::Status ExpertServiceImpl::CheckPlacementKeeper() const {
  if (placement_ != nullptr && step_pool_ != nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError("this server changes no placement");
}

grpc::ServerUnaryReactor* ExpertServiceImpl::PreparePlacement(
    grpc::CallbackServerContext* context, const v1::PreparePlacementRequest* request,
    v1::PreparePlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status ok = CheckPlacementKeeper(); !ok.ok()) {
    reactor->Finish(ToGrpcStatus(ok));
    return reactor;
  }
  // Pulls weights for seconds: on the step thread, which also orders it
  // with this server's steps.
  RunStep(reactor, [this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(placement_->Prepare(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::CommitPlacement(
    grpc::CallbackServerContext* context, const v1::CommitPlacementRequest* request,
    v1::CommitPlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status ok = CheckPlacementKeeper(); !ok.ok()) {
    reactor->Finish(ToGrpcStatus(ok));
    return reactor;
  }
  // Releasing an expert waits for its calls in flight.
  RunStep(reactor, [this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(placement_->Commit(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::AbortPlacement(
    grpc::CallbackServerContext* context, const v1::AbortPlacementRequest* request,
    v1::AbortPlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // At once, not behind a Prepare that pulls (it marks that one aborted).
  absl::Status status = CheckPlacementKeeper();
  if (status.ok()) status = placement_->Abort(*request);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::GetGate(grpc::CallbackServerContext* context,
                                                     const v1::GetGateRequest* request,
                                                     v1::GetGateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(dispatcher_.GetGate(response)));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::AddGateGradient(
    grpc::CallbackServerContext* context, const v1::AddGateGradientRequest* request,
    v1::AddGateGradientResponse*) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(dispatcher_.AddGateGradient(*request)));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::AcquireLease(grpc::CallbackServerContext* context,
                                                          const v1::AcquireLeaseRequest* request,
                                                          v1::AcquireLeaseResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (leases_ == nullptr) {
    reactor->Finish(ToGrpcStatus(absl::FailedPreconditionError("this server keeps no leases")));
    return reactor;
  }
  absl::StatusOr<v1::AcquireLeaseResponse> answer =
      AnswerLeaseRequest(*leases_, *request, absl::Now());
  if (answer.ok()) *response = *std::move(answer);
  reactor->Finish(ToGrpcStatus(answer.status()));
  return reactor;
}

void ExpertServiceImpl::RunStep(grpc::ServerUnaryReactor* reactor,
                                absl::AnyInvocable<void() &&> work) {
  if (step_pool_ == nullptr) {
    std::move(work)();  // no steps here: the dispatcher refuses at once
  } else if (!step_pool_->Submit(std::move(work))) {
    reactor->Finish(ToGrpcStatus(absl::ResourceExhaustedError("step queue full")));
  }
}

}  // namespace moe::expert
