// The parameters of the MoE layer, in the layout the math uses: inputs on
// rows, outputs on columns (x W, as in DESIGN.md). Checkpoints store the
// transposes, in PyTorch nn.Linear layout (docs/checkpoints.md).
// Also used for gradients, which have the same shapes. Thread-compatible.
#ifndef MOE_COMMON_MOE_WEIGHTS_H_
#define MOE_COMMON_MOE_WEIGHTS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "common/model_config.h"
#include "common/tensor.h"

namespace moe {

// The tensors of an expert, in checkpoint and digest order. W3 exists only
// in gated SiLU experts; elsewhere it is an empty tensor, which every loop
// over these passes through unchanged (no bytes, no digest input).
enum class ExpertTensor { kW1, kB1, kW2, kB2, kW3 };
inline constexpr ExpertTensor kAllExpertTensors[] = {
    ExpertTensor::kW1, ExpertTensor::kB1, ExpertTensor::kW2, ExpertTensor::kB2, ExpertTensor::kW3};

// Whether experts of `model` have tensor `which`.
bool HasExpertTensor(const ModelConfig& model, ExpertTensor which);
// Its shape in the math layout (x W: W1 and W3 [d_model, d_ff]).
// REQUIRES: HasExpertTensor(model, which).
Shape ExpertTensorShape(const ModelConfig& model, ExpertTensor which);

// ReLU experts: Expert(x) = ReLU(x W1 + b1) W2 + b2.
// Gated SiLU experts: Expert(x) = (SiLU(x W1 + b1) * (x W3)) W2 + b2, with
// b1 and b2 zero (bias-free).
struct ExpertWeights {
  FloatTensor w1;  // [d_model, d_ff]
  FloatTensor b1;  // [d_ff]
  FloatTensor w2;  // [d_ff, d_model]
  FloatTensor b2;  // [d_model]
  FloatTensor w3;  // [d_model, d_ff] in gated SiLU experts, else empty

  bool gated() const { return w3.num_elements() > 0; }

  FloatTensor& tensor(ExpertTensor which);
  const FloatTensor& tensor(ExpertTensor which) const;

  // Zero-filled tensors of the model's shapes (for gradient accumulators).
  static ExpertWeights Zeros(const ModelConfig& model);
  // ArrayDigest64 (common/digest.h) over the fp32 bytes of w1, b1, w2, b2,
  // w3, in that order.
  uint64_t Digest() const;
};

// Sets b1 and b2 to zero (bias-free experts' gradients).
void ZeroBiases(ExpertWeights& weights);

// One MoE layer's parameters (a model of several layers has one per layer).
struct MoeWeights {
  // The layer they are of (checkpoint names and initial values differ).
  int layer = 0;
  // W_g [d_model, num_experts]; absent when a process holds only experts.
  std::optional<FloatTensor> gate;
  // The experts this process holds, by id.
  std::map<int, ExpertWeights> experts;
};

// Layer `layer`'s W_g [d_model, num_experts] within the stacked gates of
// every layer (ModelConfig::gate_shape()): a view, no copy.
// REQUIRES: gates has gate_shape(), 0 <= layer < num_layers.
absl::Span<const float> GateOfLayer(const ModelConfig& model, absl::Span<const float> gates,
                                    int layer);
absl::Span<float> GateOfLayer(const ModelConfig& model, absl::Span<float> gates, int layer);
// The stacked gates as one MoeWeights per layer holding only its gate
// (copies: for writing checkpoints).
std::vector<MoeWeights> SplitGates(const ModelConfig& model, const FloatTensor& gates);
// One gate per layer, in layer order, stacked. REQUIRES: num_layers gates
// of [d_model, num_experts].
FloatTensor StackGates(const ModelConfig& model, const std::vector<FloatTensor>& gates);

}  // namespace moe

#endif  // MOE_COMMON_MOE_WEIGHTS_H_
