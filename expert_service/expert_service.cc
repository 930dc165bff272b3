#include "expert_service/expert_service.h"

#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "expert_service/weight_transfer.h"

namespace moe::expert {
namespace {

constexpr size_t kDefaultChunkBytes = 1 << 20;

// An empty output tensor of `view`'s shape and dtype in `out`, and a view of
// its bytes to compute into (the answer's bytes, so nothing is copied later).
TensorView AllocateLike(const ConstTensorView& view, v1::Tensor* out) {
  out->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
  out->set_dtype(ToProtoDType(view.dtype));
  std::string* data = out->mutable_data();
  data->resize(view.size_bytes());
  return {view.dtype, view.shape, reinterpret_cast<std::byte*>(data->data())};
}

}  // namespace

ExpertServiceImpl::ExpertServiceImpl(Options options, ExpertStore& store, ComputePool& pool,
                                     const ExpertMetrics& metrics, MicroBatcher* batcher,
                                     StepExecutor* steps, ComputePool* step_pool)
    : options_(std::move(options)),
      store_(store),
      pool_(pool),
      metrics_(metrics),
      batcher_(batcher),
      steps_(steps),
      step_pool_(step_pool) {}

namespace {

absl::Status NoSteps() {
  return absl::FailedPreconditionError("this server was started without training steps");
}

}  // namespace

absl::Status ExpertServiceImpl::CheckDeadline(int64_t deadline_unix_micros) const {
  if (deadline_unix_micros == 0) return absl::OkStatus();
  const absl::Time deadline = absl::FromUnixMicros(deadline_unix_micros);
  const absl::Time now = options_.clock();
  if (now >= deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        "deadline passed ", absl::FormatDuration(now - deadline), " before the expert ran"));
  }
  return absl::OkStatus();
}

void ExpertServiceImpl::HandleDispatch(std::unique_ptr<v1::DispatchRequest> request,
                                       std::unique_ptr<v1::DispatchResponse> response,
                                       DispatchReply reply) {
  response->set_sequence_id(request->sequence_id());
  const ModelConfig& model = store_.model();
  const int expert = request->expert_id();
  absl::StatusOr<ConstTensorView> x = [&]() -> absl::StatusOr<ConstTensorView> {
    MOE_RETURN_IF_ERROR(CheckDeadline(request->deadline_unix_micros()));
    MOE_RETURN_IF_ERROR(store_.CheckHosted(expert));
    return DecodeTensor(request->tokens(),
                        TokenBatchSpec("tokens", model.d_model, model.max_batch_tokens));
  }();
  if (!x.ok()) {
    CompleteDispatch(x.status(), expert, 0, absl::ZeroDuration(), *response);
    std::move(reply)(std::move(response));
    return;
  }
  const TensorView y = AllocateLike(*x, response->mutable_output());
  const absl::Time start = absl::Now();
  if (batcher_ != nullptr && !request->training()) {
    // The request and answer ride along until the batch has run.
    const int64_t rows = x->rows();
    batcher_->Forward(expert, *x, y,
                      [this, request = std::move(request), response = std::move(response),
                       reply = std::move(reply), expert, rows,
                       start](absl::Status status) mutable {
                        CompleteDispatch(status, expert, rows, absl::Now() - start, *response);
                        std::move(reply)(std::move(response));
                      });
    return;
  }
  const absl::Status status = store_.Forward(expert, *x, y, request->training(),
                                             request->request_id(), options_.clock());
  CompleteDispatch(status, expert, x->rows(), absl::Now() - start, *response);
  std::move(reply)(std::move(response));
}

void ExpertServiceImpl::CompleteDispatch(const absl::Status& status, int expert, int64_t rows,
                                         absl::Duration elapsed,
                                         v1::DispatchResponse& response) const {
  if (status.ok()) {
    response.set_compute_micros(absl::ToInt64Microseconds(elapsed));
    metrics_.forward_seconds->Observe(absl::ToDoubleSeconds(elapsed));
    metrics_.batch_rows->Observe(static_cast<double>(rows));
    metrics_.forward_tokens[expert]->Increment(static_cast<double>(rows));
  } else {
    response.clear_output();
    ToProtoStatus(status, response.mutable_error());
    metrics_.CountError(status);
  }
  metrics_.training_state_bytes->Set(static_cast<double>(store_.training_state().bytes()));
}

