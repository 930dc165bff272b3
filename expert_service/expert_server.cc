#include "expert_service/expert_server.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/grpc_server.h"
#include "common/health_endpoint.h"
#include "common/log.h"
#include "common/metrics_exposer.h"
#include "common/optimizer.h"
#include "common/placement.h"
#include "common/placement_proto.h"
#include "common/status_macros.h"
#include "expert_service/grpc_sync_peers.h"
#include "expert_service/onednn_expert_kernel.h"
#include "expert_service/weight_sync.h"

namespace moe::expert {
namespace {

constexpr absl::Duration kUnaryGrace = absl::Milliseconds(500);

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Create(Options options) {
  if (options.batch_window < absl::ZeroDuration() || options.max_batch_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--batch_window must be >= 0 and --max_batch_rows >= 1, got ",
        absl::FormatDuration(options.batch_window), " and ", options.max_batch_rows));
  }
  if (options.compute_threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--compute_threads must be >= 1, got ", options.compute_threads));
  }
  if (options.config.cluster.FindServer(options.name) < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--name=", options.name, " is not a server of the config (--config)"));
  }
  if (options.compute_dtype == DType::kBFloat16 && !OnednnRuntime::HasNativeBf16()) {
    MOE_LOG(WARNING, "this CPU has no native bf16; oneDNN will emulate it slowly");
  }
  auto server = std::unique_ptr<ExpertServer>(new ExpertServer(std::move(options)));
  MOE_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::StatusOr<std::map<ExpertKey, ExpertSnapshot>> ExpertServer::LoadHosted(
    absl::Span<const ExpertKey> experts, const std::string& checkpoint_path,
    uint64_t checkpoint_step) const {
  const ModelConfig& model = options_.config.model;
  // Per layer, the experts hosted: one load reads one layer.
  std::map<int, std::vector<int>> by_layer;
  for (ExpertKey expert : experts) {
    MOE_RETURN_IF_ERROR(CheckExpertKey(model, expert));
    by_layer[expert.layer].push_back(expert.expert);
  }
  std::map<ExpertKey, ExpertSnapshot> hosted;
  bool warned = false;
  for (const auto& [layer, indices] : by_layer) {
    MoeWeights weights;
    std::optional<std::vector<MoeWeights>> states;
    if (checkpoint_path.empty()) {
      weights = InitWeights(model, indices, /*with_gate=*/false, layer);
    } else {
      const CheckpointSelection selection{/*gate=*/false, indices, layer};
      MOE_ASSIGN_OR_RETURN(weights, LoadCheckpoint(checkpoint_path, model, selection));
      MOE_ASSIGN_OR_RETURN(states, LoadOptimizerState(checkpoint_path, model, selection));
    }
    if (!states && !warned && checkpoint_step > 0 &&
        OptimizerStateTensors(model.optimizer.type) > 0) {
      // Said, not silent: the run goes on differently from an
      // uninterrupted one.
      MOE_LOG(WARNING, "server ", options_.name, ": ", checkpoint_path,
              " holds no optimizer state; it starts at zero at step ", checkpoint_step);
      warned = true;
    }
    for (auto& [index, tensors] : weights.experts) {
      ExpertSnapshot& snapshot = hosted[ExpertKey(layer, index)];
      snapshot.weights = std::move(tensors);
      if (states) {
        snapshot.velocity = std::move((*states)[0].experts.at(index));
        if (states->size() > 1) snapshot.second_moment = std::move((*states)[1].experts.at(index));
      }
    }
  }
  return hosted;
}

absl::Status ExpertServer::Start() {
  // Live (not ready) while it loads and syncs, which may take minutes.
  if (options_.health_port >= 0) {
    MOE_ASSIGN_OR_RETURN(health_, HealthEndpoint::Start(absl::StrCat(options_.metrics_host, ":",
                                                                     options_.health_port)));
  }
  const ServingConfig& config = options_.config;
  const ModelConfig& model = config.model;
  MOE_ASSIGN_OR_RETURN(Placement placement, ComputePlacement(model, config.cluster));
  uint64_t placement_epoch = 1;
  peers_ = std::make_unique<GrpcSyncPeers>(config.cluster, options_.name, options_.credentials,
                                           options_.max_message_bytes);
  // The servers are the source of truth: after a placement change the
  // config's placement is only the first one.
  if (options_.sync_on_start) {
    MOE_RETURN_IF_ERROR(AdoptPeersPlacement(placement, placement_epoch));
  }
  const int index = config.cluster.FindServer(options_.name);
  const absl::Span<const ExpertKey> experts = placement.ExpertsOn(index);
  // --checkpoint, or the latest under --checkpoint_dir when later; a
  // sharded checkpoint says which committed step its weights are of.
  MOE_ASSIGN_OR_RETURN(const StartingCheckpoint start,
                       ChooseStartingCheckpoint(options_.checkpoint_path, options_.checkpoint_dir));
  const CheckpointMetadata& loaded = start.metadata;
  MOE_ASSIGN_OR_RETURN(auto hosted, LoadHosted(experts, start.path, loaded.step));
  MOE_LOG(INFO, "server ", options_.name, ": ", PlacementStrategyName(config.cluster.strategy),
          " placement gives experts [", JoinExpertKeys(experts), "] (",
          start.path.empty() ? absl::StrCat("init seed ", model.seed)
                             : absl::StrCat(start.path, ", step ", loaded.step),
          ")");

  MOE_ASSIGN_OR_RETURN(runtime_, OnednnRuntime::Create(options_.onednn_threads));
  MOE_LOG(INFO, runtime_->Description(), "; ", options_.compute_threads,
          " compute thread(s), ", DTypeName(options_.compute_dtype), " kernels");
  KernelFactory kernel_factory = options_.kernel_factory;
  if (!kernel_factory) {
    kernel_factory = [&runtime = *runtime_, dtype = options_.compute_dtype](
                         const ExpertWeights& master)
        -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
      MOE_ASSIGN_OR_RETURN(auto kernel, OnednnExpertKernel::Create(master, dtype, runtime));
      return std::unique_ptr<ExpertKernel>(std::move(kernel));
    };
  }
  MOE_ASSIGN_OR_RETURN(store_,
                       ExpertStore::Create({model, options_.name, options_.training, loaded.step},
                                           std::move(hosted), std::move(kernel_factory)));

  registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = ExpertMetrics::Create(*registry_, model);
  if (options_.metrics_port >= 0) {
    MOE_ASSIGN_OR_RETURN(metrics_endpoint_,
                         MetricsEndpoint::Start(options_.metrics_host, options_.metrics_port,
                                                registry_, options_.credentials));
    metrics_port_ = metrics_endpoint_->port();
  }

  const int onednn_threads = runtime_->num_threads();
  pool_ = std::make_unique<ComputePool>(
      options_.compute_threads, options_.max_queued_requests,
      [onednn_threads] { OnednnRuntime::ConfigureCallingThread(onednn_threads); });
  if (options_.merge_requests) {
    batcher_ = std::make_unique<MicroBatcher>(
        MicroBatcher::Options{std::max(options_.batch_window, absl::ZeroDuration()),
                              options_.max_batch_rows},
        *store_, *pool_, options_.clock);
    MOE_LOG(INFO, "micro-batching: requests for one expert that queue up are merged",
            options_.batch_window > absl::ZeroDuration()
                ? absl::StrCat(", each waiting up to ", absl::FormatDuration(options_.batch_window))
                : std::string(),
            ", up to ", options_.max_batch_rows, " rows per kernel call");
  }
  collectives_ = std::make_unique<allreduce::CollectiveRegistry>();
  std::vector<StepRing> rings = BuildRings(placement, index);
  StepExecutor::Options step_options{model.optimizer, options_.name, std::move(rings),
                                     options_.ring, options_.step_prepared_timeout};
  if (peers_->num_peers() > 0) step_options.ask_peers = [this] { return AskPeersSteps(); };
  step_options.on_behind = [this](uint64_t committed) { StartCatchUp(committed, 0); };
  step_options.on_resolved = [this](uint64_t step, bool committed) {
    if (committed) {
      metrics_->steps_committed->Increment();
      metrics_->committed_step->Set(static_cast<double>(step));
      StartCatchUp(0, step);  // its gate, off the step's thread
    } else {
      metrics_->steps_aborted->Increment();
    }
  };
  steps_ = std::make_unique<StepExecutor>(std::move(step_options), *store_, *collectives_);
  MOE_RETURN_IF_ERROR(steps_->AdoptCommitted(loaded.step));
  if (options_.sync_on_start) MOE_RETURN_IF_ERROR(SyncFromPeersOnStart());
  metrics_->committed_step->Set(static_cast<double>(steps_->last_committed()));
  step_pool_ = std::make_unique<ComputePool>(1, 64);
  collective_service_ = std::make_unique<allreduce::CollectiveService>(collectives_.get());
  dispatcher_ = std::make_unique<ExpertDispatcher>(
      ExpertDispatcher::Options{options_.name, options_.clock, options_.checkpoint_dir,
                                options_.inline_call_multiply_adds},
      *store_, *metrics_, batcher_.get(), steps_.get());
  // Synced to a step above: its gate from a peer that committed it.
  if (steps_->last_committed() > loaded.step) AdoptPeersGate(steps_->last_committed());
  PlacementKeeper::Options keeper;
  keeper.model = model;
  keeper.cluster = config.cluster;
  keeper.server = index;
  // GrpcSyncPeers numbers every server but this one, in order.
  keeper.peer_of = [index](int server) { return server < index ? server : server - 1; };
  keeper.set_rings = [this, index](const Placement& next) {
    return steps_->SetRings(BuildRings(next, index));
  };
  placement_ = std::make_unique<PlacementKeeper>(std::move(keeper), placement, placement_epoch,
                                                 *store_, *dispatcher_, *steps_, *peers_);
  // A call small enough to run on a gRPC thread needs one oneDNN thread.
  service_ = std::make_unique<ExpertServiceImpl>(*dispatcher_, *pool_, step_pool_.get(),
                                                 options_.streams, placement_.get(), &leases_,
                                                 [] { OnednnRuntime::ConfigureCallingThread(1); });

