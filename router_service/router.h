// The router's core, without gRPC types: validates a batch, gates it (the
// shared gate of common/gating.h), plans the expert calls, sends them
// through the ExpertClient seam, fails over to another replica when a
// server is unavailable, and combines the answers by token. Training
// forwards keep what Backward needs; Backward sends each expert its share of
// dL/dy, adds the gate path, and accumulates the gate's gradient here.
// Thread-safe; calls are asynchronous and complete through callbacks.
#ifndef MOE_ROUTER_SERVICE_ROUTER_H_
#define MOE_ROUTER_SERVICE_ROUTER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "common/deadline_timer.h"
#include "common/gating.h"
#include "common/model_config.h"
#include "common/optimizer.h"
#include "common/placement.h"
#include "common/tensor.h"
#include "common/versioned.h"
#include "proto/tensor.pb.h"
#include "router_service/dispatch_overlap.h"
#include "router_service/expert_client.h"
#include "router_service/load_stats.h"
#include "router_service/replica_picker.h"
#include "router_service/routing_sample.h"

namespace moe::router {

// Lets the caller of Router::Forward give up on it (its client cancelled).
// Shared by the caller and the router. Thread-safe.
class Cancellation {
 public:
  // Idempotent. A call not yet answered ends with CANCELLED, and the expert
  // servers drop its work that has not started.
  void Cancel() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class Router;
  // Runs `hook` at once if already cancelled, else on Cancel().
  void OnCancel(absl::AnyInvocable<void() &&> hook) ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  absl::AnyInvocable<void() &&> hook_ ABSL_GUARDED_BY(mu_);
};

class Router {
 public:
  struct Options {
    ModelConfig model;
    // Every layer's W_g, stacked ([num_layers * d_model, num_experts],
    // ModelConfig::gate_shape()), as the router starts, and the committed
    // step it is of (a sharded checkpoint's; 0: initial).
    FloatTensor gate;
    uint64_t gate_step = 0;
    // Its optimizer state, from the same checkpoint (zeros when absent).
    std::optional<FloatTensor> gate_velocity;
    std::optional<FloatTensor> gate_second_moment;
    // The servers by name, to read the placements they report (a router
    // that meets servers at a newer placement epoch learns it from them);
    // no servers: never learnt.
    ClusterConfig cluster;
    // Training forwards wait this long for their Backward.
    absl::Duration training_ttl = absl::Seconds(60);
    // Bytes of router-side training state kept at most.
    int64_t training_max_bytes = int64_t{1} << 30;
    // Where combine and backward bookkeeping run; null: on the thread that
    // delivered the last answer.
    ComputePool* pool = nullptr;
    // Where served forwards are counted (per expert, per server); may be
    // null.
    LoadStats* load_stats = nullptr;
    // Where served forwards' routing is sampled (co-activation for
    // Rebalance); may be null.
    RoutingSample* routing_sample = nullptr;
    // Called once per group re-sent to another replica (for metrics).
    std::function<void()> on_failover;
    // Called once per answer refused for another version (for metrics).
    std::function<void()> on_stale;
    // Called with each placement epoch installed (for metrics).
    std::function<void(uint64_t epoch)> on_placement;
    // This router among several: training request ids carry `tag` (24
    // bits, in their top bits) so they are unique across routers (the expert
    // servers key training state by them) and a Backward sent to another
    // router is refused naming the one it belongs to. `name` is for people.
    uint32_t tag = 0;
    std::string name;
    // How long a replica that answered from older weights, lacks the
    // expert, or lost to a hedge is avoided.
    absl::Duration stale_ttl = absl::Seconds(5);
    // Hedging (inference forwards only, with `timer`): a group a replica has
    // not answered within three times that server's recent answer time
    // (plus 2 ms, within [hedge_min_delay, hedge_max_delay]) is also sent to
    // another replica; the first answer is taken. A zero max disables it.
    absl::Duration hedge_min_delay = absl::Milliseconds(10);
    absl::Duration hedge_max_delay = absl::Milliseconds(200);
    // Inference calls carry at most about this many bytes of token rows
    // each (micro-batches, DispatchPlanOptions::max_call_rows); 0: one call
    // per expert and replica.
    int64_t micro_batch_bytes = 0;
    // A forward whose gate is at most this many multiply-adds (tokens x
    // d_model x gate width) is gated, and its answers combined, on the
    // thread that received it rather than handed to the compute pool: below
    // this the hand-off (a wake-up on each side) costs more than the work.
    int64_t inline_forward_multiply_adds = int64_t{1} << 16;
    // Inference forwards with fp32 x send an expert's rows rounded to bf16
    // when every replica of it computes in bf16 (as its answers say): its
    // kernels round them the same way, so the answer is the same bits from
    // half the bytes. A replica that refuses them (its kernels are fp32
    // after all) gets fp32 rows again.
    bool round_tokens_for_bf16_servers = true;
    // Called once per hedge sent (for metrics).
    std::function<void()> on_hedge;
    // Called once per replica ejected for failing calls in a row
    // (ReplicaPicker's outlier ejection; for metrics).
    std::function<void()> on_eject;
    // Called after each successful forward with the time spent gating and
    // planning, waiting for the experts, and combining (for metrics).
    std::function<void(absl::Duration gate, absl::Duration fan_out, absl::Duration combine)>
        on_phases;
    // Called after each successful forward with its calls' time outside the
    // kernels and the part of it hidden under compute (dispatch_overlap.h;
    // for metrics).
    std::function<void(const DispatchOverlap&)> on_overlap;
    // Ends calls at their deadline (DEADLINE_EXCEEDED) even while expert
    // answers are outstanding; null: calls wait for every answer.
    DeadlineTimer* timer = nullptr;
  };

