// Training in process, the oracle of the cluster's training tests: the
// reference layer's forward and backward, then (with clipping, every
// gradient scaled by the global norm's ClipScale) the shared optimizer on
// the gate and every expert, with the state it keeps, as the cluster's Step
// applies them.
#ifndef MOE_COMMON_TESTING_REFERENCE_TRAINING_H_
#define MOE_COMMON_TESTING_REFERENCE_TRAINING_H_

#include <map>
#include <utility>

#include "common/log.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/optimizer.h"
#include "common/reference_moe.h"
#include "common/tensor.h"

namespace moe::testing {

class ReferenceTraining {
 public:
  ReferenceTraining(ModelConfig model, MoeWeights weights)
      : model_(std::move(model)),
        weights_(std::move(weights)),
        gate_velocity_({model_.d_model, model_.num_experts}),
        gate_second_({model_.d_model, model_.num_experts}) {
    for (const auto& [e, w] : weights_.experts) {
      velocity_.emplace(e, ExpertWeights::Zeros(model_));
      second_.emplace(e, ExpertWeights::Zeros(model_));
    }
  }

  struct Step {
    ReferenceForward forward;  // with the weights before the update
    ReferenceGradients grads;
  };

  // Forward on x, backward with dy, then the update with `learning_rate`.
  Step Train(const FloatTensor& x, const FloatTensor& dy, float learning_rate) {
    const ReferenceMoe reference = Layer();
    absl::StatusOr<ReferenceForward> forward = reference.Forward(x);
    MOE_CHECK(forward.ok(), forward.status().ToString());
    absl::StatusOr<ReferenceGradients> grads = reference.Backward(x, *forward, dy);
    MOE_CHECK(grads.ok(), grads.status().ToString());
    ++steps_;
    double squared = SquaredNorm(grads->params.gate->values());
    for (const auto& [e, g] : grads->params.experts) {
      for (ExpertTensor which : kAllExpertTensors) squared += SquaredNorm(g.tensor(which).values());
    }
    const UpdateStep update{learning_rate, steps_, ClipScale(model_.optimizer, squared)};
    ApplyOptimizer(model_.optimizer, update, *grads->params.gate, *weights_.gate, &gate_velocity_,
                   &gate_second_);
    for (auto& [e, w] : weights_.experts) {
      ApplyOptimizer(model_.optimizer, update, grads->params.experts.at(e), w, &velocity_.at(e),
                     &second_.at(e));
    }
    return {*std::move(forward), *std::move(grads)};
  }

  // The layer with the weights now.
  ReferenceMoe Layer() const {
    absl::StatusOr<ReferenceMoe> layer = ReferenceMoe::Create(model_, weights_);
    MOE_CHECK(layer.ok(), layer.status().ToString());
    return *std::move(layer);
  }
  const MoeWeights& weights() const { return weights_; }

 private:
  const ModelConfig model_;
  MoeWeights weights_;
  uint64_t steps_ = 0;
  FloatTensor gate_velocity_;
  FloatTensor gate_second_;
  std::map<int, ExpertWeights> velocity_;
  std::map<int, ExpertWeights> second_;
};

}  // namespace moe::testing

#endif  // MOE_COMMON_TESTING_REFERENCE_TRAINING_H_
