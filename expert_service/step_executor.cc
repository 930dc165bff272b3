#include "expert_service/step_executor.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/optimizer.h"
#include "common/status_macros.h"

namespace moe::expert {

std::vector<StepRing> StepRingsOf(const Placement& placement, int server,
                                  absl::FunctionRef<std::string(int)> name,
                                  absl::FunctionRef<std::string(int)> label,
                                  absl::FunctionRef<allreduce::RingLink*(int)> link_to) {
  std::vector<StepRing> rings;
  for (const ReplicaGroup& group : ReplicaGroups(placement)) {
    auto it = std::find(group.servers.begin(), group.servers.end(), server);
    if (it == group.servers.end()) continue;
    const int size = static_cast<int>(group.servers.size());
    const int rank = static_cast<int>(it - group.servers.begin());
    const int successor = group.servers[(rank + 1) % size];
    const int predecessor = group.servers[(rank + size - 1) % size];
    StepRing& ring = rings.emplace_back();
    ring = {group.id,           group.experts,     rank, size, label(predecessor),
            label(successor),   link_to(successor)};
    for (int member : group.servers) {
      ring.members.push_back(
          {name(member), label(member), member == server ? nullptr : link_to(member)});
    }
  }
  return rings;
}

absl::StatusOr<StepRing> LeaveOut(const StepRing& ring,
                                  const absl::flat_hash_set<std::string>& left_out) {
  if (left_out.empty()) return ring;
  if (ring.members.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the ring of group ", absl::Hex(ring.group_id),
                                                   " has no member list to leave servers out of"));
  }
  StepRing out = ring;
  out.members.clear();
  int rank = -1;
  for (const RingMember& member : ring.members) {
    if (left_out.contains(member.name)) {
      if (member.link == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("server ", member.name, " is left out of the step it was asked to run"));
      }
      continue;
    }
    if (member.link == nullptr) rank = static_cast<int>(out.members.size());
    out.members.push_back(member);
  }
  if (rank < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ring of group ", absl::Hex(ring.group_id), " does not list this server"));
  }
  const int size = static_cast<int>(out.members.size());
  out.rank = rank;
  out.size = size;
  out.predecessor = out.members[(rank + size - 1) % size].label;
  const RingMember& successor = out.members[(rank + 1) % size];
  out.successor = successor.label;
  // A ring of one sends nothing: its link is never used.
  out.link = size == 1 ? ring.link : successor.link;
  return out;
}

StepExecutor::StepExecutor(Options options, ExpertStore& store,
                           allreduce::CollectiveRegistry& registry)
    : options_(std::move(options)), store_(store), registry_(registry) {
  absl::MutexLock lock(&mu_);
  rings_ = options_.rings;
  if (options_.ask_peers) inquirer_ = std::thread([this] { InquiryLoop(); });
}

uint64_t StepExecutor::ScheduleInquiry(uint64_t step, absl::Time when) {
  return timer_.Schedule(when, [this, step] {
    absl::MutexLock lock(&mu_);
    if (prepared_ && prepared_->step == step) inquire_ = step;
  });
}

void StepExecutor::InquiryLoop() {
  while (true) {
    uint64_t step = 0;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](StepExecutor* e)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return e->stopping_ || e->inquire_.has_value(); },
          this));
      if (stopping_) return;
      step = *inquire_;
      inquire_.reset();
    }
    Inquire(step);
  }
}

