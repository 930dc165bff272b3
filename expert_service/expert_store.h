// The experts one server hosts: their fp32 master weights, gradient
// accumulators, optimizer state and kernels, plus the training state that
// forward keeps for backward. The domain core of the expert server: no gRPC
// types. Experts can be added and removed while serving (weight transfer);
// calls in flight keep theirs alive. Thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_STORE_H_
#define MOE_EXPERT_SERVICE_EXPERT_STORE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/optimizer.h"
#include "common/tensor.h"
#include "expert_service/expert_kernel.h"
#include "expert_service/training_state.h"

namespace moe::expert {

// Makes the kernel of one expert; `master` outlives the kernel.
using KernelFactory = std::function<absl::StatusOr<std::unique_ptr<ExpertKernel>>(
    const ExpertWeights& master)>;

// A copy of one expert's state, for weight transfer.
struct ExpertSnapshot {
  ExpertWeights weights;
  // The optimizer's state (OptimizerStateTensors): the momentum buffers of
  // SGD with momentum, or AdamW's exp_avg; and AdamW's exp_avg_sq.
  std::optional<ExpertWeights> velocity;
  std::optional<ExpertWeights> second_moment;
};

// Read-only spans over an expert's four tensors, in kAllExpertTensors order
// (gradients summed in a fused all-reduce buffer, say).
using ExpertTensorSpans = std::array<absl::Span<const float>, std::size(kAllExpertTensors)>;

class ExpertStore {
 public:
  // An unversioned call: runs on whatever weights are there.
  static constexpr uint64_t kAnyStep = ~uint64_t{0};

  struct Options {
    ModelConfig model;
    // This server's name, for messages.
    std::string server_name;
    TrainingStateStore::Options training;
    // The step the experts it starts with were committed at (a sharded
    // checkpoint's; 0: initial weights).
    uint64_t loaded_step = 0;
  };

  static absl::StatusOr<std::unique_ptr<ExpertStore>> Create(
      Options options, std::map<ExpertKey, ExpertWeights> experts, KernelFactory kernel_factory);
  // The same with the optimizer's state where a checkpoint had it (zeros
  // elsewhere).
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Create(
      Options options, std::map<ExpertKey, ExpertSnapshot> experts, KernelFactory kernel_factory);

  const ModelConfig& model() const { return options_.model; }
  // The dtype the kernels compute in (from the factory's kernels; fp32 when
  // nothing is hosted).
  DType compute_dtype() const;

  // y = Expert_e(x). x is a validated [rows, d_model] batch in fp32 or bf16;
  // y has x's shape and dtype (converted if the kernel computes in the
  // other). With `training`, keeps x and the activations under
  // (request_id, expert) for Backward.
  // With `expected_step` (not kAnyStep), FAILED_PRECONDITION unless the
  // expert's weights are those committed at that step: checked under the
  // same lock as the kernel runs, so a commit never slips in between.
  // A batch of more than kRowsPerBlock rows runs in blocks of that many;
  // before each block after the first, `keep_going` (if set) may stop the
  // work: its error is returned and nothing is kept.
  static constexpr int64_t kRowsPerBlock = 1024;
  absl::Status Forward(ExpertKey expert, const ConstTensorView& x, const TensorView& y,
                       bool training, uint64_t request_id, absl::Time now,
                       uint64_t expected_step = kAnyStep,
                       const std::function<absl::Status()>& keep_going = nullptr);

  // dx = dL/dx from dy = dL/d(output) for the rows of the training forward
  // (request_id, expert); adds the weight gradients to the accumulators.
  // dx has dy's shape and dtype. NOT_FOUND for an unknown or expired id.
  absl::Status Backward(ExpertKey expert, uint64_t request_id, const ConstTensorView& dy,
                        const TensorView& dx, absl::Time now, uint64_t expected_step = kAnyStep);

