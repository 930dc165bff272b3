#include "router_service/router.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/bfloat16.h"
#include "common/expert_key.h"
#include "common/log.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "router_service/dispatch_plan.h"
#include "router_service/row_reader.h"

namespace moe::router {
namespace {

// A training request id: the router's tag, then a counter of this many bits.
constexpr int kRequestCounterBits = 40;

int64_t ToDeadlineMicros(absl::Time deadline) {
  return deadline == absl::InfiniteFuture() ? 0 : absl::ToUnixMicros(deadline);
}

// fp32 values of a view: the view itself, or a widened copy for bf16.
absl::Span<const float> AsFloats(const ConstTensorView& view, std::unique_ptr<float[]>& storage) {
  if (view.dtype == DType::kFloat32) return view.floats();
  const size_t n = view.num_elements();
  storage.reset(new float[n]);  // not zeroed: every value is written next
  Bf16ToFloats(view.bf16s(), absl::MakeSpan(storage.get(), n));
  return absl::MakeConstSpan(storage.get(), n);
}

// Ends `call` with DEADLINE_EXCEEDED at `deadline` unless an answer ends it
// first (both race on `finished`). Returns the timer id, 0 when none.
template <typename Call>
uint64_t EndAtDeadline(DeadlineTimer* timer, absl::Time deadline, std::shared_ptr<Call> call,
                       size_t calls, absl::string_view what) {
  if (timer == nullptr || deadline == absl::InfiniteFuture()) return 0;
  return timer->Schedule(deadline, [call, calls, what]() {
    if (call->finished.exchange(true)) return;
    std::move(call->done)(absl::DeadlineExceededError(absl::StrCat(
        "deadline passed with ", call->remaining.load(), " of ", calls, " ", what)));
  });
}

}  // namespace

void Cancellation::Cancel() {
  absl::AnyInvocable<void() &&> hook;
  {
    absl::MutexLock lock(&mu_);
    if (cancelled_) return;
    cancelled_ = true;
    hook = std::move(hook_);
  }
  if (hook) std::move(hook)();
}

void Cancellation::OnCancel(absl::AnyInvocable<void() &&> hook) {
  {
    absl::MutexLock lock(&mu_);
    if (!cancelled_) {
      hook_ = std::move(hook);
      return;
    }
  }
  std::move(hook)();
}

// What Backward needs from a training forward.
struct Router::TrainingRecord {
  Routing routing;
  uint64_t placement_epoch = 0;  // the versions forward ran at, for backward
  uint64_t weights_step = 0;
  std::vector<ExpertGroup> groups;       // requests cleared: only ids and pairs
  std::vector<FloatTensor> outputs;      // Expert(x) per group, fp32
  FloatTensor x;                         // fp32 [T, d_model], for the gate path
  GateSnapshot gate;                     // the gates forward used
  int layer = 0;                         // whose gate and experts
  absl::Time expiry;
  int64_t bytes() const {
    int64_t total = x.num_elements() * 4 + routing.probs.size() * 4;
    for (const FloatTensor& o : outputs) total += o.num_elements() * 4;
    return total;
  }
};

struct Router::ForwardCall {
  ForwardDone done;
  // A server that refused a group for a newer placement epoch than the
  // call's (-1: none): where to learn it.
  std::atomic<int> newer_server{-1};
  // The same for a newer committed step (the gate to learn).
  std::atomic<int> newer_step_server{-1};
  // A server refused a group for an older step than the call's: it is
  // committing the step this router already knows (from a peer).
  std::atomic<bool> met_older_step{false};
  // What a restart needs (x stays valid until `done` runs).
  const v1::Tensor* x = nullptr;
  absl::Time deadline;
  std::shared_ptr<Cancellation> cancellation;
  int restarts = 0;
  // A server refused a group for its version and no other replica took it.
  bool stale = false;
  // Set by whichever ends the call first: the last answer or the deadline.
  std::atomic<bool> finished{false};
  uint64_t timer_id = 0;
  absl::Time start;    // Forward called
  absl::Time planned;  // gate and plan done, calls going out
  DType dtype = DType::kFloat32;
  int64_t num_tokens = 0;
  bool training = false;
  int layer = 0;
  uint64_t request_id = 0;
  GateSnapshot gate;
  PlacementSnapshot placement;
  Routing routing;
  std::unique_ptr<float[]> x32_storage;
  absl::Span<const float> x32;
  std::vector<ExpertGroup> groups;
  std::vector<std::unique_ptr<ExpertAnswer>> responses;
  std::vector<std::vector<int>> tried;  // per group: servers that failed it
  std::atomic<size_t> remaining{0};
  absl::Mutex mu;
  absl::Status status ABSL_GUARDED_BY(mu);
  // Per group (hedging, inference only): servers sent to and not yet
  // answered, and whether the group has its answer (later ones are dropped).
  std::vector<std::vector<int>> in_flight ABSL_GUARDED_BY(mu);
  std::vector<bool> answered ABSL_GUARDED_BY(mu);
  // The answered calls' times (for on_overlap).
  std::vector<CallTiming> timings ABSL_GUARDED_BY(mu);
};

struct Router::BackwardCall {
  BackwardDone done;
  absl::Time deadline;
  std::atomic<bool> finished{false};
  uint64_t timer_id = 0;
  DType dtype = DType::kFloat32;
  std::unique_ptr<TrainingRecord> record;
  std::unique_ptr<float[]> dy32_storage;
  absl::Span<const float> dy32;
  std::vector<double> d_weight;
  std::vector<v1::BackwardDispatchRequest> requests;
  std::vector<std::unique_ptr<v1::BackwardDispatchResponse>> responses;
  std::atomic<size_t> remaining{0};
  absl::Mutex mu;
  absl::Status status ABSL_GUARDED_BY(mu);
};

Router::Router(Options options, Placement placement, ExpertClient& client)
    : options_(std::move(options)),
      placement_(std::move(placement), /*version=*/1),
      client_(client),
      picker_(placement_.Get()->value.num_servers(), client),
      identity_(absl::StrCat(options_.name, "/", absl::Hex(options_.tag, absl::kZeroPad6))),
      gate_(options_.gate, options_.gate_step) {
  MOE_CHECK(options_.gate.shape() == options_.model.gate_shape());
  const int servers = placement_.Get()->value.num_servers();
  answer_micros_.reset(new std::atomic<double>[servers]);
  computes_bf16_.reset(new std::atomic<bool>[servers]);
  for (int s = 0; s < servers; ++s) {
    answer_micros_[s].store(0);
    computes_bf16_[s].store(false);
  }
  absl::MutexLock lock(&gate_mu_);
  gate_velocity_ = options_.gate_velocity.value_or(FloatTensor(options_.gate.shape()));
  gate_second_moment_ = options_.gate_second_moment.value_or(FloatTensor(options_.gate.shape()));
  MOE_CHECK(gate_velocity_.shape() == options_.gate.shape() &&
            gate_second_moment_.shape() == options_.gate.shape());
}

Router::~Router() {
  // A refresh's Info answer touches this router.
  absl::MutexLock lock(&refresh_mu_);
  refresh_mu_.Await(absl::Condition(
      +[](bool* refreshing) { return !*refreshing; }, &refreshing_));
}

void Router::Run(absl::AnyInvocable<void() &&> work) {
  if (options_.pool == nullptr) {
    std::move(work)();
    return;
  }
  // A full pool must not lose the completion: run it here instead.
  auto shared = std::make_shared<absl::AnyInvocable<void() &&>>(std::move(work));
  if (!options_.pool->Submit([shared] { std::move(*shared)(); })) std::move(*shared)();
}

bool Router::RunsWhereReceived(int64_t tokens) const {
  const ModelConfig& model = options_.model;
  return tokens >= 0 &&
         tokens <= options_.inline_forward_multiply_adds / (model.d_model * model.gate_width());
}

void Router::Forward(const v1::Tensor& x, int layer, bool training, absl::Time deadline,
                     ForwardDone done, std::shared_ptr<Cancellation> cancellation) {
  Start(x, layer, training, deadline, std::move(done), std::move(cancellation), /*restarts=*/0);
}

void Router::Start(const v1::Tensor& x, int layer, bool training, absl::Time deadline,
                   ForwardDone done, std::shared_ptr<Cancellation> cancellation, int restarts) {
  const ModelConfig& model = options_.model;
  if (absl::Status valid = CheckLayer(model, layer); !valid.ok()) {
    std::move(done)(valid);
    return;
  }
  absl::StatusOr<ConstTensorView> view =
      DecodeTensor(x, TokenBatchSpec("x", model.d_model, model.max_batch_tokens));
  if (!view.ok()) {
    std::move(done)(view.status());
    return;
  }
  auto call = std::make_shared<ForwardCall>();
  call->start = absl::Now();
  call->done = std::move(done);
  call->x = &x;
  call->deadline = deadline;
  call->cancellation = cancellation;
  call->restarts = restarts;
  call->dtype = view->dtype;
  call->num_tokens = view->rows();
  call->training = training;
  call->layer = layer;
  call->request_id =
      training ? (uint64_t{options_.tag} << kRequestCounterBits) | next_request_id_.fetch_add(1)
               : 0;
  call->x32 = AsFloats(*view, call->x32_storage);
  call->gate = gate();
  call->placement = placement();
  call->routing = RouteTokens(call->x32, call->num_tokens,
                              GateOfLayer(model, call->gate->value.values(), layer), model);
  DispatchPlanOptions plan{layer,
                           training,
                           call->request_id,
                           ToDeadlineMicros(deadline),
                           call->placement->version,
                           call->gate->version,
                           MaxCallRows(*view)};
  if (options_.round_tokens_for_bf16_servers) {
    plan.round_to_bf16 = [this, &placement = call->placement->value](ExpertKey expert) {
      return AllReplicasComputeBf16(placement, expert);
    };
  }
  absl::StatusOr<std::vector<ExpertGroup>> groups =
      PlanDispatch(call->routing, *view, call->placement->value, picker_, plan);
  if (!groups.ok()) {
    std::move(call->done)(groups.status());
    return;
  }
  call->groups = *std::move(groups);
  for (ExpertGroup& g : call->groups) g.request.set_sequence_id(next_sequence_id_.fetch_add(1));
  call->planned = absl::Now();
  const size_t n = call->groups.size();
  call->responses.resize(n);
  call->tried.resize(n);
  {
    absl::MutexLock lock(&call->mu);
    call->in_flight.resize(n);
    call->answered.assign(n, false);
  }
  if (n == 0) {  // no tokens, or every pair dropped
    FinishForward(std::move(call));
    return;
  }
  call->remaining = n;
  call->timer_id = EndAtDeadline(options_.timer, deadline, call, n, "expert calls unanswered");
  {
    absl::MutexLock lock(&call->mu);
    for (size_t g = 0; g < n; ++g) call->in_flight[g].push_back(call->groups[g].server);
  }
  for (size_t g = 0; g < n; ++g) {
    const int server = call->groups[g].server;
    Send(call, g, server);
    if (!training) ScheduleHedge(call, g, server);
  }
  if (cancellation != nullptr) {
    // Weak: a finished call is not kept alive by its client's token.
    cancellation->OnCancel([this, weak = std::weak_ptr<ForwardCall>(call)] {
      if (std::shared_ptr<ForwardCall> live = weak.lock()) CancelForward(std::move(live));
    });
  }
}

void Router::CancelForward(std::shared_ptr<ForwardCall> call) {
  if (call->finished.exchange(true)) return;
  if (call->timer_id != 0) options_.timer->Cancel(call->timer_id);
  std::vector<std::pair<int, uint64_t>> sent;
  {
    absl::MutexLock lock(&call->mu);  // a failover or hedge may be sending a group
    for (size_t i = 0; i < call->groups.size(); ++i) {
      for (int server : call->in_flight[i]) {
        sent.emplace_back(server, call->groups[i].request.sequence_id());
      }
    }
  }
  for (const auto& [server, sequence_id] : sent) client_.CancelForward(server, sequence_id);
  std::move(call->done)(absl::CancelledError("the client cancelled the request"));
}

void Router::Send(std::shared_ptr<ForwardCall> call, size_t group, int server) {
  const absl::Time sent = absl::Now();
  client_.Forward(server, call->groups[group].request, call->groups[group].rows,
                  [this, call, group, server,
                   sent](absl::StatusOr<std::unique_ptr<ExpertAnswer>> reply) mutable {
                    OnForwardReply(std::move(call), group, server, sent, std::move(reply));
                  });
}

int64_t Router::MaxCallRows(const ConstTensorView& x) const {
  if (options_.micro_batch_bytes <= 0 || x.shape.size() != 2) return 0;
  const int64_t row_bytes = x.shape[1] * static_cast<int64_t>(DTypeSize(x.dtype));
  return std::max<int64_t>(1, options_.micro_batch_bytes / std::max<int64_t>(1, row_bytes));
}

bool Router::AllReplicasComputeBf16(const Placement& placement, ExpertKey expert) const {
  for (int server : placement.ServersOf(expert)) {
    if (!computes_bf16_[server].load(std::memory_order_relaxed)) return false;
  }
  return true;
}

absl::Duration Router::HedgeDelay(int server) const {
  const double micros = answer_micros_[server].load(std::memory_order_relaxed);
  // Unknown yet: the longest wait.
  if (micros <= 0) return options_.hedge_max_delay;
  return std::clamp(absl::Microseconds(3 * micros) + absl::Milliseconds(2),
                    options_.hedge_min_delay, options_.hedge_max_delay);
}

void Router::ScheduleHedge(const std::shared_ptr<ForwardCall>& call, size_t group, int server) {
  if (options_.timer == nullptr || options_.hedge_max_delay <= absl::ZeroDuration()) return;
  if (call->placement->value.ServersOf(call->groups[group].expert).size() < 2) return;
  options_.timer->Schedule(
      absl::Now() + HedgeDelay(server),
      [this, weak = std::weak_ptr<ForwardCall>(call), group, server] {
        std::shared_ptr<ForwardCall> call = weak.lock();
        if (call == nullptr || call->finished.load()) return;
        const ExpertGroup& g = call->groups[group];
        int next;
        {
          absl::MutexLock lock(&call->mu);
          // Answered, or no longer waiting on the server this hedge is for.
          if (call->answered[group] ||
              std::find(call->in_flight[group].begin(), call->in_flight[group].end(), server) ==
                  call->in_flight[group].end()) {
            return;
          }
          std::vector<int> exclude = call->tried[group];
          exclude.insert(exclude.end(), call->in_flight[group].begin(),
                         call->in_flight[group].end());
          next = picker_.PickOne(call->placement->value, g.expert,
                                 static_cast<int64_t>(g.pairs.size()), exclude);
          // With the decision: a failover deciding meanwhile sees it and
          // does not send the same request to the same server.
          if (next >= 0) call->in_flight[group].push_back(next);
        }
        if (next < 0) return;
        MOE_LOG(WARNING, g.expert.ToString(), ": server ", server, " has not answered in ",
                absl::FormatDuration(HedgeDelay(server)), "; also sending to server ", next);
        hedges_.fetch_add(1);
        if (options_.on_hedge) options_.on_hedge();
        Send(call, group, next);
      });
}

void Router::OnForwardReply(std::shared_ptr<ForwardCall> call, size_t group, int server,
                            absl::Time sent, absl::StatusOr<std::unique_ptr<ExpertAnswer>> reply) {
  ExpertGroup& g = call->groups[group];
  const int64_t rows = g.pairs.size();
  picker_.Release(server, rows);
  const v1::DispatchResponse* response = reply.ok() ? &(*reply)->response() : nullptr;
  absl::Status status = reply.status();
  if (status.ok() && response->has_error()) status = FromProtoStatus(response->error());
  // Errors that say the server is in trouble (not the call, the version or
  // the client): counted towards ejecting it, and for inference forwards
  // re-sent elsewhere like an unavailable server.
  const bool trouble = absl::IsUnavailable(status) || absl::IsResourceExhausted(status) ||
                       absl::IsInternal(status) || absl::IsUnknown(status);
  // What the server computes in, as it says (answers; the refusal of
  // rounded rows).
  const bool rounding_refused = absl::IsFailedPrecondition(status) &&
                                g.request.tokens_rounded_to_bf16() && reply.ok() &&
                                response->compute_dtype() == v1::DTYPE_FP32;
  if (reply.ok() && (status.ok() || rounding_refused)) {
    computes_bf16_[server].store(response->compute_dtype() == v1::DTYPE_BF16,
                                 std::memory_order_relaxed);
  }
  if (status.ok()) {
    picker_.RecordSuccess(server);
  } else if (trouble && picker_.RecordFailure(server, absl::Now())) {
    MOE_LOG(WARNING, "server ", server, " failed ", ReplicaPicker::kEjectAfter,
            " calls in a row (last: ", status.message(), "); ejected for a while");
    if (options_.on_eject) options_.on_eject();
  }
  if (status.ok()) {
    // What a hedge waits for: this server's recent answer time (EWMA).
    std::atomic<double>& ewma = answer_micros_[server];
    const double micros = absl::ToDoubleMicroseconds(absl::Now() - sent);
    const double old = ewma.load(std::memory_order_relaxed);
    ewma.store(old <= 0 ? micros : old + (micros - old) / 8, std::memory_order_relaxed);
  }
  std::vector<int> slower;  // servers a hedge answered before
  {
    absl::MutexLock lock(&call->mu);
    std::vector<int>& flying = call->in_flight[group];
    flying.erase(std::find(flying.begin(), flying.end(), server));
    if (call->answered[group]) return;  // a hedge's twin answered first
    if (status.ok()) {
      call->answered[group] = true;
      g.server = server;  // the replica that served it (load statistics)
      slower = flying;
      if (options_.on_overlap) {
        call->timings.push_back(
            {server, sent, absl::Now(), absl::Microseconds(response->compute_micros())});
      }
    } else if (!flying.empty()) {
      // Another replica is still working on it: its answer decides.
      call->tried[group].push_back(server);
      return;
    }
  }
  for (int s : slower) {
    // It did not answer in time while another replica did: avoided for a
    // while (outlier), tried again by traffic after that.
    picker_.MarkStale(s, g.expert, absl::Now() + options_.stale_ttl);
  }
  if (rounding_refused) {
    // Its kernels are fp32 after all (restarted with others): the rows again
    // unrounded, to the least loaded replica (this one included). Nothing
    // else holds the request now: no send of it is in flight.
    MOE_LOG(WARNING, g.expert.ToString(), ": server ", server,
            " computes in fp32; re-sending its rows unrounded");
    int next;
    {
      absl::MutexLock lock(&call->mu);
      const ConstTensorView x{DType::kFloat32,
                              {call->num_tokens, options_.model.d_model},
                              reinterpret_cast<const std::byte*>(call->x32.data())};
      SetTokens(x, call->routing.pairs(), /*round_to_bf16=*/false, g);
      next = picker_.PickOne(call->placement->value, g.expert, rows, call->tried[group]);
      if (next >= 0) {
        g.server = next;
        call->in_flight[group].push_back(next);
      }
    }
    if (next >= 0) {
      Send(std::move(call), group, next);
      return;
    }
    status = absl::UnavailableError(
        absl::StrCat("no live replica for unrounded rows (", status.message(), ")"));
  }
  // The server is at another version of the state than this call.
  const bool stale =
      absl::IsFailedPrecondition(status) && reply.ok() && response->has_server_version();
  if (stale) {
    const v1::StateVersion& theirs = response->server_version();
    MOE_LOG(WARNING, g.expert.ToString(), ": server ", server, " is at placement epoch ",
            theirs.placement_epoch(), ", step ", theirs.weights_step(), "; this call at epoch ",
            call->placement->version, ", step ", call->gate->version);
    // Behind the cluster (restarted without a replica to sync from): avoid
    // it for a while rather than paying a refused round trip per request.
    if (theirs.weights_step() < call->gate->version) {
      picker_.MarkStale(server, g.expert, absl::Now() + options_.stale_ttl);
      call->met_older_step.store(true);
    }
    if (theirs.placement_epoch() > call->placement->version) call->newer_server.store(server);
    if (theirs.weights_step() > call->gate->version) call->newer_step_server.store(server);
    if (options_.on_stale) options_.on_stale();
  }
  // The server answered that it does not host the expert (released, or a
  // placement change under way): it ran nothing and kept nothing, and other
  // replicas may still host it; avoided for a while, like a stale one.
  const bool not_hosted = absl::IsNotFound(status) && reply.ok() && response->has_error();
  if (not_hosted) picker_.MarkStale(server, g.expert, absl::Now() + options_.stale_ttl);
  // Released by a placement change committed while the call was on its
  // way: if no replica of this call's placement is left, the call is
  // stale (learn the new placement, plan again), not a missing expert.
  const bool moved_on = not_hosted && response->has_server_version() &&
                        response->server_version().placement_epoch() > call->placement->version;
  if (moved_on) call->newer_server.store(server);
  if (absl::IsUnavailable(status) || stale || not_hosted || (trouble && !call->training)) {
    // The server is gone (or draining), has other weights or lacks the
    // expert: the same request to another replica.
    int next;
    {
      absl::MutexLock lock(&call->mu);
      call->tried[group].push_back(server);
      next = picker_.PickOne(call->placement->value, g.expert, rows, call->tried[group]);
      if (next >= 0) {
        g.server = next;
        call->in_flight[group].push_back(next);
      }
    }
    if (next >= 0) {
      MOE_LOG(WARNING, g.expert.ToString(), ": server ", server,
              stale                         ? " is at another version ("
              : not_hosted                  ? " does not host it ("
              : absl::IsUnavailable(status) ? " unavailable ("
                                            : " failed (",
              status.message(), "); re-sending ", rows, " tokens to server ", next);
      failovers_.fetch_add(1);
      if (options_.on_failover) options_.on_failover();
      Send(std::move(call), group, next);
      return;
    }
    if (not_hosted && !moved_on) {
      status = absl::NotFoundError(
          absl::StrCat(g.expert.ToString(), ": no replica hosts it (servers ",
                       absl::StrJoin(call->tried[group], ","), "; last: ", status.message(), ")"));
    } else if (stale || moved_on) {
      status = absl::FailedPreconditionError(
          absl::StrCat(g.expert.ToString(), ": no replica at placement epoch ",
                       call->placement->version, ", step ", call->gate->version, " (servers ",
                       absl::StrJoin(call->tried[group], ","), "; last: ", status.message(), ")"));
      absl::MutexLock lock(&call->mu);
      call->stale = true;
    } else if (absl::IsUnavailable(status)) {
      status = absl::UnavailableError(absl::StrCat(
          g.expert.ToString(), ": no live replica (servers ",
          absl::StrJoin(call->tried[group], ","), " unavailable: ", status.message(), ")"));
    }
    // Other trouble keeps its code: the last replica tried said why.
  }
  if (status.ok()) {
    call->responses[group] = *std::move(reply);
  } else {
    absl::MutexLock lock(&call->mu);
    call->answered[group] = true;
    if (call->status.ok()) call->status = status;
  }
  if (call->remaining.fetch_sub(1) == 1) {
    if (RunsWhereReceived(call->num_tokens)) {
      FinishForward(std::move(call));
    } else {
      Run([this, call = std::move(call)]() mutable { FinishForward(std::move(call)); });
    }
  }
}

void Router::FinishForward(std::shared_ptr<ForwardCall> call) {
  const absl::Time answered = absl::Now();
  if (call->finished.exchange(true)) return;  // the deadline came first
  if (call->timer_id != 0) options_.timer->Cancel(call->timer_id);
  {
    absl::MutexLock lock(&call->mu);
    if (!call->status.ok()) {
      if (!call->stale) {
        std::move(call->done)(call->status);
        return;
      }
    }
  }
  if (call->stale) {
    // Servers at a newer placement epoch or step than this router: learn
    // them first (unless another call already did).
    int placement_from = call->newer_server.load();
    int gate_from = call->newer_step_server.load();
    if (call->placement->version != placement()->version) placement_from = -1;
    if (call->gate->version != gate()->version) gate_from = -1;
    if (placement_from >= 0 || gate_from >= 0) {
      Refresh(placement_from, gate_from, [this, call]() mutable { RetryStale(std::move(call)); });
    } else {
      RetryStale(std::move(call));
    }
    return;
  }
  const int64_t d_model = options_.model.d_model;
  // The answers are combined where they arrived (ExpertAnswer), each value
  // checked on the way.
  std::vector<RowReader> outputs;
  outputs.reserve(call->groups.size());
  auto answered_badly = [&](size_t g, absl::string_view why) {
    std::move(call->done)(
        absl::InternalError(absl::StrCat("server ", call->groups[g].server, " answered ",
                                         call->groups[g].expert.ToString(), " badly: ", why)));
  };
  for (size_t g = 0; g < call->groups.size(); ++g) {
    absl::StatusOr<RowReader> rows =
        call->responses[g]->OutputRows(call->groups[g].pairs.size(), d_model);
    if (!rows.ok()) {
      answered_badly(g, rows.status().message());
      return;
    }
    outputs.push_back(*std::move(rows));
  }
  // An fp32 y is combined straight into the bytes of the answer; a bf16 one
  // in fp32, rounded once at the end.
  ForwardResult result;
  const int64_t elements = call->num_tokens * d_model;
  std::vector<float> y32;
  absl::Span<float> y;
  if (call->dtype == DType::kFloat32) {
    result.y.add_shape(call->num_tokens);
    result.y.add_shape(d_model);
    result.y.set_dtype(v1::DTYPE_FP32);
    std::string* data = result.y.mutable_data();
    data->assign(elements * sizeof(float), '\0');
    y = absl::MakeSpan(reinterpret_cast<float*>(data->data()), elements);
  } else {
    y32.assign(elements, 0.0f);
    y = absl::MakeSpan(y32);
  }
  if (std::optional<NonFiniteRow> bad = Combine(call->routing, call->groups, outputs, d_model, y)) {
    answered_badly(bad->group, absl::StrCat("expert output: NaN or Inf in row ", bad->row));
    return;
  }
  if (options_.load_stats != nullptr) {
    std::vector<int64_t> server_tokens(call->placement->value.num_servers(), 0);
    for (const ExpertGroup& g : call->groups) server_tokens[g.server] += g.pairs.size();
    options_.load_stats->Record(int64_t{call->layer} * options_.model.experts_per_layer(),
                                call->routing.expert_tokens, server_tokens,
                                call->routing.dropped_pairs, absl::Now());
  }
  if (options_.routing_sample != nullptr) {
    options_.routing_sample->Record(call->routing, call->layer);
  }

  if (call->dtype != DType::kFloat32) {
    EncodeFloats(y32, {call->num_tokens, d_model}, call->dtype, &result.y);
  }
  result.request_id = call->request_id;
  result.placement_epoch = call->placement->version;
  result.gate_version = call->gate->version;
  if (call->training) {
    auto record = std::make_unique<TrainingRecord>();
    record->routing = call->routing;
    record->placement_epoch = call->placement->version;
    record->weights_step = call->gate->version;
    record->groups = std::move(call->groups);
    for (ExpertGroup& g : record->groups) {
      g.request.Clear();
      g.rows = std::string();
    }
    // Backward needs them: fp32 copies (widened from bf16).
    record->outputs.reserve(record->groups.size());
    for (size_t g = 0; g < record->groups.size(); ++g) {
      const int64_t rows = record->groups[g].pairs.size();
      RowReader reader = *call->responses[g]->OutputRows(rows, d_model);
      FloatTensor& out = record->outputs.emplace_back(Shape{rows, d_model});
      for (int64_t r = 0; r < rows; ++r) {
        CopyRow(reader.Next(), reader.dtype(), out.mutable_row(r).data(), d_model);
      }
    }
    record->x = FloatTensor({call->num_tokens, d_model},
                            std::vector<float>(call->x32.begin(), call->x32.end()));
    record->gate = call->gate;
    record->layer = call->layer;
    if (absl::Status kept = KeepTraining(call->request_id, std::move(record)); !kept.ok()) {
      std::move(call->done)(kept);
      return;
    }
  }
  result.routing = std::move(call->routing);
  if (options_.on_phases) {
    options_.on_phases(call->planned - call->start, answered - call->planned,
                       absl::Now() - answered);
  }
  if (options_.on_overlap) {
    absl::MutexLock lock(&call->mu);
    options_.on_overlap(MeasureOverlap(call->timings));
  }
  std::move(call->done)(std::move(result));
}

absl::Status Router::KeepTraining(uint64_t request_id, std::unique_ptr<TrainingRecord> record) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&training_mu_);
  for (auto it = training_.begin(); it != training_.end();) {
    if (it->second->expiry <= now) {
      training_bytes_ -= it->second->bytes();
      training_.erase(it++);
    } else {
      ++it;
    }
  }
  const int64_t bytes = record->bytes();
  if (training_bytes_ + bytes > options_.training_max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "router training state: request ", request_id, " needs ", bytes, " bytes, ",
        training_bytes_, " of ", options_.training_max_bytes, " are held"));
  }
  record->expiry = now + options_.training_ttl;
  training_bytes_ += bytes;
  training_.emplace(request_id, std::move(record));
  return absl::OkStatus();
}