  const std::initializer_list<grpc::Service*> services = {service_.get(),
                                                           collective_service_.get()};
  // Calls the authorization policy refuses are counted here.
  const TransportCredentials port_credentials = options_.credentials.WithDeniedCallback(
      [metrics = metrics_.get()](absl::string_view method) { metrics->CountDenied(method); });
  MOE_ASSIGN_OR_RETURN(server_, StartGrpcServer(options_.listen_address, port_credentials,
                                                options_.max_message_bytes, services, &port_));
  SetReadiness(*server_, health_.get(), true);
  MOE_LOG(INFO, "server ", options_.name, " serving gRPC on port ", port_, " (",
          options_.credentials.name(), ")",
          metrics_port_ >= 0 ? absl::StrCat(", /metrics on port ", metrics_port_)
                             : std::string(", no metrics endpoint"),
          health_ != nullptr ? absl::StrCat(", plaintext health on port ", health_->port())
                             : std::string());
  return absl::OkStatus();
}

absl::Status ExpertServer::AdoptPeersPlacement(Placement& placement, uint64_t& epoch) {
  const std::vector<absl::StatusOr<v1::InfoResponse>> infos =
      AskEveryPeer(*peers_, absl::Now() + options_.sync_info_timeout);
  const v1::InfoResponse* newest = nullptr;
  for (const auto& info : infos) {
    if (info.ok() && info->placement_epoch() > epoch &&
        (newest == nullptr || info->placement_epoch() > newest->placement_epoch())) {
      newest = &*info;
    }
  }
  if (newest == nullptr) return absl::OkStatus();
  absl::StatusOr<Placement> adopted = PlacementFromProto(newest->placement(), options_.config.model,
                                                         options_.config.cluster, "placement");
  if (!adopted.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server ", newest->server_name(), " reports placement epoch ", newest->placement_epoch(),
        " that does not fit this server's config: ", adopted.status().message()));
  }
  placement = *std::move(adopted);
  epoch = newest->placement_epoch();
  MOE_LOG(INFO, "server ", options_.name, ": adopting placement epoch ", epoch, " from server ",
          newest->server_name(), " (not the config's)");
  return absl::OkStatus();
}

absl::StatusOr<SyncResult> ExpertServer::SyncToCluster() {
  const absl::Time now = absl::Now();
  MOE_ASSIGN_OR_RETURN(SyncResult sync,
                       SyncFromPeers(*store_, *peers_, now + options_.sync_info_timeout,
                                     now + options_.sync_timeout));
  // Peers behind this server (it loaded a later checkpoint) change nothing.
  if (sync.cluster_step > steps_->last_committed()) {
    MOE_RETURN_IF_ERROR(steps_->AdoptCommitted(sync.cluster_step));
    AdoptPeersGate(sync.cluster_step);
  }
  metrics_->committed_step->Set(static_cast<double>(steps_->last_committed()));
  metrics_->behind_experts->Set(static_cast<double>(sync.behind.size()));
  return sync;
}

