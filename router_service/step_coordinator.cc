#include "router_service/step_coordinator.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/atomic_file.h"
#include "common/checkpoint.h"
#include "common/expert_key.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "router_service/absent_servers.h"
#include "router_service/on_every_server.h"

namespace moe::router {
namespace {

// The failures, most telling first: a server that did not answer in time
// (stopped, or partitioned) before the ring errors it caused elsewhere.
template <typename Response>
absl::Status Summarize(uint64_t step, absl::string_view what,
                       const std::vector<absl::StatusOr<Response>>& results) {
  std::vector<absl::Status> failures;
  for (const auto& r : results) {
    if (!r.ok()) failures.push_back(r.status());
  }
  if (failures.empty()) return absl::OkStatus();
  auto rank = [](const absl::Status& s) {
    if (absl::IsDeadlineExceeded(s) && !absl::StrContains(s.message(), "all-reduce")) return 0;
    if (absl::IsUnavailable(s) && !absl::StrContains(s.message(), "all-reduce")) return 1;
    return 2;
  };
  std::stable_sort(failures.begin(), failures.end(),
                   [&](const auto& a, const auto& b) { return rank(a) < rank(b); });
  std::vector<std::string> messages;
  for (const absl::Status& s : failures) messages.emplace_back(s.message());
  return absl::Status(failures[0].code(), absl::StrCat("step ", step, " ", what, ": ",
                                                       absl::StrJoin(messages, "; ")));
}

constexpr char kStepLease[] = "step";
// A step's longest time (the step lease's time-to-live is at most 10
// minutes).
constexpr absl::Duration kMaxStepTime = absl::Minutes(9);

}  // namespace

StepCoordinator::StepCoordinator(Options options, Router& router, ExpertClient& client)
    : options_(options), router_(router), client_(client) {}

int StepCoordinator::NumServers() const {
  // Every server of the cluster takes part (also those that host nothing
  // now); the placement snapshot knows how many there are.
  return router_.placement()->value.num_servers();
}

absl::StatusOr<StepCoordinator::Numbers> StepCoordinator::NextStep(absl::Time deadline) {
  const Router::PlacementSnapshot placement = router_.placement();
  // A server that hosts nothing and is not running (absent_servers.h) sits
  // the step out; the lease keeper never does (it keeps the gate's
  // gradient).
  const ServerInfos asked = AskEveryServer(client_, placement->value, deadline, kLeaseKeeper);
  const std::vector<absl::StatusOr<v1::InfoResponse>>& infos = asked.infos;
  Numbers numbers;
  uint64_t last = 0;
  for (size_t s = 0; s < infos.size(); ++s) {
    const auto& info = infos[s];
    if (asked.absent[s]) continue;
    if (!info.ok()) {
      return absl::Status(info.status().code(),
                          absl::StrCat("step: cannot learn the servers' last step: ",
                                       info.status().message()));
    }
    numbers.committed = std::max<uint64_t>(numbers.committed, info->step());
    last = std::max<uint64_t>({last, info->step(), info->prepared_step(), info->aborted_step()});
  }
  numbers.step = std::max(next_step_, last + 1);
  next_step_ = numbers.step + 1;
  numbers.left_out = asked.absent;
  for (int s : asked.absent_servers()) {
    numbers.left_out_names.push_back(router_.cluster().servers.at(s).name);
  }
  if (!numbers.left_out_names.empty()) {
    MOE_LOG(INFO, "step ", numbers.step, ": server(s) ",
            absl::StrJoin(numbers.left_out_names, ", "),
            " host nothing and are not running: left out");
  }
  LeaveOutServersBehind(infos, numbers);
  return numbers;
}

void StepCoordinator::LeaveOutServersBehind(
    const std::vector<absl::StatusOr<v1::InfoResponse>>& infos, Numbers& numbers) const {
  const int n = static_cast<int>(infos.size());
  const size_t absent = numbers.left_out_names.size();
  // A server that prepared the last committed step commits it on this
  // step's word: it is not behind.
  auto behind = [&](const v1::InfoResponse& info) {
    return info.step() < numbers.committed && info.prepared_step() != numbers.committed;
  };
  const Router::PlacementSnapshot placement = router_.placement();
  if (placement->value.num_servers() != n) return;
  for (int s = 0; s < n; ++s) {
    if (s == kLeaseKeeper || numbers.left_out[s] || !behind(*infos[s])) continue;
    bool covered = true;
    for (ExpertKey expert : placement->value.ExpertsOn(s)) {
      bool current = false;
      for (int other : placement->value.ServersOf(expert)) {
        current |=
            other != s && !numbers.left_out[other] && infos[other].ok() && !behind(*infos[other]);
      }
      covered &= current;
    }
    if (!covered) continue;
    numbers.left_out[s] = true;
    numbers.left_out_names.push_back(infos[s]->server_name());
  }
  if (numbers.left_out_names.size() > absent) {
    MOE_LOG(
        WARNING, "step ", numbers.step, ": server(s) ",
        absl::StrJoin(numbers.left_out_names.begin() + absent, numbers.left_out_names.end(), ", "),
        " behind the committed step ", numbers.committed, " sit it out; their replicas run it");
  }
}

absl::Status StepCoordinator::AcquireStepLease(absl::Duration ttl, absl::Time deadline) {
  v1::AcquireLeaseRequest request;
  request.set_name(kStepLease);
  request.set_holder(router_.identity());
  request.set_ttl_ms(absl::ToInt64Milliseconds(ttl));
  const std::vector<absl::StatusOr<v1::AcquireLeaseResponse>> answer =
      OnEveryServer<v1::AcquireLeaseResponse>(1, [&](int, auto done) {
        client_.AcquireLease(kLeaseKeeper, request, deadline, std::move(done));
      });
  if (!answer[0].ok()) {
    return absl::Status(answer[0].status().code(),
                        absl::StrCat("step: the step lease (server ", kLeaseKeeper,
                                     "): ", answer[0].status().message()));
  }
  if (!answer[0]->granted()) {
    return absl::AbortedError(absl::StrCat("step: router ", answer[0]->holder(),
                                           " is running a step (its lease ends in ",
                                           answer[0]->expires_in_ms(), " ms); try again"));
  }
  return absl::OkStatus();
}

void StepCoordinator::ReleaseStepLease() {
  v1::AcquireLeaseRequest request;
  request.set_name(kStepLease);
  request.set_holder(router_.identity());
  request.set_release(true);
  // Not waited for: unreleased, it expires.
  client_.AcquireLease(kLeaseKeeper, request, absl::Now() + options_.abort_timeout,
                       [](absl::StatusOr<v1::AcquireLeaseResponse> r) {
                         if (!r.ok()) {
                           MOE_LOG(WARNING, "releasing the step lease: ", r.status().message());
                         }
                       });
}

absl::Status StepCoordinator::StartRunning(const char* what) {
  absl::MutexLock lock(&mu_);
  if (running_ != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(running_, " is already running"));
  }
  running_ = what;
  return absl::OkStatus();
}

