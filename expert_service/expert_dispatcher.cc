#include "expert_service/expert_dispatcher.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "common/checkpoint.h"
#include "common/expert_key.h"
#include "common/log.h"
#include "common/lower_priority.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"

namespace moe::expert {
namespace {

constexpr size_t kDefaultChunkBytes = 1 << 20;

// An empty output tensor of `view`'s shape and dtype in `out`, and a view of
// its bytes to compute into (the answer's bytes, so nothing is copied later).
TensorView Allocate(DType dtype, const Shape& shape, v1::Tensor* out) {
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  out->set_dtype(ToProtoDType(dtype));
  std::string* data = out->mutable_data();
  data->resize(NumElements(shape) * DTypeSize(dtype));
  return {dtype, shape, reinterpret_cast<std::byte*>(data->data())};
}

TensorView AllocateLike(const ConstTensorView& view, v1::Tensor* out) {
  return Allocate(view.dtype, view.shape, out);
}

absl::Status NoSteps() {
  return absl::FailedPreconditionError("this server was started without training steps");
}

}  // namespace

ExpertDispatcher::ExpertDispatcher(Options options, ExpertStore& store,
                                   const ExpertMetrics& metrics, MicroBatcher* batcher,
                                   StepExecutor* steps)
    : options_(std::move(options)),
      store_(store),
      metrics_(metrics),
      batcher_(batcher),
      steps_(steps) {}

absl::Status ExpertDispatcher::CheckDeadline(int64_t deadline_unix_micros) const {
  if (deadline_unix_micros == 0) return absl::OkStatus();
  const absl::Time deadline = absl::FromUnixMicros(deadline_unix_micros);
  const absl::Time now = options_.clock();
  if (now >= deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        "deadline passed ", absl::FormatDuration(now - deadline), " before the expert ran"));
  }
  return absl::OkStatus();
}

void ExpertDispatcher::SetPlacementEpochs(uint64_t oldest, uint64_t newest,
                                          std::vector<ExpertKey> leaving) {
  absl::MutexLock lock(&epoch_mu_);
  oldest_epoch_ = oldest;
  newest_epoch_ = newest;
  leaving_ = std::move(leaving);
}

absl::Status ExpertDispatcher::CheckNotLeaving(ExpertKey expert) const {
  absl::MutexLock lock(&epoch_mu_);
  if (std::find(leaving_.begin(), leaving_.end(), expert) == leaving_.end()) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat(expert.ToString(), " leaves server ", options_.server_name,
                   " with placement epoch ", newest_epoch_, ": no training forwards for it here"));
}

uint64_t ExpertDispatcher::placement_epoch() const {
  absl::MutexLock lock(&epoch_mu_);
  return newest_epoch_;
}

absl::Status ExpertDispatcher::CheckEpoch(bool has_version,
                                          const v1::StateVersion& version) const {
  if (!has_version) return absl::OkStatus();
  absl::MutexLock lock(&epoch_mu_);
  const uint64_t epoch = version.placement_epoch();
  if (epoch >= oldest_epoch_ && epoch <= newest_epoch_) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "server ", options_.server_name, " serves placement epoch ",
      oldest_epoch_ == newest_epoch_ ? absl::StrCat(newest_epoch_)
                                     : absl::StrCat(oldest_epoch_, "-", newest_epoch_),
      ", the call is for epoch ", epoch));
}

void ExpertDispatcher::ServerVersion(ExpertKey expert, v1::StateVersion* out) const {
  out->set_placement_epoch(placement_epoch());
  absl::StatusOr<uint64_t> step = store_.Step(expert);
  out->set_weights_step(step.ok() ? *step : 0);
}

namespace {

// A gate and its optimizer state, as a commit or a peer brings them: fp32,
// every layer's stacked (ModelConfig::gate_shape()) each.
template <typename GateMessage>
absl::Status CheckGate(const ModelConfig& model, const GateMessage& message) {
  auto check = [&](const v1::Tensor& tensor, absl::string_view name) -> absl::Status {
    const TensorSpec spec{name, model.gate_shape(), {"num_layers x d_model", "gate width"}};
    MOE_ASSIGN_OR_RETURN(const ConstTensorView view, DecodeTensor(tensor, spec));
    if (view.dtype != DType::kFloat32) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": must be fp32"));
    }
    return absl::OkStatus();
  };
  MOE_RETURN_IF_ERROR(check(message.gate(), "gate"));
  if (message.has_gate_velocity()) {
    MOE_RETURN_IF_ERROR(check(message.gate_velocity(), "gate_velocity"));
  }
  if (message.has_gate_second_moment()) {
    MOE_RETURN_IF_ERROR(check(message.gate_second_moment(), "gate_second_moment"));
  }
  return absl::OkStatus();
}