void StepExecutor::Inquire(uint64_t step) {
  MOE_LOG(WARNING, "server ", options_.server_name, ": step ", step,
          " is prepared and its router has not said whether to commit it; asking the peers");
  const StepVerdict verdict = DecideFromPeers(step, options_.ask_peers());
  switch (verdict.outcome) {
    case StepVerdict::kCommitted:
      // A failure is logged, and the server syncs.
      (void)CommitOrSync(step, absl::StrCat("without its router's word: ", verdict.why));
      return;
    case StepVerdict::kAborted:
      Abort(step, absl::StrCat("no word from its router, and ", verdict.why));
      if (options_.on_resolved) options_.on_resolved(step, false);
      return;
    case StepVerdict::kInDoubt: {
      MOE_LOG(WARNING, "server ", options_.server_name, ": step ", step,
              " stays prepared (in doubt; asking again in ",
              absl::FormatDuration(options_.prepared_timeout), "): ", verdict.why);
      absl::MutexLock lock(&mu_);
      if (prepared_ && prepared_->step == step) {
        prepared_->timer_id = ScheduleInquiry(step, absl::Now() + options_.prepared_timeout);
      }
      return;
    }
  }
}

absl::Status StepExecutor::CommitOrSync(uint64_t step, const std::string& why) {
  absl::StatusOr<std::vector<std::pair<ExpertKey, uint64_t>>> committed = Commit(step);
  if (committed.ok()) {
    MOE_LOG(WARNING, "server ", options_.server_name, ": step ", step, " committed here ", why);
    if (options_.on_resolved) options_.on_resolved(step, true);
    return absl::OkStatus();
  }
  // Its update was never computed here (the router stopped between the
  // all-reduce and UpdateStep): the step's weights come from a replica
  // that committed it.
  MOE_LOG(WARNING, "server ", options_.server_name, ": step ", step, " was committed ", why,
          ", and cannot be here: ", committed.status().message(), "; syncing instead");
  Abort(step, absl::StrCat("committed elsewhere, and not computable here: ",
                           committed.status().message()));
  if (options_.on_behind) options_.on_behind(step);
  return absl::FailedPreconditionError(absl::StrCat(
      "server ", options_.server_name, ": step ", step, " was committed ", why,
      ", and cannot be here (", committed.status().message(), "); it syncs from its peers first"));
}

PeerSteps StepExecutor::steps() const {
  absl::MutexLock lock(&mu_);
  return {last_committed_, prepared_ ? prepared_->step : 0, last_aborted_};
}

absl::Status StepExecutor::SetRings(std::vector<StepRing> rings) {
  absl::MutexLock lock(&mu_);
  if (preparing_ || prepared_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server ", options_.server_name, ": rings change only between steps (step ",
        preparing_ ? *preparing_ : prepared_->step, " is ", preparing_ ? "preparing" : "prepared",
        ")"));
  }
  rings_ = std::move(rings);
  // Another set of rings fuses other buffers.
  spare_buffers_.clear();
  return absl::OkStatus();
}

absl::Status StepExecutor::Hold(std::string why) {
  absl::MutexLock lock(&mu_);
  if (preparing_ || prepared_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server ", options_.server_name, ": step ", preparing_ ? *preparing_ : prepared_->step,
        " is ", preparing_ ? "preparing" : "prepared", "; ", why, " waits for it"));
  }
  if (held_) {
    return absl::FailedPreconditionError(
        absl::StrCat("server ", options_.server_name, ": ", *held_, " is under way"));
  }
  held_ = std::move(why);
  return absl::OkStatus();
}

void StepExecutor::Unhold() {
  absl::MutexLock lock(&mu_);
  held_.reset();
}

StepExecutor::~StepExecutor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (inquirer_.joinable()) inquirer_.join();
  // A prepared step stays undecided here: the process ends, and its peers
  // decide without it. In process (tests), its gradients go back.
  std::optional<uint64_t> step;
  {
    absl::MutexLock lock(&mu_);
    if (prepared_) step = prepared_->step;
  }
  if (step) Abort(*step, "server shutting down");
}

uint64_t StepExecutor::last_committed() const {
  absl::MutexLock lock(&mu_);
  return last_committed_;
}