void ExpertServiceImpl::HandleBackward(const v1::BackwardDispatchRequest& request,
                                       v1::BackwardDispatchResponse* response) {
  response->set_sequence_id(request.sequence_id());
  const ModelConfig& model = store_.model();
  const absl::Status status = [&]() -> absl::Status {
    MOE_RETURN_IF_ERROR(CheckDeadline(request.deadline_unix_micros()));
    MOE_RETURN_IF_ERROR(store_.CheckHosted(request.expert_id()));
    MOE_ASSIGN_OR_RETURN(
        const ConstTensorView dy,
        DecodeTensor(request.grad_output(),
                     TokenBatchSpec("grad_output", model.d_model, model.max_batch_tokens)));
    const TensorView dx = AllocateLike(dy, response->mutable_grad_input());
    const absl::Time start = absl::Now();
    MOE_RETURN_IF_ERROR(store_.Backward(request.expert_id(), request.request_id(), dy, dx,
                                        options_.clock()));
    const absl::Duration elapsed = absl::Now() - start;
    response->set_compute_micros(absl::ToInt64Microseconds(elapsed));
    metrics_.backward_seconds->Observe(absl::ToDoubleSeconds(elapsed));
    metrics_.backward_tokens[request.expert_id()]->Increment(static_cast<double>(dy.rows()));
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    response->clear_grad_input();
    ToProtoStatus(status, response->mutable_error());
    metrics_.CountError(status);
  }
  metrics_.training_state_bytes->Set(static_cast<double>(store_.training_state().bytes()));
}

grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse>*
ExpertServiceImpl::Dispatch(grpc::CallbackServerContext* context) {
  return new StreamReactor<v1::DispatchRequest, v1::DispatchResponse>(
      *this, pool_,
      [this](std::unique_ptr<v1::DispatchRequest> request,
             std::unique_ptr<v1::DispatchResponse> response, DispatchReply reply) {
        HandleDispatch(std::move(request), std::move(response), std::move(reply));
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
      });
}