void StepCoordinator::DoneRunning() {
  absl::MutexLock lock(&mu_);
  running_ = nullptr;
}

absl::StatusOr<StepCoordinator::Result> StepCoordinator::Step(float learning_rate,
                                                              absl::Time deadline) {
  absl::StatusOr<Result> result = RunStep(learning_rate, deadline);
  const int every = options_.checkpoint_every_steps;
  if (result.ok() && every > 0 && result->step % every == 0) {
    // The step is committed whatever the save does: a failed save is
    // logged (and counted by SaveCheckpoint's caller when asked directly).
    absl::StatusOr<Saved> saved =
        SaveCheckpoint(DType::kFloat32, absl::Now() + options_.checkpoint_timeout);
    if (!saved.ok()) {
      MOE_LOG(ERROR, "step ", result->step,
              ": periodic checkpoint failed: ", saved.status().message());
    }
  }
  return result;
}

absl::StatusOr<StepCoordinator::Result> StepCoordinator::RunStep(float learning_rate,
                                                                 absl::Time deadline) {
  const absl::Time start = absl::Now();
  // The lease bounds the step: a router that stops mid-step holds it up to
  // its end, then another may resolve the step.
  deadline = std::min({deadline, start + options_.default_timeout, start + kMaxStepTime});
  const float lr = learning_rate > 0.0f ? learning_rate : options_.default_learning_rate;
  if (!(learning_rate >= 0.0f) || !std::isfinite(learning_rate)) {
    return absl::InvalidArgumentError(
        absl::StrCat("learning_rate: must be finite and >= 0, got ", learning_rate));
  }
  MOE_RETURN_IF_ERROR(StartRunning("a step"));
  // Held past the deadline by the commit phase's time: no commit of this
  // step is sent after the lease ends.
  const absl::Duration lease = (deadline - start) + 2 * options_.abort_timeout;
  if (absl::Status leased = AcquireStepLease(lease, deadline); !leased.ok()) {
    DoneRunning();
    return leased;
  }
  absl::StatusOr<Result> result = LeasedStep(lr, start, deadline);
  ReleaseStepLease();
  DoneRunning();
  return result;
}