absl::Status StepExecutor::AdoptCommitted(uint64_t step) {
  absl::MutexLock lock(&mu_);
  if (preparing_ || prepared_) {
    return absl::FailedPreconditionError(
        absl::StrCat("server ", options_.server_name, ": cannot adopt step ", step, " while step ",
                     preparing_ ? *preparing_ : prepared_->step, " runs"));
  }
  if (step < last_committed_) {
    return absl::FailedPreconditionError(absl::StrCat("server ", options_.server_name,
                                                      ": cannot adopt step ", step,
                                                      " after committing step ", last_committed_));
  }
  last_committed_ = step;
  return absl::OkStatus();
}

absl::StatusOr<StepExecutor::PrepareResult> StepExecutor::Prepare(const StepOrder& order) {
  const uint64_t step = order.step;
  const float learning_rate = order.learning_rate;
  const absl::Time deadline = order.deadline;
  if (!(learning_rate >= 0.0f) || !std::isfinite(learning_rate)) {
    return absl::InvalidArgumentError(
        absl::StrCat("learning_rate: must be finite and >= 0, got ", learning_rate));
  }
  // A step prepared here that the cluster committed (its commit never
  // arrived) is committed first: its updates are the ones every replica
  // applied.
  std::optional<uint64_t> roll_forward;
  {
    absl::MutexLock lock(&mu_);
    if (prepared_ && prepared_->step <= order.committed_step && prepared_->step < step) {
      roll_forward = prepared_->step;
    }
  }
  if (roll_forward) {
    MOE_RETURN_IF_ERROR(CommitOrSync(
        *roll_forward, absl::StrCat("on step ", step, "'s word (its own commit did not arrive)")));
  }
  std::optional<Prepared> superseded;
  std::vector<StepRing> rings;
  std::vector<float> gate_gradient;
  {
    absl::MutexLock lock(&mu_);
    // A legitimate step is one past the cluster's last commit, which this
    // server is at most a few steps behind; a step far ahead would, once
    // aborted, refuse every step before it.
    if (step > last_committed_ + kMaxStepsAhead) {
      return absl::InvalidArgumentError(absl::StrCat(
          "step ", step, ": server ", options_.server_name, " has committed step ", last_committed_,
          "; a step more than ", kMaxStepsAhead, " ahead is refused"));
    }
    if (step <= last_committed_ || step <= last_aborted_ || aborted_ahead_.contains(step)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "step ", step, ": server ", options_.server_name, " has already ",
          step <= last_committed_ ? "committed" : "aborted", " step ",
          step <= last_committed_ ? last_committed_
                                  : (step <= last_aborted_ ? last_aborted_ : step)));
    }
    if (preparing_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "step ", step, ": server ", options_.server_name, " is preparing step ", *preparing_));
    }
    if (held_) {
      return absl::FailedPreconditionError(absl::StrCat("step ", step, ": server ",
                                                        options_.server_name, " is in ", *held_,
                                                        "; steps wait for it to end"));
    }
    // The cluster committed a step this server did not (it aborted it
    // before the commit's word reached it): its weights are older than its
    // replicas'. It syncs first; no step runs on stale weights.
    if (order.committed_step > last_committed_ &&
        !(prepared_ && prepared_->step == order.committed_step)) {
      if (options_.on_behind) options_.on_behind(order.committed_step);
      return absl::FailedPreconditionError(absl::StrCat(
          "step ", step, ": server ", options_.server_name, " has committed step ", last_committed_,
          " but the cluster has committed step ", order.committed_step,
          options_.on_behind ? "; it syncs from its peers first" : ""));
    }
    // A step updates weights of the last committed step only: an expert
    // left behind (no replica to sync from) would get a later step's label
    // on older weights.
    for (ExpertKey expert : store_.HostedExperts()) {
      absl::StatusOr<uint64_t> at = store_.Step(expert);
      if (at.ok() && *at != last_committed_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "step ", step, ": server ", options_.server_name, " holds ", expert.ToString(),
            " at step ", *at, ", not the committed step ", last_committed_,
            " (it could not be synced); load or sync it before training"));
      }
    }
    // A prepared step that was never committed is superseded by a later one.
    if (prepared_) {
      superseded = std::move(prepared_);
      prepared_.reset();
      timer_.Cancel(superseded->timer_id);
      last_aborted_ = std::max(last_aborted_, superseded->step);
    }
    // Replicas behind the committed step hold no gradient of it (their
    // calls were refused): the rings close over the others.
    for (const StepRing& ring : rings_) {
      absl::StatusOr<StepRing> kept = LeaveOut(ring, order.left_out);
      if (!kept.ok()) {
        return absl::Status(kept.status().code(),
                            absl::StrCat("step ", step, ": ", kept.status().message()));
      }
      rings.push_back(*std::move(kept));
    }
    preparing_ = step;
    preparing_coordinator_ = order.coordinator;
  }
  if (superseded) {
    MOE_LOG(WARNING, "server ", options_.server_name, ": step ", superseded->step,
            " was prepared and never committed; dropped for step ", step);
    PutBack(*superseded);
    if (options_.on_resolved) options_.on_resolved(superseded->step, false);
  }
  {
    // After the superseded step's is back: it counts for this step.
    absl::MutexLock lock(&mu_);
    std::swap(gate_gradient, gate_gradient_);
  }

  Prepared prepared;
  prepared.step = step;
  prepared.coordinator = order.coordinator;
  prepared.gate_grad = std::move(gate_gradient);
  PrepareResult result;
  // The router updates the gate with it; kept here too, to put back.
  result.gate_gradient = prepared.gate_grad;
  absl::Status status;
  for (ExpertKey expert : store_.HostedExperts()) {
    ExpertWeights fresh;
    if (auto spare = TakeSpareGradients(expert); !spare.empty()) fresh = std::move(spare.mapped());
    absl::StatusOr<ExpertWeights> grads = store_.TakeGradients(expert, std::move(fresh));
    if (grads.ok()) prepared.local_grads.emplace(expert, *std::move(grads));
  }
  // Each expert's gradients: its sums in a fused buffer when replicated,
  // else its own.
  absl::StatusOr<std::vector<std::vector<float>>> sums =
      AllReduce(step, rings, prepared.local_grads, deadline, prepared.sum_spans, result);
  status = sums.status();
  if (status.ok()) {
    prepared.sums = *std::move(sums);
    if (order.defer_update) {
      // Clipping: the router scales by the global norm first (Update).
      result.grad_squared_norm = OwnedSquaredNorm(rings, prepared);
      result.update_deferred = true;
      prepared.awaiting_update = true;
      MOE_LOG(INFO, "server ", options_.server_name, ": step ", step, " all-reduced in ",
              absl::FormatDuration(result.allreduce_time),
              "; its update waits for the global gradient norm");
    } else {
      const absl::Time optimizer_start = absl::Now();
      status = ComputeUpdates({learning_rate, step, 1.0f}, prepared);
      result.optimizer_time = absl::Now() - optimizer_start;
      MOE_LOG(INFO, "server ", options_.server_name, ": step ", step, " prepared: all-reduce ",
              absl::FormatDuration(result.allreduce_time), ", optimizer ",
              absl::FormatDuration(result.optimizer_time), " for ", prepared.updated.size(),
              " experts");
    }
  }
  return KeepPrepared(std::move(prepared), std::move(status), deadline, result);
}