grpc::ServerBidiReactor<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>*
ExpertServiceImpl::BackwardDispatch(grpc::CallbackServerContext* context) {
  return new StreamReactor<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>(
      *this, pool_,
      [this](std::unique_ptr<v1::BackwardDispatchRequest> request,
             std::unique_ptr<v1::BackwardDispatchResponse> response,
             absl::AnyInvocable<void(std::unique_ptr<v1::BackwardDispatchResponse>) &&>
                 reply) {
        HandleBackward(*request, response.get());
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
  response->set_server_name(options_.server_name);
  *response->mutable_model() = ModelConfigToProto(store_.model());
  response->set_compute_dtype(ToProtoDType(store_.compute_dtype()));
  if (steps_ != nullptr) response->set_step(steps_->last_committed());
  for (int expert : store_.HostedExperts()) {
    absl::StatusOr<uint64_t> digest = store_.Digest(expert);
    if (!digest.ok()) continue;  // released meanwhile
    v1::ExpertDigest* entry = response->add_experts();
    entry->set_expert_id(expert);
    entry->set_weights_digest(*digest);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<v1::ExpertWeightsChunk>* ExpertServiceImpl::GetExpertWeights(
    grpc::CallbackServerContext* context, const v1::GetExpertWeightsRequest* request) {
  // Writes the precomputed chunks one at a time.
  class Writer : public grpc::ServerWriteReactor<v1::ExpertWeightsChunk> {
   public:
    explicit Writer(absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> chunks) {
      if (!chunks.ok()) {
        Finish(ToGrpcStatus(chunks.status()));
        return;
      }
      chunks_ = *std::move(chunks);
      StartWrite(&chunks_[0]);
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
    void OnDone() override { delete this; }

   private:
    std::vector<v1::ExpertWeightsChunk> chunks_;
    size_t next_ = 0;
  };

  absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> chunks =
      [&]() -> absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> {
    if (request->max_chunk_bytes() < 0) {
      return absl::InvalidArgumentError("max_chunk_bytes must be >= 0");
    }
    MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, store_.Snapshot(request->expert_id()));
    const size_t chunk_bytes =
        request->max_chunk_bytes() == 0 ? kDefaultChunkBytes : request->max_chunk_bytes();
    return ChunkExpert(request->expert_id(), snapshot, chunk_bytes);
  }();
  return new Writer(std::move(chunks));
}

grpc::ServerReadReactor<v1::ExpertWeightsChunk>* ExpertServiceImpl::LoadExpertWeights(
    grpc::CallbackServerContext* context, v1::LoadExpertWeightsResponse* response) {
  // Reads every chunk, then installs the expert.
  class Reader : public grpc::ServerReadReactor<v1::ExpertWeightsChunk> {
   public:
    Reader(ExpertStore& store, v1::LoadExpertWeightsResponse* response)
        : store_(store), response_(response), assembler_(store.model()) {
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
        status_ = Install();
      }
      Finish(ToGrpcStatus(status_));
    }
    void OnDone() override { delete this; }

   private:
    absl::Status Install() {
      MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, assembler_.Finish());
      const uint64_t digest = snapshot.weights.Digest();
      MOE_RETURN_IF_ERROR(store_.AddExpert(assembler_.expert(), std::move(snapshot)));
      response_->mutable_expert()->set_expert_id(assembler_.expert());
      response_->mutable_expert()->set_weights_digest(digest);
      return absl::OkStatus();
    }

    ExpertStore& store_;
    v1::LoadExpertWeightsResponse* response_;
    ExpertAssembler assembler_;
    v1::ExpertWeightsChunk chunk_;
    absl::Status status_;
  };
  return new Reader(store_, response);
}

grpc::ServerUnaryReactor* ExpertServiceImpl::ReleaseExpert(
    grpc::CallbackServerContext* context, const v1::ReleaseExpertRequest* request,
    v1::ReleaseExpertResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(store_.RemoveExpert(request->expert_id())));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::PrepareStep(grpc::CallbackServerContext* context,
                                                         const v1::PrepareStepRequest* request,
                                                         v1::PrepareStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Time deadline = absl::FromUnixMicros(request->deadline_unix_micros());
  if (request->deadline_unix_micros() == 0) deadline = absl::FromChrono(context->deadline());
  RunStep(reactor, [this, reactor, request, response, deadline] {
    absl::StatusOr<StepExecutor::PrepareResult> result =
        steps_->Prepare(request->step(), request->learning_rate(), deadline);
    if (result.ok()) {
      response->set_step(request->step());
      response->set_allreduce_bytes_sent(result->allreduce_bytes_sent);
      response->set_allreduce_seconds(absl::ToDoubleSeconds(result->allreduce_time));
      response->set_optimizer_seconds(absl::ToDoubleSeconds(result->optimizer_time));
      metrics_.allreduce_seconds->Observe(absl::ToDoubleSeconds(result->allreduce_time));
      metrics_.allreduce_sent_bytes->Increment(
          static_cast<double>(result->allreduce_bytes_sent));
    } else {
      metrics_.steps_failed->Increment();
    }
    reactor->Finish(ToGrpcStatus(result.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::CommitStep(grpc::CallbackServerContext* context,
                                                        const v1::CommitStepRequest* request,
                                                        v1::CommitStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  RunStep(reactor, [this, reactor, request, response] {
    absl::StatusOr<std::vector<std::pair<int, uint64_t>>> digests =
        steps_->Commit(request->step());
    if (digests.ok()) {
      response->set_step(request->step());
      for (const auto& [expert, digest] : *digests) {
        v1::ExpertDigest* entry = response->add_experts();
        entry->set_expert_id(expert);
        entry->set_weights_digest(digest);
      }
      metrics_.steps_committed->Increment();
    }
    reactor->Finish(ToGrpcStatus(digests.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::AbortStep(grpc::CallbackServerContext* context,
                                                       const v1::AbortStepRequest* request,
                                                       v1::AbortStepResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (steps_ == nullptr) {
    reactor->Finish(ToGrpcStatus(NoSteps()));
    return reactor;
  }
  steps_->Abort(request->step(), request->reason().empty() ? std::string("aborted by the router")
                                                           : request->reason());
  metrics_.steps_aborted->Increment();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void ExpertServiceImpl::RunStep(grpc::ServerUnaryReactor* reactor,
                                absl::AnyInvocable<void() &&> work) {
  if (steps_ == nullptr) {
    reactor->Finish(ToGrpcStatus(NoSteps()));
  } else if (!step_pool_->Submit(std::move(work))) {
    reactor->Finish(ToGrpcStatus(absl::ResourceExhaustedError("step queue full")));
  }
}

bool ExpertServiceImpl::Register(DrainableStream* stream) {
  absl::MutexLock lock(&mu_);
  if (draining_) return false;
  streams_.insert(stream);
  metrics_.active_streams->Set(static_cast<double>(streams_.size()));
  return true;
}

void ExpertServiceImpl::Unregister(DrainableStream* stream) {
  absl::MutexLock lock(&mu_);
  streams_.erase(stream);
  metrics_.active_streams->Set(static_cast<double>(streams_.size()));
}

void ExpertServiceImpl::BeginDrain() {
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

bool ExpertServiceImpl::WaitForStreams(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return streams_.empty(); };
  return mu_.AwaitWithDeadline(absl::Condition(&none), deadline);
}

int ExpertServiceImpl::open_streams() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(streams_.size());
}

}  // namespace moe::expert