namespace {

absl::Status UnknownTrainingRequest(uint64_t request_id) {
  return absl::NotFoundError(absl::StrCat(
      "request ", request_id,
      ": no training forward to run backward for (unknown id, already done, or expired)"));
}

}  // namespace

absl::StatusOr<int64_t> Router::TrainingTokens(uint64_t request_id) const {
  // Tag 0 is no router's in a deployment (tags start at 1): just unknown.
  const uint64_t tag = request_id >> kRequestCounterBits;
  if (tag != options_.tag && tag != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("request ", request_id, " was made by router tag ",
                     absl::Hex(tag, absl::kZeroPad6), ", not by this one (", identity(),
                     "): send Backward to the router named in its ForwardResponse.router"));
  }
  absl::MutexLock lock(&training_mu_);
  auto it = training_.find(request_id);
  if (it == training_.end()) return UnknownTrainingRequest(request_id);
  return it->second->routing.num_tokens;
}

absl::StatusOr<std::unique_ptr<Router::TrainingRecord>> Router::TakeTraining(
    uint64_t request_id) {
  absl::MutexLock lock(&training_mu_);
  auto it = training_.find(request_id);
  if (it == training_.end()) return UnknownTrainingRequest(request_id);
  std::unique_ptr<TrainingRecord> record = std::move(it->second);
  training_bytes_ -= record->bytes();
  training_.erase(it);
  if (record->expiry <= absl::Now()) {
    return absl::NotFoundError(absl::StrCat("request ", request_id, ": training state expired"));
  }
  return record;
}

