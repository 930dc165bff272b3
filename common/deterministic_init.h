// Deterministic initialisation: the same ModelConfig.seed gives bit-identical
// gate and expert weights in every process, whichever experts it holds, so a
// router and its servers agree without sharing a checkpoint.
//
// Scheme (docs/checkpoints.md): tensor t of MoE layer l gets id
//   2^32 l + (gate.weight = 0, experts.{e}.w1.weight = 16 + 4e,
//   .w1.bias = 17 + 4e, .w2.weight = 18 + 4e, .w2.bias = 19 + 4e,
//   .w3.weight = 2^31 + e);
// element i, counted in the checkpoint's (nn.Linear) layout, is
//   h = mix(mix(seed ^ mix(t)) + i),   mix = the SplitMix64 finaliser,
//   u = (h >> 40) / 2^24 in [0, 1),
//   value = float((2u - 1) / sqrt(fan_in)),
// PyTorch's nn.Linear default range, with fan_in = d_model for gate and w1,
// d_ff for w2, d_model for w3. Bias-free experts' biases are zero.
// Counter-based: any element is computable on its own.
// Thread-safe (pure functions).
#ifndef MOE_COMMON_DETERMINISTIC_INIT_H_
#define MOE_COMMON_DETERMINISTIC_INIT_H_

#include <cstdint>

#include "absl/types/span.h"
#include "common/expert_key.h"
#include "common/model_config.h"
#include "common/moe_weights.h"

namespace moe {

// The value of element `index` of tensor `tensor_id`, in [-bound, bound).
float InitValue(uint64_t seed, uint64_t tensor_id, uint64_t index, double bound);

FloatTensor InitGate(const ModelConfig& model, int layer = 0);
// Every layer's gate, stacked (ModelConfig::gate_shape()).
FloatTensor InitGates(const ModelConfig& model);
ExpertWeights InitExpert(const ModelConfig& model, ExpertKey expert);

// `layer`'s gate (when `with_gate`) and its listed experts.
MoeWeights InitWeights(const ModelConfig& model, absl::Span<const int> experts, bool with_gate,
                       int layer = 0);
// `layer`'s gate and every expert.
MoeWeights InitAllWeights(const ModelConfig& model, int layer = 0);

}  // namespace moe

#endif  // MOE_COMMON_DETERMINISTIC_INIT_H_
