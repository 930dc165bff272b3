// The router's versioned state: its placement (installed by a placement
// change, or learnt from the servers) and its gate (changed by a training
// step's commit). The request paths are in router.cc.
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/optimizer.h"
#include "common/placement_proto.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "router_service/on_every_server.h"
#include "router_service/router.h"  // IWYU pragma: associated

namespace moe::router {
void Router::Refresh(int placement_from, int gate_from, absl::AnyInvocable<void() &&> then) {
  {
    absl::MutexLock lock(&refresh_mu_);
    after_refresh_.push_back(std::move(then));
    if (refreshing_) return;
    refreshing_ = true;
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  // Then: the waiting calls go on, and the refresh is over.
  auto finish = [this] {
    std::vector<absl::AnyInvocable<void() &&>> waiting;
    {
      absl::MutexLock lock(&refresh_mu_);
      waiting.swap(after_refresh_);
    }
    for (auto& w : waiting) Run(std::move(w));
    // Last: the destructor waits for this.
    absl::MutexLock lock(&refresh_mu_);
    refreshing_ = false;
  };
  auto learn_gate = [this, gate_from, deadline, finish]() mutable {
    if (gate_from < 0) {
      finish();
      return;
    }
    LearnGate(gate_from, placement()->value.num_servers(), deadline, std::move(finish));
  };
  if (placement_from < 0) {
    learn_gate();
    return;
  }
  client_.Info(placement_from, deadline,
               [this, placement_from, learn_gate](absl::StatusOr<v1::InfoResponse> info) mutable {
                 const absl::Status adopted = info.ok() ? AdoptReported(*info) : info.status();
                 if (!adopted.ok()) {
                   MOE_LOG(WARNING, "learning the placement from server ", placement_from, ": ",
                           adopted.message());
                 }
                 learn_gate();
               });
}

void Router::LearnGate(int from, int tries, absl::Time deadline,
                       absl::AnyInvocable<void() &&> then) {
  client_.GetGate(from, deadline,
                  [this, from, tries, deadline,
                   then = std::move(then)](absl::StatusOr<v1::GetGateResponse> gate) mutable {
                    const absl::Status adopted = gate.ok() ? AdoptGate(*gate) : gate.status();
                    if (!adopted.ok()) {
                      MOE_LOG(WARNING, "learning the gate from server ", from, ": ",
                              adopted.message());
                    }
                    // A server that committed its step on a peer's word
                    // holds no gate of it: the next one may.
                    if (gate.ok() || tries <= 1 || absl::Now() >= deadline) {
                      std::move(then)();
                      return;
                    }
                    LearnGate((from + 1) % placement()->value.num_servers(), tries - 1, deadline,
                              std::move(then));
                  });
}

absl::Status Router::AdoptGate(const v1::GetGateResponse& response) {
  const GateSnapshot now = gate();
  if (response.step() <= now->version) return absl::OkStatus();
  const ModelConfig& model = options_.model;
  auto decode = [&](const v1::Tensor& tensor,
                    absl::string_view name) -> absl::StatusOr<FloatTensor> {
    const TensorSpec spec{name, model.gate_shape(), {"num_layers x d_model", "gate width"}};
    MOE_ASSIGN_OR_RETURN(const ConstTensorView view, DecodeTensor(tensor, spec));
    if (view.dtype != DType::kFloat32) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": must be fp32"));
    }
    return ToFloatTensor(view);
  };
  MOE_ASSIGN_OR_RETURN(FloatTensor next, decode(response.gate(), "gate"));
  FloatTensor velocity(next.shape()), second(next.shape());
  if (response.has_gate_velocity()) {
    MOE_ASSIGN_OR_RETURN(velocity, decode(response.gate_velocity(), "gate_velocity"));
  }
  if (response.has_gate_second_moment()) {
    MOE_ASSIGN_OR_RETURN(second, decode(response.gate_second_moment(), "gate_second_moment"));
  }
  absl::MutexLock lock(&gate_mu_);
  MOE_ASSIGN_OR_RETURN(const GateSnapshot installed,
                       gate_.InstallIf(now->version, std::move(next), response.step()));
  gate_velocity_ = std::move(velocity);
  gate_second_moment_ = std::move(second);
  MOE_LOG(INFO, "learnt the gate of step ", installed->version, " from the servers");
  return absl::OkStatus();
}

