// ExpertClient over real expert servers' logic in this process: per server,
// an ExpertStore with the experts its placement gives it and the
// ExpertDispatcher (validation, kernels, training state, the two-phase
// step), called on a compute pool instead of over a socket; replica groups
// sum their gradients through ring all-reduces over LoopbackRingLinks. Also
// fails on command (Kill/Revive), like a server that died. For router
// tests. Thread-safe.
#ifndef MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_EXPERT_CLIENT_H_
#define MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_EXPERT_CLIENT_H_

#include <atomic>
#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/compute_pool.h"
#include "common/moe_weights.h"
#include "common/placement.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/loopback_ring_link.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_store.h"
#include "expert_service/lease_table.h"
#include "expert_service/step_executor.h"
#include "prometheus/registry.h"
#include "router_service/expert_client.h"

namespace moe::router::testing {

class InProcessExpertClient : public ExpertClient {
 public:
  // Each server hosts the experts `placement` gives it, with weights from
  // `weights` (all experts) and kernels from `kernel_factory`.
  // `layers`: each layer's weights, in layer order (every expert the
  // placement places).
  InProcessExpertClient(const ModelConfig& model, const Placement& placement,
                        absl::Span<const MoeWeights> layers, expert::KernelFactory kernel_factory);
  // A one-layer model's.
  InProcessExpertClient(const ModelConfig& model, const Placement& placement,
                        const MoeWeights& weights, expert::KernelFactory kernel_factory)
      : InProcessExpertClient(model, placement, absl::MakeConstSpan(&weights, 1),
                              std::move(kernel_factory)) {}
  ~InProcessExpertClient() override;

  void Forward(int server, const v1::DispatchRequest& request, absl::string_view rows,
               ForwardDone done) override;
  void Backward(int server, const v1::BackwardDispatchRequest& request,
                BackwardDone done) override;
  // Counted (cancels()), not acted on: in-process calls run to the end.
  void CancelForward(int server, uint64_t sequence_id) override;
  int cancels() const { return cancels_.load(); }
  // Forward calls made.
  int forwards() const { return forwards_.load(); }
  // The step calls run on the server's own step thread, as over gRPC.
  void PrepareStep(int server, const v1::PrepareStepRequest& request, absl::Time deadline,
                   UnaryDone<v1::PrepareStepResponse> done) override;
  void CommitStep(int server, const v1::CommitStepRequest& request, absl::Time deadline,
                  UnaryDone<v1::CommitStepResponse> done) override;
  void SaveExperts(int server, const v1::SaveExpertsRequest& request, absl::Time deadline,
                   UnaryDone<v1::SaveExpertsResponse> done) override;
  // The in-process cluster keeps its placement: refused.
  void PreparePlacement(int server, const v1::PreparePlacementRequest& request, absl::Time deadline,
                        UnaryDone<v1::PreparePlacementResponse> done) override;
  void CommitPlacement(int server, const v1::CommitPlacementRequest& request, absl::Time deadline,
                       UnaryDone<v1::CommitPlacementResponse> done) override;
  void AbortPlacement(int server, const v1::AbortPlacementRequest& request, absl::Time deadline,
                      UnaryDone<v1::AbortPlacementResponse> done) override;
  void AcquireLease(int server, const v1::AcquireLeaseRequest& request, absl::Time deadline,
                    UnaryDone<v1::AcquireLeaseResponse> done) override;
  void AbortStep(int server, const v1::AbortStepRequest& request, absl::Time deadline,
                 UnaryDone<v1::AbortStepResponse> done) override;
  void Info(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) override;
  void GetGate(int server, absl::Time deadline, UnaryDone<v1::GetGateResponse> done) override;
  void AddGateGradient(int server, const v1::AddGateGradientRequest& request, absl::Time deadline,
                       UnaryDone<v1::AddGateGradientResponse> done) override;
  void UpdateStep(int server, const v1::UpdateStepRequest& request, absl::Time deadline,
                  UnaryDone<v1::UpdateStepResponse> done) override;
  bool IsHealthy(int server) const override;

  // A killed server answers UNAVAILABLE until revived (its state is kept)
  // and reports unhealthy; a silently broken one answers UNAVAILABLE while
  // still looking healthy (the router learns only from the failure).
  void Kill(int server);
  void BreakSilently(int server);
  void Revive(int server);
  // A stalled server holds calls unanswered (like a SIGSTOPped process)
  // until Unstall, which then serves them.
  void Stall(int server);
  void Unstall(int server);
  // The next `n` CommitSteps to `server` are lost on the way (UNAVAILABLE;
  // the server never hears them), as when the router dies mid-commit.
  void LoseCommits(int server, int n) { servers_.at(server)->lost_commits = n; }
  expert::ExpertStore& store(int server) { return *servers_.at(server)->store; }
  expert::StepExecutor& steps(int server) { return *servers_.at(server)->steps; }
  expert::ExpertDispatcher& dispatcher(int server) { return *servers_.at(server)->dispatcher; }
  // The link server `server` sends its ring segments to `successor` on
  // (break or stall it to fail a step's all-reduce).
  allreduce::LoopbackRingLink& ring_link(int server, int successor) {
    return *servers_.at(server)->ring_links.at(successor);
  }
  // Calls that reached server `server`.
  int calls(int server) const { return servers_.at(server)->calls.load(); }
  // Every Forward that reached a server, in arrival order.
  struct Dispatched {
    uint64_t request_id;
    int server;
    ExpertKey expert;
    // Its rows were sent rounded to bf16.
    bool tokens_rounded = false;
  };
  std::vector<Dispatched> dispatched() const ABSL_LOCKS_EXCLUDED(dispatched_mu_);

 private:
  struct Server {
    std::unique_ptr<expert::ExpertStore> store;
    std::unique_ptr<allreduce::CollectiveRegistry> collectives;
    // To each successor, by server index (null where none).
    std::vector<std::unique_ptr<allreduce::LoopbackRingLink>> ring_links;
    std::unique_ptr<expert::StepExecutor> steps;
    std::unique_ptr<ComputePool> step_pool;
    std::unique_ptr<expert::ExpertDispatcher> dispatcher;
    std::atomic<bool> alive{true};
    std::atomic<bool> looks_healthy{true};
    absl::Mutex mu;
    bool stalled ABSL_GUARDED_BY(mu) = false;
    std::vector<absl::AnyInvocable<void() &&>> held ABSL_GUARDED_BY(mu);
    std::atomic<int> calls{0};
    std::atomic<int> lost_commits{0};
    expert::LeaseTable leases;
  };

  // Runs `call` on server `server`'s step thread, or answers UNAVAILABLE
  // when it is down.
  template <typename Response, typename Call>
  void RunStepCall(int server, Call call, UnaryDone<Response> done);

  std::atomic<int> cancels_{0};
  std::atomic<int> forwards_{0};
  mutable absl::Mutex dispatched_mu_;
  std::vector<Dispatched> dispatched_ ABSL_GUARDED_BY(dispatched_mu_);
  prometheus::Registry registry_;
  std::unique_ptr<expert::ExpertMetrics> metrics_;
  std::unique_ptr<ComputePool> pool_;
  std::vector<std::unique_ptr<Server>> servers_;
};

}  // namespace moe::router::testing

#endif  // MOE_ROUTER_SERVICE_TESTING_IN_PROCESS_EXPERT_CLIENT_H_
