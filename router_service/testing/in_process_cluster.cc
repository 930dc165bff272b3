#include "router_service/testing/in_process_cluster.h"

#include <numeric>
#include <utility>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/tensor_codec.h"
#include "expert_service/onednn_expert_kernel.h"

namespace moe::router::testing {
namespace {

expert::OnednnRuntime& Runtime() {
  static expert::OnednnRuntime* runtime = expert::OnednnRuntime::Create(1)->release();
  return *runtime;
}

}  // namespace

Placement MakePlacement(PlacementStrategy strategy, int experts, int servers) {
  switch (strategy) {
    case PlacementStrategy::kDataParallel:
      return DataParallelPlacement(experts, servers);
    case PlacementStrategy::kModelParallel:
      return ModelParallelPlacement(experts, servers);
    case PlacementStrategy::kHybrid:
      return HybridPlacement(experts, servers);
    default: {
      std::vector<double> load(experts);
      std::iota(load.begin(), load.end(), 1.0);
      return *DynamicPlacement(experts, servers, load, 0);
    }
  }
}

Placement MakePlacement(const ModelConfig& model, PlacementStrategy strategy, int servers) {
  return EveryLayer(model, MakePlacement(strategy, model.experts_per_layer(), servers));
}

expert::KernelFactory OnednnKernels(DType dtype) {
  return [dtype](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<expert::ExpertKernel>> {
    auto kernel = expert::OnednnExpertKernel::Create(w, dtype, Runtime());
    if (!kernel.ok()) return kernel.status();
    return std::unique_ptr<expert::ExpertKernel>(std::move(*kernel));
  };
}

v1::Tensor Wire(const FloatTensor& t, DType dtype) {
  v1::Tensor wire;
  EncodeFloats(t.values(), t.shape(), dtype, &wire);
  return wire;
}

FloatTensor Decoded(const v1::Tensor& t, int64_t d_model) {
  absl::StatusOr<ConstTensorView> view = DecodeTensor(t, TokenBatchSpec("t", d_model, 0));
  MOE_CHECK(view.ok(), view.status().ToString());
  return ToFloatTensor(*view);
}

InProcessCluster::InProcessCluster(const ModelConfig& m, PlacementStrategy strategy, int servers)
    : InProcessCluster(
          m,
          [&] {
            std::vector<MoeWeights> layers;
            for (int l = 0; l < m.num_layers; ++l) layers.push_back(InitAllWeights(m, l));
            return layers;
          }(),
          strategy, servers) {}

InProcessCluster::InProcessCluster(const ModelConfig& m, MoeWeights w, PlacementStrategy strategy,
                                   int servers)
    : InProcessCluster(
          m,
          [&] {
            std::vector<MoeWeights> one;
            one.push_back(std::move(w));
            return one;
          }(),
          strategy, servers) {}

namespace {

FloatTensor Gates(const ModelConfig& model, const std::vector<MoeWeights>& layers) {
  std::vector<FloatTensor> gates;
  for (const MoeWeights& layer : layers) gates.push_back(*layer.gate);
  return StackGates(model, gates);
}

}  // namespace

InProcessCluster::InProcessCluster(const ModelConfig& m, std::vector<MoeWeights> w,
                                   PlacementStrategy strategy, int servers)
    : model(m),
      layers(std::move(w)),
      weights(layers.at(0)),
      placement(MakePlacement(m, strategy, servers)),
      client(m, placement, layers, OnednnKernels()),
      router({m, Gates(m, layers)}, placement, client),
      steps({}, router, client) {}

FloatTensor InProcessCluster::KeptGateGradient() {
  const std::vector<float> kept = client.steps(0).gate_gradient();
  if (kept.empty()) return FloatTensor();
  return FloatTensor(model.gate_shape(), kept);
}

ExpertWeights InProcessCluster::SummedGradients(ExpertKey expert) {
  ExpertWeights sum = ExpertWeights::Zeros(model);
  for (int s : placement.ServersOf(expert)) {
    const ExpertWeights part = *client.store(s).Gradients(expert);
    for (ExpertTensor which : kAllExpertTensors) {
      absl::Span<float> dst = sum.tensor(which).mutable_values();
      absl::Span<const float> src = part.tensor(which).values();
      for (size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
    }
  }
  return sum;
}

absl::StatusOr<Router::ForwardResult> ForwardAndWait(Router& router, const v1::Tensor& x,
                                                     bool training, int layer) {
  absl::Notification done;
  absl::StatusOr<Router::ForwardResult> result;
  router.Forward(x, layer, training, absl::InfiniteFuture(),
                 [&](absl::StatusOr<Router::ForwardResult> r) {
                   result = std::move(r);
                   done.Notify();
                 });
  done.WaitForNotification();
  return result;
}

absl::StatusOr<Router::ForwardResult> InProcessCluster::Forward(const v1::Tensor& x, bool training,
                                                                int layer) {
  return ForwardAndWait(router, x, training, layer);
}

absl::StatusOr<v1::Tensor> InProcessCluster::Backward(uint64_t id, const v1::Tensor& dy) {
  absl::Notification done;
  absl::StatusOr<v1::Tensor> result;
  router.Backward(id, dy, absl::InfiniteFuture(), [&](absl::StatusOr<v1::Tensor> r) {
    result = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  return result;
}

absl::StatusOr<StepCoordinator::Result> InProcessCluster::Step(float learning_rate,
                                                               absl::Duration timeout) {
  return steps.Step(learning_rate, absl::Now() + timeout);
}

}  // namespace moe::router::testing