double StepExecutor::OwnedSquaredNorm(const std::vector<StepRing>& rings,
                                      const Prepared& prepared) const {
  // Each expert counts once in the cluster: a replicated one on its ring's
  // rank 0 (every rank holds the same sums), any other on its one server.
  double sum = 0.0;
  for (const StepRing& ring : rings) {
    if (ring.rank != 0) continue;
    for (ExpertKey expert : ring.experts) {
      for (absl::Span<const float> values : prepared.sum_spans.at(expert)) {
        sum += SquaredNorm(values);
      }
    }
  }
  for (const auto& [expert, local] : prepared.local_grads) {
    if (prepared.sum_spans.count(expert) != 0) continue;
    for (ExpertTensor which : kAllExpertTensors) sum += SquaredNorm(local.tensor(which).values());
  }
  return sum;
}

absl::Status StepExecutor::ComputeUpdates(const UpdateStep& update, Prepared& prepared) {
  absl::Status status;
  for (const auto& [expert, local] : prepared.local_grads) {
    auto it = prepared.sum_spans.find(expert);
    ExpertTensorSpans own;
    if (it == prepared.sum_spans.end()) {
      for (size_t i = 0; i < own.size(); ++i) own[i] = local.tensor(kAllExpertTensors[i]).values();
    }
    // Into last step's buffers where there are some (a map node moves
    // whole), else new ones.
    if (auto spare = TakeSpare(expert); !spare.empty()) prepared.updated.insert(std::move(spare));
    status = store_.ComputeUpdate(expert, options_.optimizer, update,
                                  it != prepared.sum_spans.end() ? it->second : own,
                                  prepared.updated[expert]);
    if (!status.ok()) break;
  }
  // The sums are read: their buffers serve the next step.
  prepared.sum_spans.clear();
  KeepSpareBuffers(std::move(prepared.sums));
  prepared.sums.clear();
  prepared.awaiting_update = false;
  return status;
}

