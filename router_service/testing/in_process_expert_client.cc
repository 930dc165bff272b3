#include "router_service/testing/in_process_expert_client.h"

#include "absl/strings/str_cat.h"
#include "common/expert_key.h"
#include "common/log.h"

namespace moe::router::testing {
namespace {

std::string ServerName(int server) { return absl::StrCat("server-", server); }

// What a killed server answers.
absl::Status Down(int server) {
  return absl::UnavailableError(absl::StrCat(ServerName(server), " is down"));
}

}  // namespace

InProcessExpertClient::InProcessExpertClient(const ModelConfig& model, const Placement& placement,
                                             absl::Span<const MoeWeights> layers,
                                             expert::KernelFactory kernel_factory) {
  metrics_ = expert::ExpertMetrics::Create(registry_, model);
  pool_ = std::make_unique<ComputePool>(2, 1 << 16);
  const int num_servers = placement.num_servers();
  for (int s = 0; s < num_servers; ++s) {
    auto server = std::make_unique<Server>();
    std::map<ExpertKey, ExpertWeights> experts;
    for (ExpertKey e : placement.ExpertsOn(s)) {
      experts.emplace(e, layers.at(e.layer).experts.at(e.expert));
    }
    auto store = expert::ExpertStore::Create({model, ServerName(s), {}}, std::move(experts),
                                             kernel_factory);
    MOE_CHECK(store.ok(), store.status().ToString());
    server->store = *std::move(store);
    server->collectives = std::make_unique<allreduce::CollectiveRegistry>();
    servers_.push_back(std::move(server));
  }
  // Rings need every server's registry.
  for (int s = 0; s < num_servers; ++s) {
    Server& server = *servers_[s];
    server.ring_links.resize(num_servers);
    std::vector<expert::StepRing> rings =
        expert::StepRingsOf(placement, s, ServerName, ServerName, [&](int to) {
          auto& link = server.ring_links[to];
          if (link == nullptr) {
            link = std::make_unique<allreduce::LoopbackRingLink>(servers_[to]->collectives.get());
          }
          return static_cast<allreduce::RingLink*>(link.get());
        });
    for (const expert::StepRing& ring : rings) server.collectives->AddGroup(ring.group_id);
    server.steps = std::make_unique<expert::StepExecutor>(
        expert::StepExecutor::Options{model.optimizer, ServerName(s), std::move(rings)},
        *server.store, *server.collectives);
    server.step_pool = std::make_unique<ComputePool>(1, 64);
    server.dispatcher = std::make_unique<expert::ExpertDispatcher>(
        expert::ExpertDispatcher::Options{ServerName(s)}, *server.store, *metrics_, nullptr,
        server.steps.get());
  }
}

InProcessExpertClient::~InProcessExpertClient() {
  for (size_t s = 0; s < servers_.size(); ++s) Unstall(s);
  pool_.reset();
  // Steps in flight end (their rings still up), then the rings go.
  for (auto& server : servers_) server->step_pool.reset();
  for (auto& server : servers_) server->collectives->Shutdown();
  for (auto& server : servers_) {
    server->dispatcher.reset();
    server->steps.reset();
  }
  for (auto& server : servers_) server->ring_links.clear();
}

void InProcessExpertClient::Forward(int server, const v1::DispatchRequest& request,
                                    absl::string_view rows, ForwardDone done) {
  ++forwards_;
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  ++s.calls;
  {
    absl::MutexLock lock(&dispatched_mu_);
    dispatched_.push_back(
        {request.request_id(), server, ExpertKeyOf(request), request.tokens_rounded_to_bf16()});
  }
  auto copy = std::make_unique<v1::DispatchRequest>(request);
  copy->mutable_tokens()->set_data(rows.data(), rows.size());
  auto shared_done = std::make_shared<ForwardDone>(std::move(done));
  absl::AnyInvocable<void()&&> work = [&s, copy = std::move(copy), shared_done]() mutable {
    s.dispatcher->Dispatch(
        std::move(copy), std::make_unique<v1::DispatchResponse>(),
        [shared_done](std::unique_ptr<v1::DispatchResponse> response) {
          std::move (*shared_done)(std::make_unique<ExpertAnswer>(std::move(*response)));
        });
  };
  {
    absl::MutexLock lock(&s.mu);
    if (s.stalled) {
      s.held.push_back(std::move(work));
      return;
    }
  }
  MOE_CHECK(pool_->Submit(std::move(work)));
}

std::vector<InProcessExpertClient::Dispatched> InProcessExpertClient::dispatched() const {
  absl::MutexLock lock(&dispatched_mu_);
  return dispatched_;
}

void InProcessExpertClient::Stall(int server) {
  Server& s = *servers_.at(server);
  absl::MutexLock lock(&s.mu);
  s.stalled = true;
}

void InProcessExpertClient::Unstall(int server) {
  Server& s = *servers_.at(server);
  std::vector<absl::AnyInvocable<void() &&>> held;
  {
    absl::MutexLock lock(&s.mu);
    s.stalled = false;
    held.swap(s.held);
  }
  for (auto& work : held) MOE_CHECK(pool_->Submit(std::move(work)));
}

void InProcessExpertClient::Backward(int server, const v1::BackwardDispatchRequest& request,
                                     BackwardDone done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  ++s.calls;
  auto shared_done = std::make_shared<BackwardDone>(std::move(done));
  const bool accepted = pool_->Submit([&s, request, shared_done]() mutable {
    auto response = std::make_unique<v1::BackwardDispatchResponse>();
    s.dispatcher->Backward(request, response.get());
    std::move(*shared_done)(std::move(response));
  });
  MOE_CHECK(accepted);
}

void InProcessExpertClient::CancelForward(int, uint64_t) { ++cancels_; }

template <typename Response, typename Call>
void InProcessExpertClient::RunStepCall(int server, Call call, UnaryDone<Response> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  ++s.calls;
  auto shared_done = std::make_shared<UnaryDone<Response>>(std::move(done));
  const bool accepted = s.step_pool->Submit([&s, call = std::move(call), shared_done]() mutable {
    Response response;
    const absl::Status status = call(*s.dispatcher, response);
    if (status.ok()) {
      std::move(*shared_done)(std::move(response));
    } else {
      std::move(*shared_done)(status);
    }
  });
  if (!accepted) {
    std::move(*shared_done)(absl::ResourceExhaustedError("step queue full"));
  }
}

void InProcessExpertClient::PrepareStep(int server, const v1::PrepareStepRequest& request,
                                        absl::Time deadline,
                                        UnaryDone<v1::PrepareStepResponse> done) {
  RunStepCall<v1::PrepareStepResponse>(
      server,
      [request, deadline](expert::ExpertDispatcher& d, v1::PrepareStepResponse& response) {
        return d.PrepareStep(request, deadline, &response);
      },
      std::move(done));
}

void InProcessExpertClient::CommitStep(int server, const v1::CommitStepRequest& request,
                                       absl::Time, UnaryDone<v1::CommitStepResponse> done) {
  std::atomic<int>& lost = servers_.at(server)->lost_commits;
  int n = lost.load();
  while (n > 0 && !lost.compare_exchange_weak(n, n - 1)) {
  }
  if (n > 0) {
    std::move(done)(absl::UnavailableError(absl::StrCat(ServerName(server), " CommitStep: lost")));
    return;
  }
  RunStepCall<v1::CommitStepResponse>(
      server,
      [request](expert::ExpertDispatcher& d, v1::CommitStepResponse& response) {
        return d.CommitStep(request, &response);
      },
      std::move(done));
}

void InProcessExpertClient::UpdateStep(int server, const v1::UpdateStepRequest& request, absl::Time,
                                       UnaryDone<v1::UpdateStepResponse> done) {
  RunStepCall<v1::UpdateStepResponse>(
      server,
      [request](expert::ExpertDispatcher& d, v1::UpdateStepResponse& response) {
        return d.UpdateStep(request, &response);
      },
      std::move(done));
}

void InProcessExpertClient::SaveExperts(int server, const v1::SaveExpertsRequest& request,
                                        absl::Time, UnaryDone<v1::SaveExpertsResponse> done) {
  RunStepCall<v1::SaveExpertsResponse>(
      server,
      [request](expert::ExpertDispatcher& d, v1::SaveExpertsResponse& response) {
        return d.SaveExperts(request, &response);
      },
      std::move(done));
}

namespace {

absl::Status NoPlacementChanges() {
  return absl::FailedPreconditionError(
      "the in-process cluster changes no placement (tests of placement changes run processes)");
}

}  // namespace

void InProcessExpertClient::PreparePlacement(int, const v1::PreparePlacementRequest&, absl::Time,
                                             UnaryDone<v1::PreparePlacementResponse> done) {
  std::move(done)(NoPlacementChanges());
}

void InProcessExpertClient::CommitPlacement(int, const v1::CommitPlacementRequest&, absl::Time,
                                            UnaryDone<v1::CommitPlacementResponse> done) {
  std::move(done)(NoPlacementChanges());
}

void InProcessExpertClient::AbortPlacement(int, const v1::AbortPlacementRequest&, absl::Time,
                                           UnaryDone<v1::AbortPlacementResponse> done) {
  std::move(done)(NoPlacementChanges());
}

void InProcessExpertClient::AcquireLease(int server, const v1::AcquireLeaseRequest& request,
                                         absl::Time, UnaryDone<v1::AcquireLeaseResponse> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  std::move(done)(expert::AnswerLeaseRequest(s.leases, request, absl::Now()));
}

void InProcessExpertClient::AbortStep(int server, const v1::AbortStepRequest& request,
                                      absl::Time, UnaryDone<v1::AbortStepResponse> done) {
  // At once, not behind a Prepare on the step thread: it must be able to
  // stop one (as the gRPC service does).
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  const absl::Status status = s.dispatcher->AbortStep(request);
  if (status.ok()) {
    std::move(done)(v1::AbortStepResponse());
  } else {
    std::move(done)(status);
  }
}

void InProcessExpertClient::Info(int server, absl::Time, UnaryDone<v1::InfoResponse> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  v1::InfoResponse info;
  s.dispatcher->Info(&info);
  std::move(done)(std::move(info));
}

void InProcessExpertClient::AddGateGradient(int server, const v1::AddGateGradientRequest& request,
                                            absl::Time,
                                            UnaryDone<v1::AddGateGradientResponse> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  const absl::Status status = s.dispatcher->AddGateGradient(request);
  if (status.ok()) {
    std::move(done)(v1::AddGateGradientResponse());
  } else {
    std::move(done)(status);
  }
}

void InProcessExpertClient::GetGate(int server, absl::Time, UnaryDone<v1::GetGateResponse> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(Down(server));
    return;
  }
  v1::GetGateResponse gate;
  const absl::Status status = s.dispatcher->GetGate(&gate);
  if (status.ok()) {
    std::move(done)(std::move(gate));
  } else {
    std::move(done)(status);
  }
}

bool InProcessExpertClient::IsHealthy(int server) const {
  return servers_.at(server)->looks_healthy;
}

void InProcessExpertClient::Kill(int server) {
  servers_.at(server)->alive = false;
  servers_.at(server)->looks_healthy = false;
}

void InProcessExpertClient::BreakSilently(int server) { servers_.at(server)->alive = false; }

void InProcessExpertClient::Revive(int server) {
  servers_.at(server)->alive = true;
  servers_.at(server)->looks_healthy = true;
}

}  // namespace moe::router::testing