absl::Status Router::AdoptServersGate(absl::Time deadline) {
  const int num_servers = placement()->value.num_servers();
  const std::vector<absl::StatusOr<v1::GetGateResponse>> gates = OnEveryServer<v1::GetGateResponse>(
      num_servers, [&](int s, auto done) { client_.GetGate(s, deadline, std::move(done)); });
  const v1::GetGateResponse* newest = nullptr;
  for (const auto& g : gates) {
    if (g.ok() && (newest == nullptr || g->step() > newest->step())) newest = &*g;
  }
  if (newest == nullptr || newest->step() <= gate()->version) return absl::OkStatus();
  return AdoptGate(*newest);
}

absl::Status Router::AdoptReported(const v1::InfoResponse& info) {
  const PlacementSnapshot now = placement();
  if (info.placement_epoch() <= now->version) return absl::OkStatus();
  if (options_.cluster.servers.empty()) {
    return absl::FailedPreconditionError("this router knows no server names");
  }
  MOE_ASSIGN_OR_RETURN(Placement next, PlacementFromProto(info.placement(), options_.model,
                                                          options_.cluster, "placement"));
  MOE_ASSIGN_OR_RETURN(PlacementSnapshot installed,
                       InstallPlacement(std::move(next), now->version, info.placement_epoch()));
  MOE_LOG(INFO, "learnt placement epoch ", installed->version, " from server ", info.server_name());
  return absl::OkStatus();
}

absl::StatusOr<Router::PlacementSnapshot> Router::InstallPlacement(Placement next) {
  const PlacementSnapshot now = placement_.Get();
  return InstallPlacement(std::move(next), now->version, now->version + 1);
}

absl::StatusOr<Router::PlacementSnapshot> Router::InstallPlacement(Placement next,
                                                                   uint64_t expected,
                                                                   uint64_t epoch) {
  const PlacementSnapshot current = placement_.Get();
  const Placement& now = current->value;
  bool same_shape =
      next.num_servers() == now.num_servers() && next.num_layers() == now.num_layers();
  for (int l = 0; same_shape && l < now.num_layers(); ++l) {
    same_shape = next.num_experts(l) == now.num_experts(l);
  }
  if (!same_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement of ", next.num_layers(), " layer(s) of ", next.num_experts(0),
                     " experts on ", next.num_servers(), " servers; this cluster has ",
                     now.num_layers(), " of ", now.num_experts(0), " on ", now.num_servers()));
  }
  MOE_ASSIGN_OR_RETURN(PlacementSnapshot installed,
                       placement_.InstallIf(expected, std::move(next), epoch));
  MOE_LOG(INFO, "placement epoch ", installed->version, " installed");
  if (options_.on_placement) options_.on_placement(installed->version);
  return installed;
}

absl::StatusOr<Router::GateStep> Router::PrepareGateStep(const UpdateStep& update,
                                                         const FloatTensor& gradient) {
  const uint64_t step_number = update.step;
  const float learning_rate = update.learning_rate;
  GateStep step;
  step.step = step_number;
  const GateSnapshot current = gate_.Get();
  step.base_version = current->version;
  step.gate = current->value;
  absl::MutexLock lock(&gate_mu_);
  step.velocity = gate_velocity_;
  step.second_moment = gate_second_moment_;
  if (!ApplyOptimizer(options_.model.optimizer, update, gradient, step.gate, &step.velocity,
                      &step.second_moment)) {
    return absl::OutOfRangeError(absl::StrCat(
        "step ", step_number, ": the gate's update has a non-finite value (its gradient or ",
        "the learning rate ", learning_rate, " overflowed); nothing changed"));
  }
  return step;
}

Router::GateState Router::gate_state() const {
  // The gate and its state change together under gate_mu_.
  absl::MutexLock lock(&gate_mu_);
  return {gate_.Get(), gate_velocity_, gate_second_moment_};
}

void Router::CommitGateStep(GateStep step) {
  absl::MutexLock lock(&gate_mu_);
  absl::StatusOr<GateSnapshot> installed =
      gate_.InstallIf(step.base_version, std::move(step.gate), step.step);
  if (!installed.ok()) {
    // A forward met a server that had committed this step first, and the
    // router learnt this very gate from it (AdoptGate) meanwhile.
    MOE_LOG(INFO, "step ", step.step, "'s gate: ", installed.status().message());
    return;
  }
  gate_velocity_ = std::move(step.velocity);
  gate_second_moment_ = std::move(step.second_moment);
}

}  // namespace moe::router
