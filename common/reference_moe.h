// The in-process reference MoE layer: gate, top-k, capacity and every expert
// in one process, with plain loops. It is the oracle of every correctness
// test and the baseline of every benchmark: the cluster must produce what
// this produces. Forward is y[t] = sum over kept pairs (t, e) of
// weight(t, e) * Expert_e(x[t]); Backward returns dL/dx through the experts
// and through the gate (softmax and top-k renormalisation) and the
// gradients of W_g and of every expert.
// Thread-safe for concurrent const calls.
#ifndef MOE_COMMON_REFERENCE_MOE_H_
#define MOE_COMMON_REFERENCE_MOE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gating.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/tensor.h"

namespace moe {

// What one expert did in a forward pass.
struct ExpertActivations {
  // Kept pairs routed to this expert (see KeptPairsByExpert): batch rows.
  std::vector<int64_t> pairs;
  FloatTensor hidden_pre;  // [rows, activation_width()]: x W1 + b1 (| x W3)
  FloatTensor output;      // [rows, d_model] Expert(x), before gate weights
};

struct ReferenceForward {
  FloatTensor y;  // [num_tokens, d_model]
  Routing routing;
  std::vector<ExpertActivations> experts;  // [num_experts]
};

struct ReferenceGradients {
  FloatTensor dx;     // [num_tokens, d_model]
  MoeWeights params;  // dW_g and every expert's dW1, db1, dW2, db2
};

class ReferenceMoe {
 public:
  // REQUIRES nothing of `weights`: a missing gate or expert, or a wrong
  // shape, is InvalidArgument.
  static absl::StatusOr<ReferenceMoe> Create(ModelConfig model, MoeWeights weights);

  // x: [num_tokens, d_model], num_tokens >= 0.
  absl::StatusOr<ReferenceForward> Forward(const FloatTensor& x) const;

  // REQUIRES: `forward` came from Forward(x) with these weights.
  // dy: dL/dy, shaped like x.
  absl::StatusOr<ReferenceGradients> Backward(const FloatTensor& x,
                                              const ReferenceForward& forward,
                                              const FloatTensor& dy) const;

  const ModelConfig& model() const { return model_; }
  const MoeWeights& weights() const { return weights_; }

 private:
  ReferenceMoe(ModelConfig model, MoeWeights weights)
      : model_(std::move(model)), weights_(std::move(weights)) {}

  absl::Status CheckBatch(const FloatTensor& t, absl::string_view name,
                          int64_t num_tokens) const;

  ModelConfig model_;
  MoeWeights weights_;
};

}  // namespace moe

#endif  // MOE_COMMON_REFERENCE_MOE_H_
