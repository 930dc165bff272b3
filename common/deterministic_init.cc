#include "common/deterministic_init.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moe {
namespace {

uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

uint64_t LayerBase(int layer) { return static_cast<uint64_t>(layer) << 32; }

uint64_t ExpertTensorId(ExpertKey expert, int which) {
  return LayerBase(expert.layer) + 16 + 4 * static_cast<uint64_t>(expert.expert) + which;
}

// W3 came later than the four above: its ids sit above every theirs.
uint64_t W3TensorId(ExpertKey expert) {
  return LayerBase(expert.layer) + (uint64_t{1} << 31) + static_cast<uint64_t>(expert.expert);
}

// Fills an [in, out] matrix whose checkpoint layout is [out, in].
FloatTensor InitTransposed(uint64_t seed, uint64_t tensor_id, int64_t in,
                           int64_t out, double bound) {
  FloatTensor t({in, out});
  absl::Span<float> values = t.mutable_values();
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      values[i * out + o] = InitValue(seed, tensor_id, o * in + i, bound);
    }
  }
  return t;
}

FloatTensor InitVector(uint64_t seed, uint64_t tensor_id, int64_t size,
                       double bound) {
  FloatTensor t({size});
  absl::Span<float> values = t.mutable_values();
  for (int64_t i = 0; i < size; ++i) {
    values[i] = InitValue(seed, tensor_id, i, bound);
  }
  return t;
}

}  // namespace

float InitValue(uint64_t seed, uint64_t tensor_id, uint64_t index, double bound) {
  const uint64_t h = Mix(Mix(seed ^ Mix(tensor_id)) + index);
  const double u = static_cast<double>(h >> 40) / static_cast<double>(1 << 24);
  return static_cast<float>((2.0 * u - 1.0) * bound);
}

FloatTensor InitGate(const ModelConfig& model, int layer) {
  return InitTransposed(model.seed, LayerBase(layer), model.d_model, model.gate_width(),
                        1.0 / std::sqrt(static_cast<double>(model.d_model)));
}

ExpertWeights InitExpert(const ModelConfig& model, ExpertKey expert) {
  const double bound1 = 1.0 / std::sqrt(static_cast<double>(model.d_model));
  const double bound2 = 1.0 / std::sqrt(static_cast<double>(model.d_ff));
  ExpertWeights weights{
      InitTransposed(model.seed, ExpertTensorId(expert, 0), model.d_model, model.d_ff, bound1),
      InitVector(model.seed, ExpertTensorId(expert, 1), model.d_ff, bound1),
      InitTransposed(model.seed, ExpertTensorId(expert, 2), model.d_ff, model.d_model, bound2),
      InitVector(model.seed, ExpertTensorId(expert, 3), model.d_model, bound2),
  };
  if (model.gated()) {
    weights.w3 = InitTransposed(model.seed, W3TensorId(expert), model.d_model, model.d_ff, bound1);
  }
  if (model.bias_free()) ZeroBiases(weights);
  return weights;
}

FloatTensor InitGates(const ModelConfig& model) {
  FloatTensor gates(model.gate_shape());
  for (int l = 0; l < model.num_layers; ++l) {
    const FloatTensor gate = InitGate(model, l);
    const absl::Span<float> rows = GateOfLayer(model, gates.mutable_values(), l);
    std::copy(gate.values().begin(), gate.values().end(), rows.begin());
  }
  return gates;
}

MoeWeights InitWeights(const ModelConfig& model, absl::Span<const int> experts, bool with_gate,
                       int layer) {
  MoeWeights weights;
  weights.layer = layer;
  if (with_gate) weights.gate = InitGate(model, layer);
  for (int e : experts) weights.experts.emplace(e, InitExpert(model, ExpertKey(layer, e)));
  return weights;
}

MoeWeights InitAllWeights(const ModelConfig& model, int layer) {
  std::vector<int> all(model.experts_per_layer());
  std::iota(all.begin(), all.end(), 0);
  return InitWeights(model, all, /*with_gate=*/true, layer);
}

}  // namespace moe