  using PlacementSnapshot = Versioned<Placement>::Snapshot;
  using GateSnapshot = Versioned<FloatTensor>::Snapshot;

  struct ForwardResult {
    // [num_tokens, d_model], in x's dtype.
    v1::Tensor y;
    // The placement epoch and gate version the call used, whole.
    uint64_t placement_epoch = 0;
    uint64_t gate_version = 0;
    // Training forwards: the id to pass to Backward.
    uint64_t request_id = 0;
    Routing routing;
  };
  using ForwardDone = absl::AnyInvocable<void(absl::StatusOr<ForwardResult>) &&>;
  using BackwardDone = absl::AnyInvocable<void(absl::StatusOr<v1::Tensor>) &&>;

  // `client` must outlive the router. `placement` is epoch 1; the gate
  // (options.gate) is version 0 until a step commits.
  Router(Options options, Placement placement, ExpertClient& client);
  ~Router();

  // y = MoE layer `layer`(x). `x` must stay valid until `done` runs;
  // `done` runs once. `cancellation`, if given, can end the call early.
  void Forward(const v1::Tensor& x, int layer, bool training, absl::Time deadline, ForwardDone done,
               std::shared_ptr<Cancellation> cancellation = nullptr);
  // Whether a forward of `tokens` tokens is small enough to gate, plan and
  // combine on the thread that received it (a gRPC thread) instead of
  // handing it to the pool: a thread hand-off costs more than its work.
  bool RunsWhereReceived(int64_t tokens) const;
  // dL/dx for the training forward `request_id`, from dL/dy.
  void Backward(uint64_t request_id, const v1::Tensor& grad_output, absl::Time deadline,
                BackwardDone done);

  // The gate now, with the step it was committed at (0: as loaded). A step
  // replaces it whole; a forward keeps the one it used (and its backward
  // uses that one too).
  GateSnapshot gate() const { return gate_.Get(); }
  // The gate with its optimizer state (zeros where the optimizer keeps
  // none), consistently: for a checkpoint.
  struct GateState {
    GateSnapshot gate;
    FloatTensor velocity;
    FloatTensor second_moment;
  };
  GateState gate_state() const ABSL_LOCKS_EXCLUDED(gate_mu_);
  const ModelConfig& model() const { return options_.model; }
  // The servers by name (Options::cluster).
  const ClusterConfig& cluster() const { return options_.cluster; }
  // "<name>/<tag in hex>": how answers and errors name this router.
  const std::string& identity() const { return identity_; }
  // The experts `server` holds at an older step than the cluster's, as the
  // router last saw (avoided for Options::stale_ttl after each sighting).
  std::vector<ExpertKey> StaleExperts(int server) const {
    return picker_.StaleExperts(server, absl::Now());
  }
  // Whether `server` is ejected now for failing calls in a row.
  bool Ejected(int server) const { return picker_.Ejected(server, absl::Now()); }