absl::StatusOr<StepCoordinator::Result> StepCoordinator::LeasedStep(float lr, absl::Time start,
                                                                    absl::Time deadline) {
  Numbers numbers;
  {
    absl::MutexLock lock(&mu_);
    MOE_ASSIGN_OR_RETURN(numbers, NextStep(deadline));
  }
  const uint64_t step = numbers.step;
  // The gate this step updates is the committed one: a step through
  // another router since this one's last leaves this one's behind.
  if (router_.gate()->version < numbers.committed) {
    MOE_RETURN_IF_ERROR(router_.AdoptServersGate(deadline));
  }
  if (router_.gate()->version != numbers.committed) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", step, ": this router's gate is of step ", router_.gate()->version,
                     " and the servers have committed step ", numbers.committed,
                     "; no server holds that step's gate (it reaches them with the next commit)"));
  }

  // The router answers a little before the client's deadline, and the
  // servers' all-reduces end a little before the router stops waiting: a
  // ring failure comes back as itself, and a silent server is named.
  const absl::Duration margin = std::min(absl::Milliseconds(500), (deadline - start) / 10);
  const absl::Time router_deadline = deadline - margin;
  const absl::Time server_deadline = router_deadline - 2 * margin;
  v1::PrepareStepRequest prepare;
  prepare.set_step(step);
  prepare.set_learning_rate(lr);
  prepare.set_deadline_unix_micros(absl::ToUnixMicros(server_deadline));
  prepare.set_committed_step(numbers.committed);
  prepare.set_coordinator(router_.identity());
  for (const std::string& name : numbers.left_out_names) prepare.add_left_out(name);
  // Servers left out are not asked (an empty answer stands for theirs).
  const std::vector<bool>& left_out = numbers.left_out;
  // Clipping needs the norm of every gradient before any is applied: the
  // servers all-reduce and report, then update with the scale.
  const OptimizerOptions& optimizer = router_.model().optimizer;
  const bool clip = optimizer.max_grad_norm > 0.0f;
  prepare.set_defer_update(clip);
  std::vector<absl::StatusOr<v1::PrepareStepResponse>> prepared =
      OnEveryServer<v1::PrepareStepResponse>(NumServers(), [&](int s, auto done) {
        if (left_out[s]) return std::move(done)(v1::PrepareStepResponse());
        client_.PrepareStep(s, prepare, router_deadline, std::move(done));
      });
  if (absl::Status failed = Summarize(step, "aborted", prepared); !failed.ok()) {
    AbortEverywhere(step, std::string(failed.message()));
    return failed;
  }
  // The gate's gradient: of every Backward since the last step (the lease
  // keeper's answer carries it).
  absl::StatusOr<FloatTensor> gate_gradient = GateGradient(step, prepared);
  if (!gate_gradient.ok()) {
    AbortEverywhere(step, std::string(gate_gradient.status().message()));
    return gate_gradient.status();
  }
  float grad_scale = 1.0f;
  if (clip) {
    double squared = SquaredNorm(gate_gradient->values());
    for (const auto& r : prepared) squared += r->grad_squared_norm();
    grad_scale = ClipScale(optimizer, squared);
    MOE_LOG(INFO, "step ", step, ": gradient norm ", std::sqrt(squared), ", scaled by ",
            grad_scale);
    v1::UpdateStepRequest update;
    update.set_step(step);
    update.set_learning_rate(lr);
    update.set_grad_scale(grad_scale);
    std::vector<absl::StatusOr<v1::UpdateStepResponse>> updated =
        OnEveryServer<v1::UpdateStepResponse>(NumServers(), [&](int s, auto done) {
          if (left_out[s]) return std::move(done)(v1::UpdateStepResponse());
          client_.UpdateStep(s, update, router_deadline, std::move(done));
        });
    if (absl::Status failed = Summarize(step, "aborted", updated); !failed.ok()) {
      AbortEverywhere(step, std::string(failed.message()));
      return failed;
    }
    for (size_t s = 0; s < updated.size(); ++s) {
      prepared[s]->set_optimizer_seconds(updated[s]->optimizer_seconds());
    }
  }
  absl::StatusOr<Router::GateStep> prepared_gate =
      router_.PrepareGateStep({lr, step, grad_scale}, *gate_gradient);
  if (!prepared_gate.ok()) {
    AbortEverywhere(step, std::string(prepared_gate.status().message()));
    return prepared_gate.status();
  }
  Router::GateStep& gate = *prepared_gate;

  // Every server has prepared: the step is decided, and committed.
  const absl::Time commit_start = absl::Now();
  v1::CommitStepRequest commit;
  commit.set_step(step);
  // Every server keeps the committed gate, so that every router (others,
  // and this one after a restart) serves it (GetGate).
  EncodeFloats(gate.gate.values(), gate.gate.shape(), DType::kFloat32, commit.mutable_gate());
  const int state = OptimizerStateTensors(router_.model().optimizer.type);
  if (state >= 1) {
    EncodeFloats(gate.velocity.values(), gate.velocity.shape(), DType::kFloat32,
                 commit.mutable_gate_velocity());
  }
  if (state >= 2) {
    EncodeFloats(gate.second_moment.values(), gate.second_moment.shape(), DType::kFloat32,
                 commit.mutable_gate_second_moment());
  }
  std::vector<absl::StatusOr<v1::CommitStepResponse>> committed =
      CommitEverywhere(commit, left_out);
  Result result;
  result.step = step;
  result.servers_left_out = numbers.left_out_names;
  for (size_t s = 0; s < committed.size(); ++s) {
    if (!committed[s].ok()) result.servers_behind.emplace_back(committed[s].status().message());
  }
  const size_t ran = std::count(left_out.begin(), left_out.end(), false);
  if (result.servers_behind.size() == ran) {
    // No server confirmed: it is committed where a commit arrived unseen,
    // else nowhere; the next step (or the servers' own inquiry) settles
    // it, and a commit that arrived brings its gate to this router then.
    return absl::UnavailableError(absl::StrCat(
        "step ", step, ": every server prepared it, and none confirmed its commit (",
        absl::StrJoin(result.servers_behind, "; "),
        "); it is committed where the commit arrived, and the next step settles the rest"));
  }
  // Servers that committed have moved on: the gate moves with them.
  router_.CommitGateStep(std::move(gate));
  // The commit tells a server left out that the cluster moved on: it
  // syncs (refusing the commit it did not prepare). Not waited for.
  for (int s = 0; s < NumServers(); ++s) {
    if (!left_out[s]) continue;
    client_.CommitStep(s, commit, absl::Now() + options_.abort_timeout,
                       [](absl::StatusOr<v1::CommitStepResponse>) {});
  }
  result.commit_time = absl::Now() - commit_start;
  if (!result.servers_behind.empty()) {
    MOE_LOG(WARNING, "step ", step, " committed; ", result.servers_behind.size(),
            " server(s) did not confirm and commit it when they hear from a peer or the next "
            "step: ",
            absl::StrJoin(result.servers_behind, "; "));
  }
  // Replicas of an expert must hold the same bits.
  std::map<ExpertKey, uint64_t> digest_of;
  for (const auto& r : committed) {
    if (!r.ok()) continue;
    for (const v1::ExpertDigest& d : r->experts()) {
      auto [it, first] = digest_of.emplace(ExpertKeyOf(d), d.weights_digest());
      if (it->second != d.weights_digest()) {
        return absl::DataLossError(absl::StrCat("step ", step, ": replicas of ",
                                                ExpertKeyOf(d).ToString(),
                                                " differ after the commit"));
      }
    }
  }
  result.step_time = absl::Now() - start;
  for (const auto& r : prepared) {
    result.allreduce_time =
        std::max(result.allreduce_time, absl::Seconds(r->allreduce_seconds()));
    result.optimizer_time =
        std::max(result.optimizer_time, absl::Seconds(r->optimizer_seconds()));
  }
  return result;
}