uint64_t ExpectedStep(bool has_version, const v1::StateVersion& version) {
  return has_version ? version.weights_step() : ExpertStore::kAnyStep;
}

}  // namespace

bool ExpertDispatcher::RunsWhereReceived(const v1::DispatchRequest& request) const {
  // The default limit is a few microseconds of kernel work: about what
  // waking a pool thread costs on a busy machine, and a batched call would
  // pay it twice (the request, then its micro-batch).
  if (request.training() || request.tokens().shape_size() == 0) return false;
  const ModelConfig& model = store_.model();
  const int64_t rows = request.tokens().shape(0);
  return options_.inline_call_multiply_adds > 0 && rows >= 0 &&
         rows <= options_.inline_call_multiply_adds / model.expert_parameters();
}

void ExpertDispatcher::Dispatch(std::unique_ptr<v1::DispatchRequest> request,
                                std::unique_ptr<v1::DispatchResponse> response, DispatchReply reply,
                                std::function<bool()> cancelled) {
  response->set_sequence_id(request->sequence_id());
  const ModelConfig& model = store_.model();
  const ExpertKey expert = ExpertKeyOf(*request);
  const DType compute_dtype = store_.compute_dtype();
  response->set_compute_dtype(ToProtoDType(compute_dtype));
  absl::StatusOr<ConstTensorView> x = [&]() -> absl::StatusOr<ConstTensorView> {
    MOE_RETURN_IF_ERROR(CheckDeadline(request->deadline_unix_micros()));
    // The epoch first: a call planned on a placement this server no longer
    // serves is stale (the router re-plans it), not a missing expert.
    MOE_RETURN_IF_ERROR(CheckEpoch(request->has_version(), request->version()));
    MOE_RETURN_IF_ERROR(store_.CheckHosted(expert));
    if (request->training()) MOE_RETURN_IF_ERROR(CheckNotLeaving(expert));
    MOE_ASSIGN_OR_RETURN(const ConstTensorView tokens,
                         DecodeTensor(request->tokens(), TokenBatchSpec("tokens", model.d_model,
                                                                        model.max_batch_tokens)));
    if (request->tokens_rounded_to_bf16()) {
      if (request->training() || tokens.dtype != DType::kBFloat16) {
        return absl::InvalidArgumentError(
            "tokens_rounded_to_bf16: only for inference, with bf16 tokens");
      }
      // fp32 kernels would compute from the rounded rows: not the answer
      // the sender's fp32 client asked for.
      if (compute_dtype != DType::kBFloat16) {
        return absl::FailedPreconditionError(
            "tokens rounded to bf16, but this server's kernels compute in fp32: send fp32 rows");
      }
    }
    return tokens;
  }();
  const bool versioned = request->has_version();
  if (!x.ok()) {
    CompleteDispatch(x.status(), expert, 0, absl::ZeroDuration(), versioned, *response);
    std::move(reply)(std::move(response));
    return;
  }
  const uint64_t expected_step = ExpectedStep(versioned, request->version());
  // bf16 kernels' outputs are bf16 values whatever the request's dtype:
  // answered in bf16 they are the same numbers in half the bytes.
  const DType answer_dtype = compute_dtype == DType::kBFloat16 ? DType::kBFloat16 : x->dtype;
  const TensorView y = Allocate(answer_dtype, x->shape, response->mutable_output());
  const absl::Time start = absl::Now();
  // Before a merged batch runs, and between blocks of a large request: is
  // anyone still waiting for it?
  const int64_t deadline_micros = request->deadline_unix_micros();
  auto keep_going = [this, deadline_micros, cancelled]() -> absl::Status {
    if (cancelled && cancelled()) {
      return absl::CancelledError("cancelled by the client while the expert ran");
    }
    if (deadline_micros != 0 && options_.clock() >= absl::FromUnixMicros(deadline_micros)) {
      return absl::DeadlineExceededError("deadline passed while the expert ran; stopped");
    }
    return absl::OkStatus();
  };
  if (batcher_ != nullptr && !request->training() && !RunsWhereReceived(*request)) {
    // The request and answer ride along until the batch has run.
    const int64_t rows = x->rows();
    batcher_->Forward(
        expert, *x, y, expected_step,
        [this, request = std::move(request), response = std::move(response),
         reply = std::move(reply), expert, rows,
         versioned](absl::Status status, absl::Duration ran) mutable {
          // The kernel's time, not the wait for a compute thread: the
          // router counts the wait as time outside the kernels.
          CompleteDispatch(status, expert, rows, ran, versioned, *response);
          std::move(reply)(std::move(response));
        },
        keep_going);
    return;
  }
  const absl::Status status =
      store_.Forward(expert, *x, y, request->training(), request->request_id(), options_.clock(),
                     expected_step, keep_going);
  CompleteDispatch(status, expert, x->rows(), absl::Now() - start, versioned, *response);
  std::move(reply)(std::move(response));
}