absl::StatusOr<StepExecutor::PrepareResult> StepExecutor::KeepPrepared(Prepared prepared,
                                                                       absl::Status status,
                                                                       absl::Time deadline,
                                                                       PrepareResult result) {
  const uint64_t step = prepared.step;
  {
    absl::MutexLock lock(&mu_);
    preparing_.reset();
    if (status.ok() && step <= last_aborted_) {
      status = absl::AbortedError(absl::StrCat("step ", step, ": aborted while preparing"));
    }
    if (status.ok()) {
      // The router sends no commit after the step's deadline (it holds
      // the step lease no longer): a timeout counted from there does not
      // race a slow commit.
      const absl::Time when = std::max(absl::Now(), deadline) + options_.prepared_timeout;
      if (options_.ask_peers) {
        prepared.timer_id = ScheduleInquiry(step, when);
      } else {
        prepared.timer_id = timer_.Schedule(when, [this, step] {
          Abort(step, absl::StrCat("no commit or abort within ",
                                   absl::FormatDuration(options_.prepared_timeout),
                                   " after its deadline, and no peer to ask"));
        });
      }
      prepared.deadline = deadline;
      prepared_ = std::move(prepared);
      return result;
    }
    last_aborted_ = std::max(last_aborted_, step);
  }
  PutBack(prepared);
  return status;
}

absl::StatusOr<absl::Duration> StepExecutor::Update(uint64_t step, float learning_rate,
                                                    float grad_scale) {
  if (!(learning_rate >= 0.0f) || !std::isfinite(learning_rate) || !(grad_scale >= 0.0f) ||
      !(grad_scale <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("update of step ", step, ": learning_rate must be finite and >= 0 and ",
                     "grad_scale in [0, 1], got ", learning_rate, " and ", grad_scale));
  }
  Prepared prepared;
  {
    absl::MutexLock lock(&mu_);
    if (!prepared_ || prepared_->step != step || !prepared_->awaiting_update) {
      return absl::FailedPreconditionError(absl::StrCat("update of step ", step, ": server ",
                                                        options_.server_name, " has no such step ",
                                                        "all-reduced and awaiting its update"));
    }
    // Out of prepared_ while it computes: an abort meanwhile finds the step
    // "preparing" and is seen when it is kept again.
    prepared = std::move(*prepared_);
    prepared_.reset();
    timer_.Cancel(prepared.timer_id);
    preparing_ = step;
    preparing_coordinator_ = prepared.coordinator;
  }
  const absl::Time start = absl::Now();
  absl::Status status = ComputeUpdates({learning_rate, step, grad_scale}, prepared);
  const absl::Duration took = absl::Now() - start;
  MOE_LOG(INFO, "server ", options_.server_name, ": step ", step, " prepared: optimizer ",
          absl::FormatDuration(took), " for ", prepared.updated.size(),
          " experts, gradients scaled by ", grad_scale);
  const absl::Time deadline = prepared.deadline;
  absl::StatusOr<PrepareResult> kept =
      KeepPrepared(std::move(prepared), std::move(status), deadline, {});
  if (!kept.ok()) return kept.status();
  return took;
}