  // Ascending ids of the hosted experts.
  std::vector<ExpertKey> HostedExperts() const ABSL_LOCKS_EXCLUDED(mu_);
  // Digest of a hosted expert's master weights.
  absl::StatusOr<uint64_t> Digest(ExpertKey expert) const;
  // The step its weights were committed at (0: as loaded).
  absl::StatusOr<uint64_t> Step(ExpertKey expert) const;
  // With `expected_step` (not kAnyStep): FAILED_PRECONDITION unless the
  // weights are those committed at that step, checked under the lock the
  // copy is made under.
  absl::StatusOr<ExpertSnapshot> Snapshot(ExpertKey expert,
                                          uint64_t expected_step = kAnyStep) const;
  // A copy of the accumulated gradients (for tests and the step protocol).
  absl::StatusOr<ExpertWeights> Gradients(ExpertKey expert) const;
  // Whether any accumulated gradient is non-zero (a backward ran since the
  // last step took them).
  absl::StatusOr<bool> HasGradients(ExpertKey expert) const;
  // The training step's operations on one expert. TakeGradients moves the
  // accumulated gradients out (leaving zeros: backward calls during the step
  // count for the next one), swapping in `fresh` zero-filled when it has the
  // model's shapes (buffers of an earlier step, already mapped), else new
  // zeros; RestoreGradients adds them back (an aborted
  // step: exact when nothing was added meanwhile, and nothing is lost when
  // something was).
  absl::StatusOr<ExpertWeights> TakeGradients(ExpertKey expert, ExpertWeights fresh = {});
  absl::Status RestoreGradients(ExpertKey expert, const ExpertWeights& grads);
  // Writes the optimizer's update of the hosted weights (and its state)
  // with `grads` into `updated`, whose buffers are reused when they have
  // the model's shapes; the hosted expert is unchanged. One pass: nothing
  // is copied first. OUT_OF_RANGE when a result is not finite.
  absl::Status ComputeUpdate(ExpertKey expert, const OptimizerOptions& optimizer,
                             const UpdateStep& update, const ExpertTensorSpans& grads,
                             ExpertSnapshot& updated) const;
  // Installs `updated` as the weights committed at `step` by swapping
  // buffers with the hosted expert (between kernel calls; no copy) and
  // reloads the kernel; `updated` gets the old weights (reusable by the next
  // ComputeUpdate).
  absl::Status SwapInWeights(ExpertKey expert, ExpertSnapshot& updated, uint64_t step);

  // Starts hosting `expert`, as committed at `step`; ALREADY_EXISTS if it
  // is hosted.
  absl::Status AddExpert(ExpertKey expert, ExpertSnapshot snapshot, uint64_t step = 0)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Stops hosting `expert`; calls in flight finish first.
  absl::Status RemoveExpert(ExpertKey expert) ABSL_LOCKS_EXCLUDED(mu_);

  // INVALID_ARGUMENT out of range, NOT_FOUND when not hosted here.
  absl::Status CheckHosted(ExpertKey expert) const ABSL_LOCKS_EXCLUDED(mu_);

  TrainingStateStore& training_state() { return training_; }

 private:
  struct Hosted;

  ExpertStore(Options options, KernelFactory kernel_factory)
      : options_(std::move(options)),
        kernel_factory_(std::move(kernel_factory)),
        training_(options_.training) {}

  absl::StatusOr<std::shared_ptr<Hosted>> MakeHosted(ExpertSnapshot snapshot) const;
  absl::Status AddExpertAt(ExpertKey expert, ExpertSnapshot snapshot, uint64_t step)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<std::shared_ptr<Hosted>> Find(ExpertKey expert) const ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  const KernelFactory kernel_factory_;
  TrainingStateStore training_;
  mutable absl::Mutex mu_;
  // shared_ptr: a call in flight keeps its expert alive across RemoveExpert.
  absl::flat_hash_map<ExpertKey, std::shared_ptr<Hosted>> experts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_STORE_H_