void ExpertDispatcher::CompleteDispatch(const absl::Status& status, ExpertKey expert, int64_t rows,
                                        absl::Duration elapsed, bool versioned,
                                        v1::DispatchResponse& response) const {
  if (status.ok()) {
    response.set_compute_micros(absl::ToInt64Microseconds(elapsed));
    metrics_.forward_seconds->Observe(absl::ToDoubleSeconds(elapsed));
    metrics_.batch_rows->Observe(static_cast<double>(rows));
    metrics_.ForwardTokens(expert).Increment(static_cast<double>(rows));
  } else {
    response.clear_output();
    ToProtoStatus(status, response.mutable_error());
    if (versioned) ServerVersion(expert, response.mutable_server_version());
    metrics_.CountError(status);
  }
  metrics_.training_state_bytes->Set(static_cast<double>(store_.training_state().bytes()));
}

void ExpertDispatcher::Backward(const v1::BackwardDispatchRequest& request,
                                v1::BackwardDispatchResponse* response) {
  response->set_sequence_id(request.sequence_id());
  const ModelConfig& model = store_.model();
  const ExpertKey expert = ExpertKeyOf(request);
  const absl::Status status = [&]() -> absl::Status {
    MOE_RETURN_IF_ERROR(CheckDeadline(request.deadline_unix_micros()));
    MOE_RETURN_IF_ERROR(store_.CheckHosted(expert));
    // No placement epoch check: the forward's training state (kept here
    // only for its replica) ties the call to this server, and a placement
    // change never moves an expert that holds some.
    MOE_ASSIGN_OR_RETURN(
        const ConstTensorView dy,
        DecodeTensor(request.grad_output(),
                     TokenBatchSpec("grad_output", model.d_model, model.max_batch_tokens)));
    const TensorView dx = AllocateLike(dy, response->mutable_grad_input());
    const absl::Time start = absl::Now();
    MOE_RETURN_IF_ERROR(store_.Backward(expert, request.request_id(), dy, dx, options_.clock(),
                                        ExpectedStep(request.has_version(), request.version())));
    const absl::Duration elapsed = absl::Now() - start;
    response->set_compute_micros(absl::ToInt64Microseconds(elapsed));
    metrics_.backward_seconds->Observe(absl::ToDoubleSeconds(elapsed));
    metrics_.BackwardTokens(expert).Increment(static_cast<double>(dy.rows()));
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    response->clear_grad_input();
    ToProtoStatus(status, response->mutable_error());
    if (request.has_version()) {
      ServerVersion(expert, response->mutable_server_version());
    }
    metrics_.CountError(status);
  }
  metrics_.training_state_bytes->Set(static_cast<double>(store_.training_state().bytes()));
}