absl::StatusOr<FloatTensor> StepCoordinator::GateGradient(
    uint64_t step, const std::vector<absl::StatusOr<v1::PrepareStepResponse>>& prepared) {
  const ModelConfig& model = router_.model();
  // Zero when no Backward ran since the last step (momentum still moves
  // the gate, as in the reference).
  FloatTensor gradient(model.gate_shape());
  for (size_t s = 0; s < prepared.size(); ++s) {
    if (!prepared[s]->has_gate_gradient()) continue;
    const TensorSpec spec{
        "gate_gradient", model.gate_shape(), {"num_layers x d_model", "gate width"}};
    absl::StatusOr<ConstTensorView> view = DecodeTensor(prepared[s]->gate_gradient(), spec);
    if (!view.ok() || view->dtype != DType::kFloat32) {
      return absl::InternalError(
          absl::StrCat("step ", step, ": server ", s, " answered a bad gate gradient: ",
                       view.ok() ? std::string("not fp32") : std::string(view.status().message())));
    }
    const FloatTensor part = ToFloatTensor(*view);
    absl::Span<float> sum = gradient.mutable_values();
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += part.values()[i];
  }
  return gradient;
}

std::vector<absl::StatusOr<v1::CommitStepResponse>> StepCoordinator::CommitEverywhere(
    const v1::CommitStepRequest& commit, const std::vector<bool>& left_out) {
  const absl::Time deadline = absl::Now() + options_.abort_timeout;
  std::vector<absl::StatusOr<v1::CommitStepResponse>> committed(NumServers(),
                                                                absl::UnknownError("not sent"));
  std::vector<int> pending;
  for (int s = 0; s < NumServers(); ++s) {
    if (left_out[s]) {
      committed[s] = v1::CommitStepResponse();
    } else {
      pending.push_back(s);
    }
  }
  constexpr int kAttempts = 3;
  for (int attempt = 0; attempt < kAttempts && !pending.empty(); ++attempt) {
    const absl::Time now = absl::Now();
    if (now >= deadline) break;
    // Each attempt gets its share of what is left.
    const absl::Time attempt_deadline = now + (deadline - now) / (kAttempts - attempt);
    std::vector<absl::StatusOr<v1::CommitStepResponse>> answers =
        OnEveryServer<v1::CommitStepResponse>(
            static_cast<int>(pending.size()), [&](int i, auto done) {
              client_.CommitStep(pending[i], commit, attempt_deadline, std::move(done));
            });
    std::vector<int> again;
    for (size_t i = 0; i < pending.size(); ++i) {
      const int s = pending[i];
      if (answers[i].ok()) {
        committed[s] = std::move(answers[i]);
        continue;
      }
      committed[s] = answers[i].status();
      // A refusal (it has no such step prepared) is final; a lost call is
      // tried again.
      if (absl::IsUnavailable(answers[i].status()) ||
          absl::IsDeadlineExceeded(answers[i].status())) {
        again.push_back(s);
      }
    }
    pending = std::move(again);
  }
  return committed;
}