namespace {

// What a sync did, for the log.
std::string SyncedSummary(const SyncResult& sync) {
  return absl::StrCat("synced ", sync.synced.size(), " expert(s) [", JoinExpertKeys(sync.synced),
                      "], ", sync.bytes >> 20, " MiB in ", absl::FormatDuration(sync.elapsed),
                      sync.behind.empty()
                          ? std::string()
                          : absl::StrCat("; behind: [", JoinExpertKeys(sync.behind), "]"));
}

}  // namespace

absl::Status ExpertServer::SyncFromPeersOnStart() {
  if (peers_->num_peers() == 0) return absl::OkStatus();
  MOE_ASSIGN_OR_RETURN(const SyncResult sync, SyncToCluster());
  MOE_LOG(INFO, "server ", options_.name, ": ", sync.peers_answered, " of ", peers_->num_peers(),
          " peer(s) answered; cluster at step ", sync.cluster_step, "; ", SyncedSummary(sync));
  return absl::OkStatus();
}

void ExpertServer::AdoptPeersGate(uint64_t step) {
  if (dispatcher_ == nullptr) return;  // at the start: after the dispatcher is made
  std::vector<std::string> errors;
  for (int p = 0; p < peers_->num_peers(); ++p) {
    absl::StatusOr<v1::GetGateResponse> gate =
        peers_->Gate(p, absl::Now() + options_.sync_info_timeout);
    absl::Status adopted = gate.ok() ? dispatcher_->AdoptGate(*gate) : gate.status();
    if (adopted.ok()) {
      MOE_LOG(INFO, "server ", options_.name, ": the gate of step ", step, " from server ",
              peers_->name(p));
      return;
    }
    errors.push_back(absl::StrCat(peers_->name(p), ": ", adopted.message()));
  }
  // Routers learn the gate from another server; the next commit brings one.
  MOE_LOG(WARNING, "server ", options_.name, ": no peer had the gate of step ", step, " (",
          absl::StrJoin(errors, "; "), ")");
}

std::vector<PeerAnswer> ExpertServer::AskPeersSteps() {
  const std::vector<absl::StatusOr<v1::InfoResponse>> infos =
      AskEveryPeer(*peers_, absl::Now() + options_.sync_info_timeout);
  std::vector<PeerAnswer> answers;
  for (size_t p = 0; p < infos.size(); ++p) {
    PeerAnswer& answer = answers.emplace_back();
    answer.name = absl::StrCat("server ", peers_->name(static_cast<int>(p)));
    if (infos[p].ok()) {
      answer.steps =
          PeerSteps{infos[p]->step(), infos[p]->prepared_step(), infos[p]->aborted_step()};
    } else {
      answer.steps = infos[p].status();
    }
  }
  return answers;
}

void ExpertServer::StartCatchUp(uint64_t weights_step, uint64_t gate_step) {
  absl::MutexLock lock(&roll_forward_mu_);
  roll_target_ = std::max(roll_target_, weights_step);
  gate_target_ = std::max(gate_target_, gate_step);
  if (rolling_forward_) return;
  rolling_forward_ = true;
  if (roll_forward_.joinable()) roll_forward_.join();  // the last one, done
  roll_forward_ = std::thread([this] {
    // Steps go on without this server while it syncs (it is left out of
    // them): a sync can end behind the cluster again, and goes again.
    constexpr int kAttempts = 3;
    int attempts = 0;
    while (true) {
      const uint64_t at = steps_->last_committed();  // not under roll_forward_mu_
      uint64_t weights, gate;
      {
        absl::MutexLock lock(&roll_forward_mu_);
        weights = at < roll_target_ && attempts < kAttempts ? roll_target_ : 0;
        gate = gate_target_ > gate_done_ ? gate_target_ : 0;
        if (weights == 0 && gate == 0) {
          rolling_forward_ = false;
          return;
        }
      }
      if (weights != 0) {
        ++attempts;
        const absl::Status status = RollForward(weights);
        if (!status.ok()) {
          MOE_LOG(ERROR, "server ", options_.name, ": roll forward to step ", weights,
                  " failed (the next step tries again): ", status.message());
        }
        continue;
      }
      AdoptPeersGate(gate);
      absl::MutexLock lock(&roll_forward_mu_);
      gate_done_ = std::max(gate_done_, gate);
    }
  });
}