absl::StatusOr<std::vector<std::vector<float>>> StepExecutor::AllReduce(
    uint64_t step, const std::vector<StepRing>& rings,
    const std::map<ExpertKey, ExpertWeights>& local, absl::Time deadline,
    std::map<ExpertKey, ExpertTensorSpans>& grads, PrepareResult& result) {
  const absl::Time start = absl::Now();
  std::vector<std::shared_ptr<allreduce::RingAllReduce>> collectives;
  int64_t floats = 0;
  for (size_t g = 0; g < rings.size(); ++g) {
    const StepRing& ring = rings[g];
    size_t length = 0;
    for (ExpertKey expert : ring.experts) {
      auto it = local.find(expert);
      if (it == local.end()) {
        return absl::FailedPreconditionError(absl::StrCat("server ", options_.server_name,
                                                          " does not host ", expert.ToString(),
                                                          " of group ", absl::Hex(ring.group_id)));
      }
      for (ExpertTensor which : kAllExpertTensors) {
        length += it->second.tensor(which).values().size();
      }
    }
    // The one copy of the gradients: into the fused buffer (last step's,
    // whose pages are already mapped, when there is one).
    std::vector<float> buffer = TakeSpareBuffer(g);
    buffer.clear();
    buffer.reserve(length);
    for (ExpertKey expert : ring.experts) {
      for (ExpertTensor which : kAllExpertTensors) {
        absl::Span<const float> values = local.at(expert).tensor(which).values();
        buffer.insert(buffer.end(), values.begin(), values.end());
      }
    }
    floats += static_cast<int64_t>(buffer.size());
    collectives.push_back(allreduce::RingAllReduce::Create(
        {step, ring.group_id, ring.rank, ring.size, ring.predecessor, ring.successor,
         std::move(buffer)},
        options_.ring, ring.link));
  }
  if (!collectives.empty()) {
    MOE_LOG(INFO, "server ", options_.server_name, ": step ", step, ": all-reducing ", floats,
            " gradient floats over ", collectives.size(), " ring(s)");
  }
  for (const StepRing& ring : rings) {
    if (ring.link != nullptr) ring.link->RetryNow();
  }
  // Every group is registered before any starts: a segment for one group
  // never waits behind another's on a shared stream.
  for (auto& c : collectives) registry_.Register(c);
  for (auto& c : collectives) c->Start();
  absl::Status status;
  for (size_t g = 0; g < collectives.size(); ++g) {
    absl::Status s = collectives[g]->Wait(deadline);
    if (!s.ok() && status.ok()) {
      status = absl::Status(
          s.code(), absl::StrCat("server ", options_.server_name, ", replica group of experts [",
                                 JoinExpertKeys(rings[g].experts), "]: ", s.message()));
    }
    result.allreduce_bytes_sent += collectives[g]->bytes_sent();
  }
  for (auto& c : collectives) registry_.Unregister(*c);
  result.allreduce_time = absl::Now() - start;
  if (!status.ok()) return status;

  // The sums stay in the fused buffers; each expert's tensors are spans.
  std::vector<std::vector<float>> sums;
  sums.reserve(collectives.size());
  for (size_t g = 0; g < collectives.size(); ++g) {
    sums.push_back(collectives[g]->TakeBuffer());
    const float* next = sums.back().data();
    for (ExpertKey expert : rings[g].experts) {
      ExpertTensorSpans& spans = grads[expert];
      for (size_t i = 0; i < spans.size(); ++i) {
        const size_t n = local.at(expert).tensor(kAllExpertTensors[i]).values().size();
        spans[i] = absl::MakeConstSpan(next, n);
        next += n;
      }
    }
  }
  return sums;
}

