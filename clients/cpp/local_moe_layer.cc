#include "clients/cpp/local_moe_layer.h"

#include <cstring>
#include <vector>

#include "common/bfloat16.h"
#include "common/gating.h"
#include "common/status_macros.h"

namespace moe::client {

absl::StatusOr<std::unique_ptr<LocalMoeLayer>> LocalMoeLayer::Create(const ModelConfig& model,
                                                                     MoeWeights weights,
                                                                     DType dtype,
                                                                     int onednn_threads) {
  if (!weights.gate.has_value()) return absl::InvalidArgumentError("local layer: no gate");
  auto layer = std::unique_ptr<LocalMoeLayer>(new LocalMoeLayer());
  layer->model_ = model;
  layer->weights_ = std::move(weights);
  layer->dtype_ = dtype;
  MOE_ASSIGN_OR_RETURN(layer->runtime_, expert::OnednnRuntime::Create(onednn_threads));
  for (const auto& [e, expert] : layer->weights_.experts) {
    MOE_ASSIGN_OR_RETURN(layer->kernels_[e],
                         expert::OnednnExpertKernel::Create(expert, dtype, *layer->runtime_));
  }
  return layer;
}

absl::StatusOr<FloatTensor> LocalMoeLayer::Forward(const FloatTensor& x) const {
  const int64_t tokens = x.dim(0);
  const int64_t d_model = model_.d_model;
  const Routing routing = RouteTokens(x.values(), tokens, weights_.gate->values(), model_);
  const PairIndex index = routing.pairs();
  const std::vector<std::vector<int64_t>> pairs = KeptPairsByExpert(routing);
  FloatTensor y({tokens, d_model});
  const size_t element = DTypeSize(dtype_);
  std::vector<std::byte> in, out;
  for (int e = 0; e < model_.experts_per_layer(); ++e) {
    const int64_t rows = pairs[e].size();
    if (rows == 0) continue;
    // The expert's rows, gathered once in the kernel's dtype.
    in.resize(rows * d_model * element);
    out.resize(in.size());
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x.row(index.TokenOf(pairs[e][r])).data();
      if (dtype_ == DType::kFloat32) {
        std::memcpy(in.data() + r * d_model * 4, src, d_model * 4);
      } else {
        FloatsToBf16(absl::MakeConstSpan(src, d_model),
                     absl::MakeSpan(reinterpret_cast<uint16_t*>(in.data()) + r * d_model, d_model));
      }
    }
    MOE_RETURN_IF_ERROR(kernels_.at(e)->Forward({dtype_, {rows, d_model}, in.data()},
                                                {dtype_, {rows, d_model}, out.data()}, nullptr));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = pairs[e][r];
      const float w = routing.weights[p];
      float* y_row = y.mutable_row(index.TokenOf(p)).data();
      if (dtype_ == DType::kFloat32) {
        const float* o = reinterpret_cast<const float*>(out.data()) + r * d_model;
        for (int64_t m = 0; m < d_model; ++m) y_row[m] += w * o[m];
      } else {
        const uint16_t* o = reinterpret_cast<const uint16_t*>(out.data()) + r * d_model;
        for (int64_t m = 0; m < d_model; ++m) y_row[m] += w * Bf16ToFloat(o[m]);
      }
    }
  }
  return y;
}

}  // namespace moe::client
