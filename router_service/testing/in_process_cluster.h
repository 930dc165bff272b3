// A cluster in one process for tests: the router core, its step
// coordinator, and in-process expert servers (real stores, oneDNN kernels,
// rings over loopback links) behind the InProcessExpertClient. Calls block
// until answered.
#ifndef MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_CLUSTER_H_
#define MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_CLUSTER_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/moe_weights.h"
#include "common/placement.h"
#include "common/tensor.h"
#include "expert_service/expert_store.h"
#include "proto/tensor.pb.h"
#include "router_service/router.h"
#include "router_service/step_coordinator.h"
#include "router_service/testing/in_process_expert_client.h"

namespace moe::router::testing {

// A strategy's placement; DYNAMIC from a load rising with the expert id.
Placement MakePlacement(PlacementStrategy strategy, int experts, int servers);
// The same for every layer of `model` (ComputePlacement's way).
Placement MakePlacement(const ModelConfig& model, PlacementStrategy strategy, int servers);
// oneDNN kernels computing in `dtype`, on one shared runtime.
expert::KernelFactory OnednnKernels(DType dtype = DType::kFloat32);

// `t` on the wire, and back.
v1::Tensor Wire(const FloatTensor& t, DType dtype = DType::kFloat32);
FloatTensor Decoded(const v1::Tensor& t, int64_t d_model);

// One Forward through `router`, waited for.
absl::StatusOr<Router::ForwardResult> ForwardAndWait(Router& router, const v1::Tensor& x,
                                                     bool training = false, int layer = 0);

struct InProcessCluster {
  // Weights from the model's deterministic init.
  InProcessCluster(const ModelConfig& m, PlacementStrategy strategy, int servers = 3);
  // These weights (a checkpoint's: every expert and the gate).
  InProcessCluster(const ModelConfig& m, MoeWeights w, PlacementStrategy strategy, int servers = 3);
  // Each layer's weights, in layer order (m.num_layers of them).
  InProcessCluster(const ModelConfig& m, std::vector<MoeWeights> w, PlacementStrategy strategy,
                   int servers = 3);

  absl::StatusOr<Router::ForwardResult> Forward(const v1::Tensor& x, bool training = false,
                                                int layer = 0);
  absl::StatusOr<v1::Tensor> Backward(uint64_t id, const v1::Tensor& dy);
  absl::StatusOr<StepCoordinator::Result> Step(float learning_rate,
                                               absl::Duration timeout = absl::Seconds(30));
  // The gate gradient server 0 keeps for the next step, every layer's
  // stacked; an empty tensor when none was added.
  FloatTensor KeptGateGradient();
  // `expert`'s accumulated gradients, summed over its replicas.
  ExpertWeights SummedGradients(ExpertKey expert);

  ModelConfig model;
  std::vector<MoeWeights> layers;
  // Layer 0's.
  MoeWeights& weights;
  Placement placement;
  InProcessExpertClient client;
  Router router;
  StepCoordinator steps;
};

}  // namespace moe::router::testing

#endif  // MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_CLUSTER_H_