  // The placement now. Each request plans with the snapshot it started
  // with, failover included; InstallPlacement swaps in a new one (the next
  // epoch) for requests that start later. INVALID_ARGUMENT for a placement
  // of another cluster size or expert count.
  PlacementSnapshot placement() const { return placement_.Get(); }
  absl::StatusOr<PlacementSnapshot> InstallPlacement(Placement next);
  // The same as `epoch`, only over `expected` (FAILED_PRECONDITION naming
  // both otherwise): a placement change agreed with the servers.
  absl::StatusOr<PlacementSnapshot> InstallPlacement(Placement next, uint64_t expected,
                                                     uint64_t epoch);
  // Learns the servers' newer state: asks `placement_from` (Info; -1: no)
  // for its committed placement and `gate_from` (GetGate; -1: no) for the
  // gate of its last step (the next servers in turn when it holds none),
  // installs what is newer than this router's, then runs `then` (also when
  // nothing changed or no server answered).
  // One refresh at a time: calls meanwhile wait for it.
  void Refresh(int placement_from, int gate_from, absl::AnyInvocable<void() &&> then)
      ABSL_LOCKS_EXCLUDED(refresh_mu_);
  // GetGate from server `from`, else the next ones, up to `tries` servers.
  void LearnGate(int from, int tries, absl::Time deadline, absl::AnyInvocable<void() &&> then);
  // Installs the placement a server's Info reports when it is newer than
  // this router's; INVALID_ARGUMENT when it does not fit this cluster.
  absl::Status AdoptReported(const v1::InfoResponse& info);
  // Installs a server's committed gate (and momentum) when it is of a later
  // step than this router's.
  absl::Status AdoptGate(const v1::GetGateResponse& gate) ABSL_LOCKS_EXCLUDED(gate_mu_);
  // At start: the newest gate the servers hold, when newer than this
  // router's (a router restarted, or another one stepped). Servers that do
  // not answer by `deadline` are skipped.
  absl::Status AdoptServersGate(absl::Time deadline);

  // The gate's half of a training step. The gradient of every Backward,
  // through any router, is summed by the lease keeper (server 0:
  // AddGateGradient), whose PrepareStep answer hands it over.
  // PrepareGateStep computes the updated gate (and momentum) from it
  // aside; CommitGateStep installs them.
  struct GateStep {
    uint64_t step = 0;
    // The gate version it updates.
    uint64_t base_version = 0;
    FloatTensor gate;
    // The optimizer's state (common/optimizer.h), zeros where it keeps none.
    FloatTensor velocity;
    FloatTensor second_moment;
  };
  // `gradient`: the sum of every Backward's since the last step (zeros
  // when none). OUT_OF_RANGE when the update is not finite.
  absl::StatusOr<GateStep> PrepareGateStep(const UpdateStep& update, const FloatTensor& gradient)
      ABSL_LOCKS_EXCLUDED(gate_mu_);
  void CommitGateStep(GateStep step) ABSL_LOCKS_EXCLUDED(gate_mu_);
  // Pairs re-sent to another replica after a server was unavailable.
  int64_t failovers() const { return failovers_.load(); }
  // Groups also sent to a second replica because the first was slow.
  int64_t hedges() const { return hedges_.load(); }
  // Training forwards waiting for their Backward.
  size_t pending_training() const ABSL_LOCKS_EXCLUDED(training_mu_);

 private:
  struct ForwardCall;
  struct BackwardCall;
  struct TrainingRecord;