size_t Router::pending_training() const {
  absl::MutexLock lock(&training_mu_);
  return training_.size();
}

void Router::Backward(uint64_t request_id, const v1::Tensor& grad_output,
                      absl::Time deadline, BackwardDone done) {
  // dL/dy is validated (shape, dtype, finite values) before the forward's
  // state is taken, so a bad call leaves it for a retry.
  const absl::StatusOr<int64_t> tokens = TrainingTokens(request_id);
  if (!tokens.ok()) {
    std::move(done)(tokens.status());
    return;
  }
  TensorSpec spec = TokenBatchSpec("grad_output", options_.model.d_model, 0);
  spec.dims[0] = *tokens;
  absl::StatusOr<ConstTensorView> dy = DecodeTensor(grad_output, spec);
  if (!dy.ok()) {
    std::move(done)(dy.status());
    return;
  }
  absl::StatusOr<std::unique_ptr<TrainingRecord>> record = TakeTraining(request_id);
  if (!record.ok()) {
    std::move(done)(record.status());
    return;
  }
  auto call = std::make_shared<BackwardCall>();
  call->done = std::move(done);
  call->deadline = deadline;
  call->dtype = dy->dtype;
  call->record = *std::move(record);
  call->dy32 = AsFloats(*dy, call->dy32_storage);
  const TrainingRecord& rec = *call->record;
  const PairIndex index = rec.routing.pairs();
  const int64_t d_model = options_.model.d_model;
  call->d_weight.assign(index.Count(rec.routing.num_tokens), 0.0);
  const size_t n = rec.groups.size();
  call->requests.resize(n);
  call->responses.resize(n);
  // Each group gets weight * dy for its rows; dL/dweight = dy . Expert(x).
  for (size_t g = 0; g < n; ++g) {
    const ExpertGroup& group = rec.groups[g];
    const int64_t rows = group.pairs.size();
    std::vector<float> scaled(rows * d_model);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = group.pairs[r];
      const float* dy_row = call->dy32.data() + index.TokenOf(p) * d_model;
      const float* out_row = rec.outputs[g].values().data() + r * d_model;
      const float w = rec.routing.weights[p];
      double dot = 0;
      for (int64_t m = 0; m < d_model; ++m) {
        scaled[r * d_model + m] = w * dy_row[m];
        dot += static_cast<double>(dy_row[m]) * out_row[m];
      }
      call->d_weight[p] = dot;
    }
    v1::BackwardDispatchRequest& request = call->requests[g];
    request.set_sequence_id(next_sequence_id_.fetch_add(1));
    SetExpertKey(group.expert, &request);
    request.set_request_id(request_id);
    request.set_deadline_unix_micros(ToDeadlineMicros(deadline));
    request.mutable_version()->set_placement_epoch(rec.placement_epoch);
    request.mutable_version()->set_weights_step(rec.weights_step);
    EncodeFloats(scaled, {rows, d_model}, DType::kFloat32, request.mutable_grad_output());
  }
  if (n == 0) {
    FinishBackward(std::move(call));
    return;
  }
  call->remaining = n;
  call->timer_id = EndAtDeadline(options_.timer, deadline, call, n, "expert backward calls unanswered");
  for (size_t g = 0; g < n; ++g) {
    const ExpertGroup& group = call->record->groups[g];
    client_.Backward(
        group.server, call->requests[g],
        [this, call, g](absl::StatusOr<std::unique_ptr<v1::BackwardDispatchResponse>> reply) {
          const ExpertGroup& group = call->record->groups[g];
          absl::Status status = reply.status();
          if (status.ok() && (*reply)->has_error()) status = FromProtoStatus((*reply)->error());
          if (status.ok()) {
            call->responses[g] = *std::move(reply);
          } else {
            absl::MutexLock lock(&call->mu);
            if (call->status.ok()) {
              call->status = absl::Status(
                  status.code(), absl::StrCat("backward of ", group.expert.ToString(),
                                              " on server ", group.server, ": ", status.message()));
            }
          }
          if (call->remaining.fetch_sub(1) == 1) {
            Run([this, call]() mutable { FinishBackward(std::move(call)); });
          }
        });
  }
}