absl::StatusOr<std::vector<std::pair<ExpertKey, uint64_t>>> StepExecutor::Commit(uint64_t step) {
  Prepared prepared;
  {
    absl::ReleasableMutexLock lock(&mu_);
    if (!prepared_ || prepared_->step != step) {
      // The cluster committed a step this server did not prepare (it was
      // left out, behind): it syncs to it.
      const bool behind = step > last_committed_ && !preparing_ && !prepared_ && options_.on_behind;
      absl::Status refused = absl::FailedPreconditionError(absl::StrCat(
          "commit of step ", step, ": server ", options_.server_name, " has ",
          prepared_ ? absl::StrCat("step ", prepared_->step, " prepared")
                    : std::string("no step prepared"),
          " (last committed ", last_committed_, ", last aborted ", last_aborted_, ")",
          behind ? "; it syncs from its peers" : ""));
      lock.Release();
      if (behind) options_.on_behind(step);
      return refused;
    }
    if (prepared_->awaiting_update) {
      return absl::FailedPreconditionError(
          absl::StrCat("commit of step ", step, ": server ", options_.server_name,
                       " has not computed its update yet (UpdateStep first)"));
    }
    prepared = std::move(*prepared_);
    prepared_.reset();
    timer_.Cancel(prepared.timer_id);
    last_committed_ = step;
  }
  const absl::Time start = absl::Now();
  std::vector<std::pair<ExpertKey, uint64_t>> digests;
  for (auto& [expert, updated] : prepared.updated) {
    const uint64_t digest = updated.weights.Digest();
    MOE_RETURN_IF_ERROR(store_.SwapInWeights(expert, updated, step));
    digests.emplace_back(expert, digest);
  }
  // `updated` now holds the weights before this step, and the gradients
  // taken are used up: buffers for the next step.
  KeepSpare(std::move(prepared.updated), std::move(prepared.local_grads));
  MOE_LOG(INFO, "server ", options_.server_name, ": step ", step, " committed: ",
          digests.size(), " experts installed in ", absl::FormatDuration(absl::Now() - start));
  return digests;
}

void StepExecutor::Abort(uint64_t step, const std::string& reason, const std::string& coordinator) {
  std::optional<Prepared> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (step <= last_committed_) return;  // too late: it is committed
    // Only the step's own router ends it (another's abort of the same
    // number is of its own, refused, attempt).
    const std::string* owner = nullptr;
    if (preparing_ && *preparing_ == step) owner = &preparing_coordinator_;
    if (prepared_ && prepared_->step == step) owner = &prepared_->coordinator;
    if (owner != nullptr && !coordinator.empty() && !owner->empty() && *owner != coordinator) {
      MOE_LOG(WARNING, "server ", options_.server_name, ": abort of step ", step, " from ",
              coordinator, " ignored: the step is ", *owner, "'s");
      return;
    }
    if ((preparing_ && *preparing_ == step) || (prepared_ && prepared_->step == step)) {
      last_aborted_ = std::max(last_aborted_, step);
    } else {
      // A step not started here (its Prepare may still be on the way): only
      // that step is refused later. Bounded, and not a watermark: an abort
      // of step 2^64-1 must not refuse every step to come.
      aborted_ahead_.insert(step);
      if (aborted_ahead_.size() > kMaxAbortedAhead) aborted_ahead_.erase(--aborted_ahead_.end());
    }
    if (prepared_ && prepared_->step == step) {
      dropped = std::move(prepared_);
      prepared_.reset();
      timer_.Cancel(dropped->timer_id);
    }
  }
  MOE_LOG(WARNING, "server ", options_.server_name, ": step ", step, " aborted: ", reason);
  // Ends its collectives here (a Prepare still running then puts its
  // gradients back itself) and refuses their late segments.
  registry_.AbortStep(step, absl::AbortedError(reason));
  if (dropped) PutBack(*dropped);
}