  // Forward, the `restarts`-th time (a restart re-runs a call that met
  // servers newer than this router was when it started).
  void Start(const v1::Tensor& x, int layer, bool training, absl::Time deadline, ForwardDone done,
             std::shared_ptr<Cancellation> cancellation, int restarts);
  static constexpr int kMaxRestarts = 2;
  // Calls that met servers still committing their step wait for them this
  // many times at most (pauses of 20 ms doubling: 620 ms in all).
  static constexpr int kMaxBehindRestarts = 5;
  // Sends group `group` of `call` to `server` (a first try, a failover or
  // a hedge). REQUIRES: the caller added `server` to the group's in_flight,
  // under call->mu with its decision to send (so that a hedge and a
  // failover never send one request to one server twice).
  void Send(std::shared_ptr<ForwardCall> call, size_t group, int server);
  // After HedgeDelay(server), sends the group to another replica too if
  // `server` has not answered it.
  void ScheduleHedge(const std::shared_ptr<ForwardCall>& call, size_t group, int server);
  absl::Duration HedgeDelay(int server) const;
  // DispatchPlanOptions::max_call_rows for rows of `x` (options'
  // micro_batch_bytes; 0: no split).
  int64_t MaxCallRows(const ConstTensorView& x) const;
  // Whether every replica of `expert` in `placement` computes in bf16 (as
  // far as its answers say).
  bool AllReplicasComputeBf16(const Placement& placement, ExpertKey expert) const;
  // `server`'s answer to `group`, sent at `sent`.
  void OnForwardReply(std::shared_ptr<ForwardCall> call, size_t group, int server, absl::Time sent,
                      absl::StatusOr<std::unique_ptr<ExpertAnswer>> reply);
  void FinishForward(std::shared_ptr<ForwardCall> call);
  // A call that met servers at another version: the whole call again when
  // this router has caught up (once it knows the newer placement), else
  // its error.
  void RetryStale(std::shared_ptr<ForwardCall> call);

  // Ends `call` with CANCELLED (unless it has ended) and cancels its expert
  // calls.
  void CancelForward(std::shared_ptr<ForwardCall> call);
  void FinishBackward(std::shared_ptr<BackwardCall> call);
  // Runs `work` on the pool if there is one, else inline.
  void Run(absl::AnyInvocable<void() &&> work);

  absl::Status KeepTraining(uint64_t request_id, std::unique_ptr<TrainingRecord> record)
      ABSL_LOCKS_EXCLUDED(training_mu_);
  // The tokens of the training forward `request_id` (NOT_FOUND as below).
  absl::StatusOr<int64_t> TrainingTokens(uint64_t request_id) const
      ABSL_LOCKS_EXCLUDED(training_mu_);
  absl::StatusOr<std::unique_ptr<TrainingRecord>> TakeTraining(uint64_t request_id)
      ABSL_LOCKS_EXCLUDED(training_mu_);

  const Options options_;
  Versioned<Placement> placement_;
  ExpertClient& client_;
  ReplicaPicker picker_;
  const std::string identity_;
  // The low 40 bits of the next training request id (the tag above them).
  std::atomic<uint64_t> next_request_id_{1};
  // Unique per router process, so transports can match answers by it.
  std::atomic<uint64_t> next_sequence_id_{1};
  std::atomic<int64_t> failovers_{0};
  std::atomic<int64_t> hedges_{0};
  // Per server: its recent Dispatch answer time in microseconds (EWMA; 0:
  // none yet), for hedging.
  std::unique_ptr<std::atomic<double>[]> answer_micros_;
  // Per server: whether its answers say it computes in bf16 (false until
  // one does), for round_tokens_for_bf16_servers.
  std::unique_ptr<std::atomic<bool>[]> computes_bf16_;

  // One Refresh at a time; the continuations waiting for it.
  absl::Mutex refresh_mu_;
  bool refreshing_ ABSL_GUARDED_BY(refresh_mu_) = false;
  std::vector<absl::AnyInvocable<void() &&>> after_refresh_ ABSL_GUARDED_BY(refresh_mu_);

  Versioned<FloatTensor> gate_;
  // The gate's optimizer state, changed with the gate (under gate_mu_).
  mutable absl::Mutex gate_mu_;
  FloatTensor gate_velocity_ ABSL_GUARDED_BY(gate_mu_);
  FloatTensor gate_second_moment_ ABSL_GUARDED_BY(gate_mu_);

  mutable absl::Mutex training_mu_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<TrainingRecord>> training_
      ABSL_GUARDED_BY(training_mu_);
  int64_t training_bytes_ ABSL_GUARDED_BY(training_mu_) = 0;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_H_