absl::Status ExpertServer::RollForward(uint64_t committed) {
  MOE_RETURN_IF_ERROR(steps_->Hold(absl::StrCat("a sync to committed step ", committed)));
  MOE_LOG(WARNING, "server ", options_.name, ": the cluster has committed step ", committed,
          " and this server step ", steps_->last_committed(), "; syncing from its peers");
  // What accumulated here (the gate's too) is of weights the cluster has
  // moved past, and may hold this server's share of the missed step, which
  // its replicas applied: dropped, never summed into a later step.
  const std::vector<ExpertKey> dropped = steps_->DropGradients();
  if (!dropped.empty()) {
    MOE_LOG(WARNING, "server ", options_.name, ": gradients of experts [", JoinExpertKeys(dropped),
            "] accumulated against older weights are dropped");
  }
  absl::StatusOr<SyncResult> sync = SyncToCluster();
  steps_->Unhold();
  MOE_RETURN_IF_ERROR(sync.status());
  MOE_LOG(INFO, "server ", options_.name, ": rolled forward to step ", sync->cluster_step, "; ",
          SyncedSummary(*sync));
  return absl::OkStatus();
}

std::vector<StepRing> ExpertServer::BuildRings(const Placement& placement, int index) {
  const ClusterConfig& cluster = options_.config.cluster;
  auto label = [&](int server) {
    return absl::StrCat("server ", cluster.servers[server].name, " (",
                        cluster.servers[server].address, ")");
  };
  ring_links_.resize(cluster.servers.size());
  std::vector<StepRing> rings =
      StepRingsOf(
          placement, index, [&](int server) { return cluster.servers[server].name; }, label,
          [&](int to) -> allreduce::RingLink* {
            // Opens its stream at the first send: a link to a server this
            // one never sends to costs nothing.
            if (ring_links_[to] == nullptr) {
              ring_links_[to] = std::make_unique<allreduce::GrpcRingLink>(
                  label(to), cluster.servers[to].address, options_.credentials,
                  options_.max_message_bytes);
            }
            return ring_links_[to].get();
          });
  for (uint64_t group : ring_groups_) collectives_->RemoveGroup(group);
  ring_groups_.clear();
  for (const StepRing& ring : rings) {
    collectives_->AddGroup(ring.group_id);
    ring_groups_.push_back(ring.group_id);
    MOE_LOG(INFO, "server ", options_.name, ": rank ", ring.rank, " of ", ring.size,
            " in the ring of experts [", JoinExpertKeys(ring.experts), "] (group ",
            absl::Hex(ring.group_id), "), sending to ", ring.successor);
  }
  return rings;
}

std::shared_ptr<grpc::Channel> ExpertServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options_.max_message_bytes);
  args.SetMaxSendMessageSize(options_.max_message_bytes);
  return server_->InProcessChannel(args);
}

void ExpertServer::Shutdown() {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  MOE_LOG(INFO, "server ", options_.name, ": draining ", service_->open_streams(),
          " stream(s), up to ", absl::FormatDuration(options_.drain_timeout));
  server_->GetHealthCheckService()->SetServingStatus(false);
  SetReadiness(*server_, health_.get(), false);
  service_->BeginDrain();
  const absl::Time deadline = absl::Now() + options_.drain_timeout;
  if (!service_->WaitForStreams(deadline)) {
    MOE_LOG(WARNING, "server ", options_.name, ": ", service_->open_streams(),
            " stream(s) still open at the drain deadline; cancelling them");
  }
  // A parked ring segment holds its stream open: refuse them, and end the
  // collectives that run.
  collectives_->Shutdown();
  // The streams are done; what remains is unary calls (milliseconds). A
  // client that keeps an idle connection open would otherwise hold
  // Shutdown() for seconds, so give them a short grace, within the deadline.
  server_->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + kUnaryGrace)));
  MOE_LOG(INFO, "server ", options_.name, ": stopped");
}

void ExpertServer::Wait() { server_->Wait(); }

ExpertServer::~ExpertServer() {
  Shutdown();
  std::thread roll_forward;
  {
    absl::MutexLock lock(&roll_forward_mu_);
    roll_forward.swap(roll_forward_);
  }
  if (roll_forward.joinable()) roll_forward.join();
  // Step and placement work still queued (its calls were cancelled) runs
  // while what it uses is here.
  step_pool_.reset();
  // Open batches go to the pool, and the pool finishes queued work, before
  // the service and store go away.
  batcher_.reset();
  pool_.reset();
}

}  // namespace moe::expert
