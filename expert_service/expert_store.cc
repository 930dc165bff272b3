#include "expert_service/expert_store.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/bfloat16.h"
#include "common/optimizer.h"
#include "common/status_macros.h"

namespace moe::expert {

struct ExpertStore::Hosted {
  ExpertWeights master;
  // The optimizer's state (ExpertSnapshot).
  std::optional<ExpertWeights> velocity;
  std::optional<ExpertWeights> second_moment;
  // The step `master` was committed at; changes with it, under weights_mu.
  uint64_t step = 0;
  // The digest of `master`, once computed (Info asks often; hashing
  // reads every weight): cleared under weights_mu when it changes.
  std::atomic<bool> digest_known{false};
  std::atomic<uint64_t> digest{0};
  std::unique_ptr<ExpertKernel> kernel;
  // Readers: forward and backward; writer: a weight update and its reload.
  absl::Mutex weights_mu;
  // Serialises accumulation into `grads`.
  absl::Mutex grads_mu;
  ExpertWeights grads ABSL_GUARDED_BY(grads_mu);
};

namespace {

// Bytes of `view` converted to `dtype` (a copy only when they differ).
const std::byte* InDtype(const ConstTensorView& view, DType dtype,
                         std::vector<std::byte>& storage) {
  if (view.dtype == dtype) return view.data;
  storage.resize(view.num_elements() * DTypeSize(dtype));
  if (dtype == DType::kFloat32) {
    Bf16ToFloats(view.bf16s(), absl::MakeSpan(reinterpret_cast<float*>(storage.data()),
                                              view.num_elements()));
  } else {
    FloatsToBf16(view.floats(), absl::MakeSpan(reinterpret_cast<uint16_t*>(storage.data()),
                                               view.num_elements()));
  }
  return storage.data();
}

// Writes `src` (in `src_dtype`) into `dst`, converting if needed.
void CopyConverted(const std::byte* src, DType src_dtype, const TensorView& dst) {
  const int64_t n = dst.num_elements();
  if (n == 0) return;  // memcpy must not see null
  if (src_dtype == dst.dtype) {
    std::memcpy(dst.data, src, dst.size_bytes());
  } else if (dst.dtype == DType::kFloat32) {
    Bf16ToFloats(absl::MakeConstSpan(reinterpret_cast<const uint16_t*>(src), n), dst.floats());
  } else {
    FloatsToBf16(absl::MakeConstSpan(reinterpret_cast<const float*>(src), n), dst.bf16s());
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Create(
    Options options, std::map<ExpertKey, ExpertWeights> experts, KernelFactory kernel_factory) {
  std::map<ExpertKey, ExpertSnapshot> snapshots;
  for (auto& [id, weights] : experts) snapshots[id].weights = std::move(weights);
  return Create(std::move(options), std::move(snapshots), std::move(kernel_factory));
}

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Create(
    Options options, std::map<ExpertKey, ExpertSnapshot> experts, KernelFactory kernel_factory) {
  auto store =
      std::unique_ptr<ExpertStore>(new ExpertStore(std::move(options), std::move(kernel_factory)));
  for (auto& [id, snapshot] : experts) {
    MOE_RETURN_IF_ERROR(store->AddExpertAt(id, std::move(snapshot), store->options_.loaded_step));
  }
  return store;
}

absl::StatusOr<std::shared_ptr<ExpertStore::Hosted>> ExpertStore::MakeHosted(
    ExpertSnapshot snapshot) const {
  const ExpertWeights zeros = ExpertWeights::Zeros(options_.model);
  for (ExpertTensor which : kAllExpertTensors) {
    if (snapshot.weights.tensor(which).shape() != zeros.tensor(which).shape() ||
        (snapshot.velocity &&
         snapshot.velocity->tensor(which).shape() != zeros.tensor(which).shape()) ||
        (snapshot.second_moment &&
         snapshot.second_moment->tensor(which).shape() != zeros.tensor(which).shape())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert weights: tensor ", static_cast<int>(which), " has shape ",
          ShapeString(snapshot.weights.tensor(which).shape()), ", the model needs ",
          ShapeString(zeros.tensor(which).shape())));
    }
  }
  auto hosted = std::make_shared<Hosted>();
  hosted->master = std::move(snapshot.weights);
  // State the optimizer keeps starts at zero when none came with the
  // weights (PyTorch's too).
  const int state = OptimizerStateTensors(options_.model.optimizer.type);
  hosted->velocity = std::move(snapshot.velocity);
  if (!hosted->velocity && state >= 1) hosted->velocity = zeros;
  hosted->second_moment = std::move(snapshot.second_moment);
  if (!hosted->second_moment && state >= 2) hosted->second_moment = zeros;
  {
    absl::MutexLock lock(&hosted->grads_mu);
    hosted->grads = zeros;
  }
  MOE_ASSIGN_OR_RETURN(hosted->kernel, kernel_factory_(hosted->master));
  return hosted;
}

DType ExpertStore::compute_dtype() const {
  absl::MutexLock lock(&mu_);
  if (experts_.empty()) return DType::kFloat32;
  return experts_.begin()->second->kernel->dtype();
}

absl::Status ExpertStore::CheckHosted(ExpertKey expert) const {
  MOE_RETURN_IF_ERROR(CheckExpertKey(options_.model, expert));
  absl::MutexLock lock(&mu_);
  if (!experts_.contains(expert)) {
    std::vector<ExpertKey> ids;
    for (const auto& [id, hosted] : experts_) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    return absl::NotFoundError(absl::StrCat(expert.ToString(), ": not hosted by server ",
                                            options_.server_name, " (hosts ",
                                            ids.empty() ? "none" : JoinExpertKeys(ids), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<ExpertStore::Hosted>> ExpertStore::Find(ExpertKey expert) const {
  MOE_RETURN_IF_ERROR(CheckHosted(expert));
  absl::MutexLock lock(&mu_);
  auto it = experts_.find(expert);
  if (it == experts_.end()) {  // removed between the check and here
    return absl::NotFoundError(
        absl::StrCat(expert.ToString(), ": no longer hosted by ", options_.server_name));
  }
  return it->second;
}

namespace {

absl::Status CheckStep(ExpertKey expert, uint64_t hosted_step, uint64_t expected_step) {
  if (expected_step == ExpertStore::kAnyStep || expected_step == hosted_step) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(expert.ToString(),
                                                    " here has the weights of step ", hosted_step,
                                                    ", the call is for step ", expected_step));
}

}  // namespace

absl::Status ExpertStore::Forward(ExpertKey expert, const ConstTensorView& x, const TensorView& y,
                                  bool training, uint64_t request_id, absl::Time now,
                                  uint64_t expected_step,
                                  const std::function<absl::Status()>& keep_going) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  ExpertKernel& kernel = *hosted->kernel;
  const DType dtype = kernel.dtype();
  const int64_t rows = x.rows();
  const int64_t d_model = options_.model.d_model;
  const int64_t width = options_.model.activation_width();

  SavedForward saved;
  std::vector<std::byte> x_storage, y_storage;
  const std::byte* x_bytes = nullptr;
  if (training) {
    saved.dtype = dtype;
    saved.rows = rows;
    const std::byte* converted = InDtype(x, dtype, x_storage);
    saved.x.assign(converted, converted + rows * d_model * DTypeSize(dtype));
    saved.activations.resize(rows * width * DTypeSize(dtype));
    x_bytes = saved.x.data();
  } else {
    x_bytes = InDtype(x, dtype, x_storage);
  }
  std::byte* y_bytes = y.data;
  if (y.dtype != dtype) {
    y_storage.resize(rows * d_model * DTypeSize(dtype));
    y_bytes = y_storage.data();
  }
  {
    absl::ReaderMutexLock lock(&hosted->weights_mu);
    MOE_RETURN_IF_ERROR(CheckStep(expert, hosted->step, expected_step));
    // Rows are independent: a block is the same arithmetic on fewer rows.
    const size_t row_bytes = d_model * DTypeSize(dtype);
    const size_t activation_bytes = width * DTypeSize(dtype);
    int64_t first = 0;
    do {  // once for 0 rows
      if (first > 0 && keep_going) MOE_RETURN_IF_ERROR(keep_going());
      const int64_t n = std::min(kRowsPerBlock, rows - first);
      const ConstTensorView kernel_x{dtype, {n, d_model}, x_bytes + first * row_bytes};
      const TensorView kernel_y{dtype, {n, d_model}, y_bytes + first * row_bytes};
      const TensorView activations{
          dtype,
          {n, width},
          training ? saved.activations.data() + first * activation_bytes : nullptr};
      MOE_RETURN_IF_ERROR(kernel.Forward(kernel_x, kernel_y, training ? &activations : nullptr));
      first += n;
    } while (first < rows);
  }
  if (y.dtype != dtype) CopyConverted(y_bytes, dtype, y);
  if (training) {
    MOE_RETURN_IF_ERROR(training_.Put(request_id, expert, std::move(saved), now));
  }
  return absl::OkStatus();
}

absl::Status ExpertStore::Backward(ExpertKey expert, uint64_t request_id, const ConstTensorView& dy,
                                   const TensorView& dx, absl::Time now, uint64_t expected_step) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  // The rows are checked before the state is taken: a bad call can be retried.
  MOE_ASSIGN_OR_RETURN(SavedForward saved, training_.Take(request_id, expert, now, dy.rows()));
  const int64_t d_model = options_.model.d_model;
  std::vector<std::byte> dy_storage, dx_storage;
  const std::byte* dy32 = InDtype(dy, DType::kFloat32, dy_storage);
  std::byte* dx32 = dx.data;
  if (dx.dtype != DType::kFloat32) {
    dx_storage.resize(dx.num_elements() * sizeof(float));
    dx32 = dx_storage.data();
  }
  {
    absl::ReaderMutexLock weights_lock(&hosted->weights_mu);
    // Gradients of other weights than these would be summed wrongly.
    MOE_RETURN_IF_ERROR(CheckStep(expert, hosted->step, expected_step));
    absl::MutexLock grads_lock(&hosted->grads_mu);
    MOE_RETURN_IF_ERROR(hosted->kernel->Backward(
        saved.x_view(d_model), saved.activations_view(options_.model.activation_width()),
        {DType::kFloat32, {saved.rows, d_model}, dy32},
        {DType::kFloat32, {saved.rows, d_model}, dx32}, hosted->grads));
    if (options_.model.bias_free()) ZeroBiases(hosted->grads);  // they stay zero
  }
  if (dx.dtype != DType::kFloat32) CopyConverted(dx32, DType::kFloat32, dx);
  return absl::OkStatus();
}

std::vector<ExpertKey> ExpertStore::HostedExperts() const {
  absl::MutexLock lock(&mu_);
  std::vector<ExpertKey> ids;
  for (const auto& [id, hosted] : experts_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::StatusOr<uint64_t> ExpertStore::Digest(ExpertKey expert) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::ReaderMutexLock lock(&hosted->weights_mu);
  // Readers that race here compute the same value; a writer waits for them.
  if (!hosted->digest_known.load()) {
    hosted->digest.store(hosted->master.Digest());
    hosted->digest_known.store(true);
  }
  return hosted->digest.load();
}

absl::StatusOr<ExpertSnapshot> ExpertStore::Snapshot(ExpertKey expert,
                                                     uint64_t expected_step) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::ReaderMutexLock lock(&hosted->weights_mu);
  MOE_RETURN_IF_ERROR(CheckStep(expert, hosted->step, expected_step));
  return ExpertSnapshot{hosted->master, hosted->velocity, hosted->second_moment};
}

absl::StatusOr<ExpertWeights> ExpertStore::Gradients(ExpertKey expert) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::MutexLock lock(&hosted->grads_mu);
  return hosted->grads;
}

absl::StatusOr<bool> ExpertStore::HasGradients(ExpertKey expert) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::MutexLock lock(&hosted->grads_mu);
  for (ExpertTensor which : kAllExpertTensors) {
    for (float g : hosted->grads.tensor(which).values()) {
      if (g != 0.0f) return true;
    }
  }
  return false;
}

absl::StatusOr<ExpertWeights> ExpertStore::TakeGradients(ExpertKey expert, ExpertWeights fresh) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  ExpertWeights taken = std::move(fresh);
  const ExpertWeights& like = hosted->master;
  bool reusable = true;
  for (ExpertTensor which : kAllExpertTensors) {
    reusable = reusable && taken.tensor(which).shape() == like.tensor(which).shape();
  }
  if (reusable) {
    for (ExpertTensor which : kAllExpertTensors) {
      absl::Span<float> values = taken.tensor(which).mutable_values();
      std::fill(values.begin(), values.end(), 0.0f);
    }
  } else {
    taken = ExpertWeights::Zeros(options_.model);
  }
  absl::MutexLock lock(&hosted->grads_mu);
  std::swap(taken, hosted->grads);
  return taken;
}