void Router::FinishBackward(std::shared_ptr<BackwardCall> call) {
  if (call->finished.exchange(true)) return;  // the deadline came first
  if (call->timer_id != 0) options_.timer->Cancel(call->timer_id);
  {
    absl::MutexLock lock(&call->mu);
    if (!call->status.ok()) {
      std::move(call->done)(call->status);
      return;
    }
  }
  const TrainingRecord& rec = *call->record;
  const PairIndex index = rec.routing.pairs();
  const int64_t d_model = options_.model.d_model;
  FloatTensor dx({rec.routing.num_tokens, d_model});
  for (size_t g = 0; g < rec.groups.size(); ++g) {
    const ExpertGroup& group = rec.groups[g];
    TensorSpec spec = TokenBatchSpec("grad_input", d_model, 0);
    spec.dims[0] = group.pairs.size();
    absl::StatusOr<ConstTensorView> part = DecodeTensor(call->responses[g]->grad_input(), spec);
    if (!part.ok()) {
      std::move(call->done)(absl::InternalError(
          absl::StrCat("server ", group.server, " answered backward of ", group.expert.ToString(),
                       " badly: ", part.status().message())));
      return;
    }
    std::unique_ptr<float[]> storage;
    const absl::Span<const float> rows = AsFloats(*part, storage);
    for (size_t r = 0; r < group.pairs.size(); ++r) {
      float* dx_row = dx.mutable_row(index.TokenOf(group.pairs[r])).data();
      for (int64_t m = 0; m < d_model; ++m) dx_row[m] += rows[r * d_model + m];
    }
  }
  // The layer's rows of the gates' gradient: only they go to the lease
  // keeper.
  FloatTensor gate_gradient({d_model, options_.model.gate_width()});
  GateBackward(rec.routing, rec.x.values(),
               GateOfLayer(options_.model, rec.gate->value.values(), rec.layer), call->d_weight,
               dx.mutable_values(), gate_gradient.mutable_values());
  // The gate gradient is kept by the lease keeper, where a Step through
  // any router takes it; the Backward is done once it is there.
  auto out = std::make_shared<v1::Tensor>();
  EncodeFloats(dx.values(), dx.shape(), call->dtype, out.get());
  auto request = std::make_shared<v1::AddGateGradientRequest>();
  request->set_gate_step(rec.gate->version);
  request->set_layer(rec.layer);
  EncodeFloats(gate_gradient.values(), gate_gradient.shape(), DType::kFloat32,
               request->mutable_gradient());
  client_.AddGateGradient(
      kLeaseKeeper, *request, call->deadline,
      [call, request, out](absl::StatusOr<v1::AddGateGradientResponse> added) mutable {
        if (!added.ok()) {
          // The experts' gradients are in; the gate's is not: say so.
          std::move(call->done)(absl::Status(
              added.status().code(),
              absl::StrCat("backward: the gate gradient (of the gate of step ",
                           request->gate_step(),
                           ") was not kept, the experts' were: ", added.status().message())));
          return;
        }
        std::move(call->done)(std::move(*out));
      });
}