void ExpertDispatcher::Info(v1::InfoResponse* response) const {
  response->set_server_name(options_.server_name);
  *response->mutable_model() = ModelConfigToProto(store_.model());
  response->set_compute_dtype(ToProtoDType(store_.compute_dtype()));
  if (steps_ != nullptr) {
    const PeerSteps steps = steps_->steps();
    response->set_step(steps.committed);
    response->set_prepared_step(steps.prepared);
    response->set_aborted_step(steps.aborted);
  }
  response->set_placement_epoch(placement_epoch());
  // Per expert, layer-major; none when the metrics count per layer only
  // (more experts than metric series).
  const ModelConfig& model = store_.model();
  for (int l = 0; metrics_.per_expert && l < model.num_layers; ++l) {
    for (int e = 0; e < model.experts_per_layer(); ++e) {
      response->add_expert_tokens(
          static_cast<int64_t>(metrics_.ForwardTokens(ExpertKey(l, e)).Value()));
    }
  }
  for (ExpertKey expert : store_.HostedExperts()) {
    absl::StatusOr<uint64_t> digest = store_.Digest(expert);
    absl::StatusOr<uint64_t> step = store_.Step(expert);
    if (!digest.ok() || !step.ok()) continue;  // released meanwhile
    v1::ExpertDigest* entry = response->add_experts();
    SetExpertKey(expert, entry);
    entry->set_weights_digest(*digest);
    entry->set_step(*step);
  }
}

absl::StatusOr<std::vector<v1::ExpertWeightsChunk>> ExpertDispatcher::ExpertChunks(
    const v1::GetExpertWeightsRequest& request) const {
  if (request.max_chunk_bytes() < 0) {
    return absl::InvalidArgumentError("max_chunk_bytes must be >= 0");
  }
  const ExpertKey expert = ExpertKeyOf(request);
  // The step, then the weights checked to be of it: a commit in between
  // fails the call rather than labelling new weights with the old step.
  MOE_ASSIGN_OR_RETURN(const uint64_t step, store_.Step(expert));
  MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, store_.Snapshot(expert, step));
  const size_t chunk_bytes =
      request.max_chunk_bytes() == 0 ? kDefaultChunkBytes : request.max_chunk_bytes();
  std::vector<v1::ExpertWeightsChunk> chunks = ChunkExpert(expert, snapshot, chunk_bytes);
  chunks.back().set_step(step);
  return chunks;
}

absl::Status ExpertDispatcher::InstallExpert(ExpertAssembler& assembler,
                                             v1::LoadExpertWeightsResponse* response) {
  MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, assembler.Finish());
  const uint64_t digest = assembler.digest();    // checked by Finish
  const ExpertKey expert = *assembler.expert();  // Finish() saw the last chunk
  MOE_RETURN_IF_ERROR(store_.AddExpert(expert, std::move(snapshot), assembler.step()));
  SetExpertKey(expert, response->mutable_expert());
  response->mutable_expert()->set_weights_digest(digest);
  response->mutable_expert()->set_step(assembler.step());
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::ReleaseExpert(const v1::ReleaseExpertRequest& request) {
  return store_.RemoveExpert(ExpertKeyOf(request));
}

