// The MoE layer in one process with the product's kernels and no network:
// the shared gate, then each expert's rows through its OnednnExpertKernel,
// then the combine. What the cluster is compared against in moe_loadgen
// --compare_local (the fastest local layer, not the plain-loop reference).
// Thread-safe for concurrent Forward calls.
#ifndef MOE_CLIENTS_CPP_LOCAL_MOE_LAYER_H_
#define MOE_CLIENTS_CPP_LOCAL_MOE_LAYER_H_

#include <map>
#include <memory>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/tensor.h"
#include "expert_service/onednn_expert_kernel.h"
#include "expert_service/onednn_runtime.h"

namespace moe::client {

class LocalMoeLayer {
 public:
  // `onednn_threads` 0: all cores. Kernels compute in `dtype`.
  static absl::StatusOr<std::unique_ptr<LocalMoeLayer>> Create(const ModelConfig& model,
                                                               MoeWeights weights, DType dtype,
                                                               int onednn_threads);

  // y = MoE(x), x [tokens, d_model] fp32.
  absl::StatusOr<FloatTensor> Forward(const FloatTensor& x) const;

 private:
  LocalMoeLayer() = default;

  ModelConfig model_;
  MoeWeights weights_;
  DType dtype_ = DType::kFloat32;
  std::unique_ptr<expert::OnednnRuntime> runtime_;
  std::map<int, std::unique_ptr<expert::OnednnExpertKernel>> kernels_;
};

}  // namespace moe::client

#endif  // MOE_CLIENTS_CPP_LOCAL_MOE_LAYER_H_