absl::StatusOr<StepCoordinator::Saved> StepCoordinator::SaveCheckpoint(DType dtype,
                                                                       absl::Time deadline) {
  MOE_RETURN_IF_ERROR(StartRunning("a checkpoint save"));
  absl::StatusOr<Saved> saved = Save(dtype, deadline);
  DoneRunning();
  if (saved.ok()) {
    if (options_.on_saved) options_.on_saved(saved->step);
    MOE_LOG(INFO, "checkpoint of step ", saved->step, " saved to ", saved->directory, ": ",
            saved->files.size(), " shard(s), ", saved->bytes >> 20, " MiB in ",
            absl::FormatDuration(saved->time));
  }
  return saved;
}

absl::StatusOr<StepCoordinator::Saved> StepCoordinator::Save(DType dtype, absl::Time deadline) {
  const absl::Time start = absl::Now();
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError("this router has no --checkpoint_dir to save into");
  }
  // No step runs here meanwhile: the gate and every expert are at `step`
  // (each server checks its experts are).
  const Router::GateState gate_state = router_.gate_state();
  const Router::GateSnapshot& gate = gate_state.gate;
  const Router::PlacementSnapshot placement = router_.placement();
  const ModelConfig& model = router_.model();
  const uint64_t step = gate->version;
  Saved saved;
  saved.step = step;
  const std::string relative = absl::StrCat("step-", step);
  saved.directory = absl::StrCat(options_.checkpoint_dir, "/", relative);

  // Each expert once, from the healthy replica with the fewest experts to
  // write so far (the servers write in parallel); a shard per server that
  // writes any, then the gate's.
  std::map<int, std::vector<ExpertKey>> experts_of_writer;
  std::vector<int> assigned(placement->value.num_servers(), 0);
  for (int64_t i = 0; i < model.total_experts(); ++i) {
    const ExpertKey expert(static_cast<int>(i / model.experts_per_layer()),
                           static_cast<int>(i % model.experts_per_layer()));
    int writer = -1;
    for (int s : placement->value.ServersOf(expert)) {
      if (client_.IsHealthy(s) && (writer < 0 || assigned[s] < assigned[writer])) writer = s;
    }
    if (writer < 0) {
      return absl::UnavailableError(absl::StrCat("checkpoint of step ", step, ": ",
                                                 expert.ToString(), " has no live replica"));
    }
    experts_of_writer[writer].push_back(expert);
    ++assigned[writer];
  }
  const int num_shards = static_cast<int>(experts_of_writer.size()) + 1;
  // The optimizer's state too, in shards of its own.
  const std::vector<std::string> states = OptimizerStateNames(model.optimizer.type);
  std::vector<int> writers;
  std::vector<v1::SaveExpertsRequest> requests;
  for (const auto& [server, experts] : experts_of_writer) {
    v1::SaveExpertsRequest& request = requests.emplace_back();
    writers.push_back(server);
    request.set_path(absl::StrCat(relative, "/", ShardFileName(writers.size(), num_shards)));
    if (!states.empty()) {
      request.set_optimizer_path(
          absl::StrCat(relative, "/", OptimizerShardFileName(writers.size(), num_shards)));
    }
    request.set_step(step);
    request.set_dtype(ToProtoDType(dtype));
    for (ExpertKey expert : experts) SetExpertKey(expert, request.add_experts());
  }
  MOE_RETURN_IF_ERROR(MakeDirectories(saved.directory));
  std::vector<absl::StatusOr<v1::SaveExpertsResponse>> written =
      OnEveryServer<v1::SaveExpertsResponse>(
          static_cast<int>(writers.size()), [&](int w, auto done) {
            client_.SaveExperts(writers[w], requests[w], deadline, std::move(done));
          });
  std::map<std::string, std::string> weight_map, state_map;
  int64_t state_bytes = 0;
  for (size_t w = 0; w < writers.size(); ++w) {
    if (!written[w].ok()) {
      return absl::Status(written[w].status().code(),
                          absl::StrCat("checkpoint of step ", step, ": server ", writers[w], ": ",
                                       written[w].status().message()));
    }
    const std::string file = ShardFileName(w + 1, num_shards);
    for (const std::string& name : written[w]->tensor_names()) weight_map[name] = file;
    saved.bytes += written[w]->bytes();
    saved.files.push_back(file);
    const std::string state_file = OptimizerShardFileName(w + 1, num_shards);
    for (const std::string& name : written[w]->optimizer_tensor_names()) {
      state_map[name] = state_file;
    }
    state_bytes += written[w]->optimizer_bytes();
  }
  // The gates, one tensor per layer as the checkpoint names them.
  const std::vector<MoeWeights> gates = SplitGates(model, gate->value);
  std::vector<ShardPart> gate_parts;
  for (const MoeWeights& layer : gates) gate_parts.push_back({"", &layer});
  const std::string gate_file = ShardFileName(num_shards, num_shards);
  std::vector<std::string> gate_names;
  MOE_ASSIGN_OR_RETURN(const int64_t gate_bytes,
                       SaveCheckpointShard(absl::StrCat(saved.directory, "/", gate_file), model,
                                           gate_parts, dtype, &gate_names));
  for (const std::string& name : gate_names) weight_map[name] = gate_file;
  saved.bytes += gate_bytes;
  saved.files.push_back(gate_file);
  if (!states.empty()) {
    // The gate's state, then the optimizer's index: before the weights'
    // index, which makes the checkpoint.
    std::vector<std::vector<MoeWeights>> gate_states;
    const FloatTensor* held[] = {&gate_state.velocity, &gate_state.second_moment};
    std::vector<ShardPart> parts;
    for (size_t k = 0; k < states.size(); ++k) {
      gate_states.push_back(SplitGates(model, *held[k]));
    }
    for (size_t k = 0; k < states.size(); ++k) {
      for (const MoeWeights& layer : gate_states[k]) parts.push_back({states[k], &layer});
    }
    const std::string state_file = OptimizerShardFileName(num_shards, num_shards);
    std::vector<std::string> names;
    MOE_ASSIGN_OR_RETURN(const int64_t bytes,
                         SaveCheckpointShard(absl::StrCat(saved.directory, "/", state_file), model,
                                             parts, DType::kFloat32, &names));
    for (const std::string& name : names) state_map[name] = state_file;
    state_bytes += bytes;
    MOE_RETURN_IF_ERROR(WriteOptimizerIndex(saved.directory, model, state_map, state_bytes,
                                            {step, options_.lineage}));
  }
  if (router_.gate()->version != step) {
    return absl::AbortedError(absl::StrCat("checkpoint of step ", step,
                                           ": a step was committed meanwhile (another router?)"));
  }
  MOE_RETURN_IF_ERROR(WriteCheckpointIndex(saved.directory, model, weight_map, saved.bytes,
                                           {step, options_.lineage}));
  saved.time = absl::Now() - start;
  return saved;
}

void StepCoordinator::AbortEverywhere(uint64_t step, const std::string& reason) {
  MOE_LOG(WARNING, reason, "; aborting it on every server");
  v1::AbortStepRequest abort;
  abort.set_step(step);
  abort.set_reason(reason);
  abort.set_coordinator(router_.identity());
  // Not waited for: a stopped server must not hold the answer. A server
  // that never hears it aborts by itself after its timeout.
  for (int s = 0; s < NumServers(); ++s) {
    client_.AbortStep(s, abort, absl::Now() + options_.abort_timeout,
                      [step](absl::StatusOr<v1::AbortStepResponse> r) {
                        if (!r.ok()) MOE_LOG(WARNING, "step ", step, ": ", r.status().message());
                      });
  }
}

}  // namespace moe::router