std::map<ExpertKey, ExpertSnapshot>::node_type StepExecutor::TakeSpare(ExpertKey expert) {
  absl::MutexLock lock(&mu_);
  return spare_.extract(expert);
}

std::map<ExpertKey, ExpertWeights>::node_type StepExecutor::TakeSpareGradients(ExpertKey expert) {
  absl::MutexLock lock(&mu_);
  return spare_grads_.extract(expert);
}

std::vector<float> StepExecutor::TakeSpareBuffer(size_t ring) {
  absl::MutexLock lock(&mu_);
  if (ring >= spare_buffers_.size()) return {};
  return std::move(spare_buffers_[ring]);
}

void StepExecutor::KeepSpareBuffers(std::vector<std::vector<float>> buffers) {
  absl::MutexLock lock(&mu_);
  spare_buffers_ = std::move(buffers);
}

void StepExecutor::KeepSpare(std::map<ExpertKey, ExpertSnapshot> updated,
                             std::map<ExpertKey, ExpertWeights> grads) {
  absl::MutexLock lock(&mu_);
  spare_ = std::move(updated);
  spare_grads_ = std::move(grads);
}

void StepExecutor::PutBack(const Prepared& prepared) {
  for (const auto& [expert, grads] : prepared.local_grads) {
    absl::Status status = store_.RestoreGradients(expert, grads);
    if (!status.ok()) {
      MOE_LOG(WARNING, "server ", options_.server_name, ": gradients of ", expert.ToString(),
              " not restored: ", status.message());
    }
  }
  if (prepared.gate_grad.empty()) return;
  absl::MutexLock lock(&mu_);
  if (gate_gradient_.empty()) {
    gate_gradient_ = prepared.gate_grad;
    return;
  }
  for (size_t i = 0; i < gate_gradient_.size(); ++i) gate_gradient_[i] += prepared.gate_grad[i];
}

absl::Status StepExecutor::AddGateGradient(uint64_t gate_step, int layer,
                                           absl::Span<const float> gradient) {
  const ModelConfig& model = store_.model();
  MOE_RETURN_IF_ERROR(CheckLayer(model, layer));
  const size_t size = static_cast<size_t>(model.d_model) * model.gate_width();
  if (gradient.size() != size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gate gradient: ", gradient.size(), " values, expected d_model x gate width = ", size));
  }
  for (float g : gradient) {
    if (!std::isfinite(g)) {
      return absl::InvalidArgumentError("gate gradient: a value is not finite");
    }
  }
  absl::MutexLock lock(&mu_);
  if (gate_step != last_committed_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "gate gradient of the gate of step ", gate_step, ": server ", options_.server_name,
        " has committed step ", last_committed_, " (the gradient is of another gate)"));
  }
  if (gate_gradient_.empty()) gate_gradient_.assign(size * model.num_layers, 0.0f);
  const absl::Span<float> rows = GateOfLayer(model, absl::MakeSpan(gate_gradient_), layer);
  for (size_t i = 0; i < size; ++i) rows[i] += gradient[i];
  return absl::OkStatus();
}

std::vector<float> StepExecutor::gate_gradient() const {
  absl::MutexLock lock(&mu_);
  return gate_gradient_;
}

std::vector<ExpertKey> StepExecutor::DropGradients() {
  std::vector<ExpertKey> dropped;
  for (ExpertKey expert : store_.HostedExperts()) {
    absl::StatusOr<bool> has = store_.HasGradients(expert);
    if (has.ok() && *has && store_.TakeGradients(expert).ok()) dropped.push_back(expert);
  }
  absl::MutexLock lock(&mu_);
  gate_gradient_.clear();
  return dropped;
}

}  // namespace moe::expert
