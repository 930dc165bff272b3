#include "router_service/testing/in_process_expert_client.h"

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace moe::router::testing {

InProcessExpertClient::InProcessExpertClient(const ModelConfig& model,
                                             const Placement& placement,
                                             const MoeWeights& weights,
                                             expert::KernelFactory kernel_factory) {
  metrics_ = expert::ExpertMetrics::Create(registry_, model.num_experts);
  pool_ = std::make_unique<ComputePool>(2, 1 << 16);
  for (int s = 0; s < placement.num_servers(); ++s) {
    auto server = std::make_unique<Server>();
    std::map<int, ExpertWeights> experts;
    for (int e : placement.ExpertsOn(s)) experts.emplace(e, weights.experts.at(e));
    const std::string name = absl::StrCat("server-", s);
    auto store = expert::ExpertStore::Create({model, name, {}}, std::move(experts),
                                             kernel_factory);
    MOE_CHECK(store.ok(), store.status().ToString());
    server->store = *std::move(store);
    server->service = std::make_unique<expert::ExpertServiceImpl>(
        expert::ExpertServiceImpl::Options{name}, *server->store, *pool_, *metrics_, nullptr);
    servers_.push_back(std::move(server));
  }
}

InProcessExpertClient::~InProcessExpertClient() {
  for (size_t s = 0; s < servers_.size(); ++s) Unstall(s);
  pool_.reset();
}

void InProcessExpertClient::Forward(int server, const v1::DispatchRequest& request,
                                    ForwardDone done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(absl::UnavailableError(absl::StrCat("server-", server, " is down")));
    return;
  }
  ++s.calls;
  auto copy = std::make_unique<v1::DispatchRequest>(request);
  auto shared_done = std::make_shared<ForwardDone>(std::move(done));
  absl::AnyInvocable<void() &&> work = [&s, copy = std::move(copy), shared_done]() mutable {
    s.service->HandleDispatch(
        std::move(copy), std::make_unique<v1::DispatchResponse>(),
        [shared_done](std::unique_ptr<v1::DispatchResponse> response) {
          std::move (*shared_done)(std::move(response));
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
    std::move(done)(absl::UnavailableError(absl::StrCat("server-", server, " is down")));
    return;
  }
  ++s.calls;
  auto shared_done = std::make_shared<BackwardDone>(std::move(done));
  const bool accepted = pool_->Submit([&s, request, shared_done]() mutable {
    auto response = std::make_unique<v1::BackwardDispatchResponse>();
    s.service->HandleBackward(request, response.get());
    std::move(*shared_done)(std::move(response));
  });
  MOE_CHECK(accepted);
}

namespace {

absl::Status NoRing(int server) {
  return absl::FailedPreconditionError(
      absl::StrCat("server-", server, ": in-process servers run no training steps"));
}

}  // namespace

void InProcessExpertClient::CancelForward(int, uint64_t) { ++cancels_; }

void InProcessExpertClient::PrepareStep(int server, const v1::PrepareStepRequest&, absl::Time,
                                        UnaryDone<v1::PrepareStepResponse> done) {
  std::move(done)(NoRing(server));
}

void InProcessExpertClient::CommitStep(int server, const v1::CommitStepRequest&, absl::Time,
                                       UnaryDone<v1::CommitStepResponse> done) {
  std::move(done)(NoRing(server));
}

void InProcessExpertClient::AbortStep(int server, const v1::AbortStepRequest&, absl::Time,
                                      UnaryDone<v1::AbortStepResponse> done) {
  std::move(done)(NoRing(server));
}

void InProcessExpertClient::Info(int server, absl::Time, UnaryDone<v1::InfoResponse> done) {
  Server& s = *servers_.at(server);
  if (!s.alive) {
    std::move(done)(absl::UnavailableError(absl::StrCat("server-", server, " is down")));
    return;
  }
  v1::InfoResponse info;
  info.set_server_name(absl::StrCat("server-", server));
  for (int expert : s.store->HostedExperts()) {
    v1::ExpertDigest* entry = info.add_experts();
    entry->set_expert_id(expert);
    entry->set_weights_digest(*s.store->Digest(expert));
  }
  std::move(done)(std::move(info));
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