void Router::RetryStale(std::shared_ptr<ForwardCall> call) {
  // This router is behind the servers (a step or placement change
  // committed meanwhile): once it has caught up, the whole call again,
  // gated and planned with the new state. Never a mix of the two.
  if (call->restarts < kMaxRestarts && (placement()->version != call->placement->version ||
                                        gate()->version != call->gate->version)) {
    MOE_LOG(INFO, "forward at epoch ", call->placement->version, ", step ", call->gate->version,
            " met newer servers; again at epoch ", placement()->version, ", step ",
            gate()->version);
    Start(*call->x, call->layer, call->training, call->deadline, std::move(call->done),
          call->cancellation, call->restarts + 1);
    return;
  }
  // The servers are behind the call: a step this router learnt from a peer
  // that has committed it is still committing on them. The whole call
  // again after a pause (20, 40, ... ms), within its deadline.
  const absl::Duration pause = absl::Milliseconds(20 << call->restarts);
  if (call->met_older_step.load() && call->restarts < kMaxBehindRestarts &&
      options_.timer != nullptr && absl::Now() + pause < call->deadline) {
    MOE_LOG(INFO, "forward at step ", call->gate->version, " met servers still committing it; ",
            "again in ", absl::FormatDuration(pause));
    // Off the timer's thread: the restart gates and plans.
    options_.timer->Schedule(absl::Now() + pause, [this, call]() mutable {
      Run([this, call = std::move(call)]() mutable {
        Start(*call->x, call->layer, call->training, call->deadline, std::move(call->done),
              call->cancellation, call->restarts + 1);
      });
    });
    return;
  }
  absl::Status status;
  {
    absl::MutexLock lock(&call->mu);
    status = call->status;
  }
  std::move(call->done)(status);
}

}  // namespace moe::router