absl::Status ExpertStore::RestoreGradients(ExpertKey expert, const ExpertWeights& grads) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::MutexLock lock(&hosted->grads_mu);
  for (ExpertTensor which : kAllExpertTensors) {
    absl::Span<float> dst = hosted->grads.tensor(which).mutable_values();
    absl::Span<const float> src = grads.tensor(which).values();
    for (size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
  }
  return absl::OkStatus();
}

absl::Status ExpertStore::ComputeUpdate(ExpertKey expert, const OptimizerOptions& optimizer,
                                        const UpdateStep& update, const ExpertTensorSpans& grads,
                                        ExpertSnapshot& updated) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  const int state = OptimizerStateTensors(optimizer.type);
  absl::ReaderMutexLock lock(&hosted->weights_mu);
  if ((state >= 1 && !hosted->velocity) || (state >= 2 && !hosted->second_moment)) {
    return absl::FailedPreconditionError(
        absl::StrCat(expert.ToString(), ": the optimizer's state is missing"));
  }
  bool finite = true;
  auto shaped = [](FloatTensor& out, const FloatTensor& like) {
    if (out.shape() != like.shape()) out = FloatTensor(like.shape());
  };
  if (state >= 1 && !updated.velocity) updated.velocity.emplace();
  if (state < 1) updated.velocity.reset();
  if (state >= 2 && !updated.second_moment) updated.second_moment.emplace();
  if (state < 2) updated.second_moment.reset();
  for (size_t i = 0; i < std::size(kAllExpertTensors); ++i) {
    const ExpertTensor which = kAllExpertTensors[i];
    const FloatTensor& w = hosted->master.tensor(which);
    if (grads[i].size() != w.values().size()) {
      return absl::InvalidArgumentError(absl::StrCat(expert.ToString(), ": ", grads[i].size(),
                                                     " gradient values for a tensor of ",
                                                     w.values().size()));
    }
    FloatTensor& new_w = updated.weights.tensor(which);
    shaped(new_w, w);
    absl::Span<const float> m, v;
    absl::Span<float> new_m, new_v;
    if (state >= 1) {
      m = hosted->velocity->tensor(which).values();
      FloatTensor& out = updated.velocity->tensor(which);
      shaped(out, w);
      new_m = out.mutable_values();
    }
    if (state >= 2) {
      v = hosted->second_moment->tensor(which).values();
      FloatTensor& out = updated.second_moment->tensor(which);
      shaped(out, w);
      new_v = out.mutable_values();
    }
    finite &= OptimizerUpdate(optimizer, update, grads[i], w.values(), m, v, new_w.mutable_values(),
                              new_m, new_v);
  }
  if (!finite) {
    // Never installed: a NaN or Inf weight would poison every answer.
    return absl::OutOfRangeError(absl::StrCat(
        expert.ToString(), ": the update has a non-finite value (the summed gradient or the ",
        "learning rate ", update.learning_rate, " overflowed)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ExpertStore::Step(ExpertKey expert) const {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  absl::ReaderMutexLock lock(&hosted->weights_mu);
  return hosted->step;
}

absl::Status ExpertStore::SwapInWeights(ExpertKey expert, ExpertSnapshot& updated, uint64_t step) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, Find(expert));
  for (ExpertTensor which : kAllExpertTensors) {
    if (updated.weights.tensor(which).shape() != hosted->master.tensor(which).shape()) {
      return absl::InvalidArgumentError(
          absl::StrCat(expert.ToString(), ": updated weights of another shape"));
    }
  }
  absl::MutexLock lock(&hosted->weights_mu);
  // The kernel reads the master weights through `hosted->master` (the same
  // object, new buffers) and re-reads them in ReloadWeights.
  std::swap(hosted->master, updated.weights);
  if (updated.velocity) std::swap(hosted->velocity, updated.velocity);
  if (updated.second_moment) std::swap(hosted->second_moment, updated.second_moment);
  hosted->step = step;
  hosted->digest_known.store(false);
  return hosted->kernel->ReloadWeights();
}

absl::Status ExpertStore::AddExpert(ExpertKey expert, ExpertSnapshot snapshot, uint64_t step) {
  return AddExpertAt(expert, std::move(snapshot), step);
}

absl::Status ExpertStore::AddExpertAt(ExpertKey expert, ExpertSnapshot snapshot, uint64_t step) {
  MOE_RETURN_IF_ERROR(CheckExpertKey(options_.model, expert));
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Hosted> hosted, MakeHosted(std::move(snapshot)));
  hosted->step = step;
  absl::MutexLock lock(&mu_);
  if (!experts_.emplace(expert, std::move(hosted)).second) {
    return absl::AlreadyExistsError(
        absl::StrCat(expert.ToString(), ": already hosted by ", options_.server_name));
  }
  return absl::OkStatus();
}

absl::Status ExpertStore::RemoveExpert(ExpertKey expert) {
  MOE_RETURN_IF_ERROR(CheckHosted(expert));
  absl::MutexLock lock(&mu_);
  experts_.erase(expert);
  return absl::OkStatus();
}

}  // namespace moe::expert