absl::Status ExpertDispatcher::SaveExperts(const v1::SaveExpertsRequest& request,
                                           v1::SaveExpertsResponse* response) const {
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server ", options_.server_name, " has no --checkpoint_dir to save checkpoints in"));
  }
  MOE_ASSIGN_OR_RETURN(const std::string path,
                       ResolveCheckpointPath(options_.checkpoint_dir, request.path()));
  MOE_ASSIGN_OR_RETURN(
      const DType dtype,
      FromProtoDType(request.dtype() == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FP32 : request.dtype(),
                     "dtype"));
  const ModelConfig& model = store_.model();
  const std::vector<std::string> states = OptimizerStateNames(model.optimizer.type);
  std::optional<std::string> optimizer_path;
  if (!request.optimizer_path().empty() && !states.empty()) {
    MOE_ASSIGN_OR_RETURN(optimizer_path,
                         ResolveCheckpointPath(options_.checkpoint_dir, request.optimizer_path()));
  }
  // One MoeWeights per layer, and per layer and optimizer state.
  std::map<int, MoeWeights> parts;
  std::map<int, std::vector<MoeWeights>> state_parts;
  size_t saved = 0;
  for (const v1::ExpertRef& ref : request.experts()) {
    const ExpertKey expert = ExpertKeyOf(ref);
    // Snapshot checks that `expert` is hosted and at the step.
    MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, store_.Snapshot(expert, request.step()));
    MoeWeights& part = parts[expert.layer];
    part.layer = expert.layer;
    part.experts.emplace(expert.expert, std::move(snapshot.weights));
    ++saved;
    if (optimizer_path) {
      std::vector<MoeWeights>& layer_states = state_parts[expert.layer];
      layer_states.resize(states.size());
      std::optional<ExpertWeights>* held[] = {&snapshot.velocity, &snapshot.second_moment};
      for (size_t k = 0; k < states.size(); ++k) {
        if (!*held[k]) {
          return absl::InternalError(
              absl::StrCat(expert.ToString(), ": no optimizer state ", states[k], " to save"));
        }
        layer_states[k].layer = expert.layer;
        layer_states[k].experts.emplace(expert.expert, std::move(**held[k]));
      }
    }
  }
  MOE_RETURN_IF_ERROR(MakeDirectories(path.substr(0, path.rfind('/'))));
  std::vector<std::string> names, state_names;
  // Forwards go on meanwhile: the conversion and the write yield to them.
  absl::StatusOr<int64_t> written, state_written = int64_t{0};
  AtLowerPriority([&] {
    std::vector<ShardPart> weight_parts;
    for (const auto& [layer, part] : parts) weight_parts.push_back({"", &part});
    written = SaveCheckpointShard(path, model, weight_parts, dtype, &names);
    if (written.ok() && optimizer_path) {
      std::vector<ShardPart> parts;
      for (const auto& [layer, layer_states] : state_parts) {
        for (size_t k = 0; k < states.size(); ++k) parts.push_back({states[k], &layer_states[k]});
      }
      state_written =
          SaveCheckpointShard(*optimizer_path, model, parts, DType::kFloat32, &state_names);
    }
  });
  MOE_ASSIGN_OR_RETURN(const int64_t bytes, std::move(written));
  MOE_ASSIGN_OR_RETURN(const int64_t state_bytes, std::move(state_written));
  for (std::string& name : names) response->add_tensor_names(std::move(name));
  response->set_bytes(bytes);
  for (std::string& name : state_names) response->add_optimizer_tensor_names(std::move(name));
  response->set_optimizer_bytes(state_bytes);
  MOE_LOG(INFO, "server ", options_.server_name, ": saved ", saved, " expert(s) of step ",
          request.step(), " to ", path, " (", bytes >> 20, " MiB)");
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::PrepareStep(const v1::PrepareStepRequest& request,
                                           absl::Time deadline,
                                           v1::PrepareStepResponse* response) {
  if (steps_ == nullptr) return NoSteps();
  if (request.deadline_unix_micros() != 0) {
    deadline = absl::FromUnixMicros(request.deadline_unix_micros());
  }
  StepOrder order{request.step(),        request.learning_rate(), deadline,
                  request.committed_step(), request.coordinator(),   request.defer_update()};
  order.left_out.insert(request.left_out().begin(), request.left_out().end());
  absl::StatusOr<StepExecutor::PrepareResult> result = steps_->Prepare(order);
  if (!result.ok()) {
    metrics_.steps_failed->Increment();
    return result.status();
  }
  response->set_step(request.step());
  response->set_allreduce_bytes_sent(result->allreduce_bytes_sent);
  response->set_allreduce_seconds(absl::ToDoubleSeconds(result->allreduce_time));
  response->set_optimizer_seconds(absl::ToDoubleSeconds(result->optimizer_time));
  if (result->update_deferred) response->set_grad_squared_norm(result->grad_squared_norm);
  if (!result->gate_gradient.empty()) {
    const ModelConfig& model = store_.model();
    EncodeFloats(result->gate_gradient, model.gate_shape(), DType::kFloat32,
                 response->mutable_gate_gradient());
  }
  metrics_.allreduce_seconds->Observe(absl::ToDoubleSeconds(result->allreduce_time));
  metrics_.allreduce_sent_bytes->Increment(static_cast<double>(result->allreduce_bytes_sent));
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::UpdateStep(const v1::UpdateStepRequest& request,
                                          v1::UpdateStepResponse* response) {
  if (steps_ == nullptr) return NoSteps();
  absl::StatusOr<absl::Duration> took =
      steps_->Update(request.step(), request.learning_rate(), request.grad_scale());
  if (!took.ok()) {
    metrics_.steps_failed->Increment();
    return took.status();
  }
  response->set_optimizer_seconds(absl::ToDoubleSeconds(*took));
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::CommitStep(const v1::CommitStepRequest& request,
                                          v1::CommitStepResponse* response) {
  if (steps_ == nullptr) return NoSteps();
  // The gate is checked before the commit: a bad one fails the call and
  // the step stays prepared (the router aborts it).
  const bool has_gate = request.has_gate();
  if (has_gate) MOE_RETURN_IF_ERROR(CheckGate(store_.model(), request));
  std::optional<v1::GetGateResponse> gate;
  if (has_gate) {
    gate.emplace();
    gate->set_step(request.step());
    *gate->mutable_gate() = request.gate();
    if (request.has_gate_velocity()) *gate->mutable_gate_velocity() = request.gate_velocity();
    if (request.has_gate_second_moment()) {
      *gate->mutable_gate_second_moment() = request.gate_second_moment();
    }
  }
  // The weights and the gate of the step together: a router that meets the
  // new weights (a Dispatch refused for its older step) and asks GetGate
  // at once finds the new gate, not "the gate of the step before".
  absl::MutexLock lock(&gate_mu_);
  MOE_ASSIGN_OR_RETURN(const auto digests, steps_->Commit(request.step()));
  if (gate) gate_ = *std::move(gate);
  response->set_step(request.step());
  for (const auto& [expert, digest] : digests) {
    v1::ExpertDigest* entry = response->add_experts();
    SetExpertKey(expert, entry);
    entry->set_weights_digest(digest);
    entry->set_step(request.step());
  }
  metrics_.steps_committed->Increment();
  metrics_.committed_step->Set(static_cast<double>(request.step()));
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::AddGateGradient(const v1::AddGateGradientRequest& request) {
  if (steps_ == nullptr) return NoSteps();
  const ModelConfig& model = store_.model();
  const TensorSpec spec{"gradient", {model.d_model, model.gate_width()}, {"d_model", "gate width"}};
  MOE_ASSIGN_OR_RETURN(const ConstTensorView view, DecodeTensor(request.gradient(), spec));
  if (view.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("gradient: must be fp32");
  }
  return steps_->AddGateGradient(request.gate_step(), request.layer(), view.floats());
}

absl::Status ExpertDispatcher::GetGate(v1::GetGateResponse* response) const {
  absl::MutexLock lock(&gate_mu_);
  if (!gate_) {
    return absl::NotFoundError(absl::StrCat("server ", options_.server_name,
                                            " holds no gate: no step was committed with one "
                                            "since it started"));
  }
  // A step committed here without its CommitStep (on a peer's word, or
  // by a sync) brought no gate: the one kept is older than the weights.
  if (steps_ != nullptr && gate_->step() != steps_->last_committed()) {
    return absl::NotFoundError(
        absl::StrCat("server ", options_.server_name, " holds the gate of step ", gate_->step(),
                     ", not of its committed step ", steps_->last_committed(),
                     " (that step's commit did not reach it)"));
  }
  *response = *gate_;
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::AdoptGate(const v1::GetGateResponse& gate) {
  if (steps_ == nullptr) return NoSteps();
  MOE_RETURN_IF_ERROR(CheckGate(store_.model(), gate));
  const uint64_t committed = steps_->last_committed();
  if (gate.step() != committed) {
    return absl::FailedPreconditionError(absl::StrCat("a gate of step ", gate.step(), ", server ",
                                                      options_.server_name,
                                                      " has committed step ", committed));
  }
  absl::MutexLock lock(&gate_mu_);
  if (!gate_ || gate_->step() < gate.step()) gate_ = gate;
  return absl::OkStatus();
}

absl::Status ExpertDispatcher::AbortStep(const v1::AbortStepRequest& request) {
  if (steps_ == nullptr) return NoSteps();
  steps_->Abort(request.step(),
                request.reason().empty() ? std::string("aborted by the router") : request.reason(),
                request.coordinator());
  metrics_.steps_aborted->Increment();
  return absl::OkStatus();
}

}  // namespace moe::expert
