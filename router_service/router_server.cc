#include "router_service/router_server.h"

#include <unistd.h>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/checkpoint.h"
#include "common/cpu_budget.h"
#include "common/deterministic_init.h"
#include "common/grpc_server.h"
#include "common/health_endpoint.h"
#include "common/log.h"
#include "common/metrics_exposer.h"
#include "common/status_macros.h"

namespace moe::router {
namespace {

// Every layer's W_g as the router starts: from the checkpoint, or the
// deterministic init.
absl::StatusOr<FloatTensor> StartingGate(const ModelConfig& model,
                                         const std::string& checkpoint_path) {
  if (checkpoint_path.empty()) return InitGates(model);
  return LoadGates(checkpoint_path, model);
}

// This machine's name (a pod's name on Kubernetes).
std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "router";
  return name;
}

// 128 random bits, hex: the id of a training run.
std::string NewLineage() {
  absl::BitGen bits;
  return absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(bits),
                         absl::Uniform<uint64_t>(bits));
}

}  // namespace

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Create(Options options) {
  if (options.compute_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--compute_threads must be >= 0, got ", options.compute_threads));
  }
  if (options.compute_threads == 0) options.compute_threads = CpuBudget();
  auto server = std::unique_ptr<RouterServer>(new RouterServer(std::move(options)));
  MOE_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status RouterServer::Start() {
  if (options_.health_port >= 0) {
    MOE_ASSIGN_OR_RETURN(health_, HealthEndpoint::Start(absl::StrCat(options_.metrics_host, ":",
                                                                     options_.health_port)));
  }
  const ServingConfig& config = options_.config;
  const ModelConfig& model = config.model;
  MOE_ASSIGN_OR_RETURN(Placement placement, ComputePlacement(model, config.cluster));
  // --checkpoint, or the latest under --checkpoint_dir when later (a
  // router restarted mid-training serves the last saved gate).
  MOE_ASSIGN_OR_RETURN(const StartingCheckpoint start,
                       ChooseStartingCheckpoint(options_.checkpoint_path, options_.checkpoint_dir));
  const CheckpointMetadata& loaded = start.metadata;
  MOE_ASSIGN_OR_RETURN(FloatTensor gate, StartingGate(model, start.path));
  // A run resumed from a checkpoint keeps its lineage; anything else is a
  // new run.
  const std::string lineage = loaded.lineage.empty() ? NewLineage() : loaded.lineage;
  MOE_LOG(INFO, "gate from ",
          start.path.empty() ? absl::StrCat("init seed ", model.seed) : start.path, " at step ",
          loaded.step, "; lineage ", lineage);
  GrpcExpertClient::Options client_options;
  client_options.servers = config.cluster.servers;
  client_options.credentials = options_.credentials;
  client_options.max_message_bytes = options_.max_message_bytes;
  client_options.dispatch_streams = options_.dispatch_streams;
  client_ = GrpcExpertClient::Create(std::move(client_options));
  pool_ = std::make_unique<ComputePool>(options_.compute_threads, options_.max_queued_requests);
  load_stats_ = std::make_unique<LoadStats>(model.total_experts(), placement.num_servers());
  registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = RouterMetrics::Create(*registry_, model);
  Router::Options router_options;
  router_options.model = model;
  router_options.cluster = config.cluster;
  router_options.gate = std::move(gate);
  router_options.gate_step = loaded.step;
  if (!start.path.empty()) {
    MOE_ASSIGN_OR_RETURN(std::optional<std::vector<FloatTensor>> states,
                         LoadGateOptimizerState(start.path, model));
    if (states) {
      router_options.gate_velocity = std::move((*states)[0]);
      if (states->size() > 1) router_options.gate_second_moment = std::move((*states)[1]);
    } else if (loaded.step > 0 && OptimizerStateTensors(model.optimizer.type) > 0) {
      MOE_LOG(WARNING, start.path, " holds no optimizer state; the gate's starts at zero at step ",
              loaded.step);
    }
  }
  // Random, so routers started alike still differ; never 0 (in-process
  // routers and tests use 0, and an id with tag 0 is simply unknown here).
  router_options.tag = absl::Uniform<uint32_t>(absl::BitGen(), 1, 1u << 24);
  router_options.name = HostName();
  router_options.training_max_bytes = options_.training_state_bytes;
  router_options.pool = pool_.get();
  router_options.load_stats = load_stats_.get();
  router_options.routing_sample = &routing_sample_;
  router_options.timer = &timer_;
  router_options.on_phases = [m = metrics_.get()](absl::Duration gate, absl::Duration fan_out,
                                                  absl::Duration combine) {
    m->gate_seconds->Observe(absl::ToDoubleSeconds(gate));
    m->fan_out_seconds->Observe(absl::ToDoubleSeconds(fan_out));
    m->combine_seconds->Observe(absl::ToDoubleSeconds(combine));
  };
  router_options.on_overlap = [m = metrics_.get()](const DispatchOverlap& overlap) {
    m->dispatch_wait_seconds->Increment(absl::ToDoubleSeconds(overlap.wait));
    m->dispatch_wait_hidden_seconds->Increment(absl::ToDoubleSeconds(overlap.hidden));
  };
  router_options.on_failover = [failovers = metrics_->failovers] { failovers->Increment(); };
  router_options.on_stale = [stale = metrics_->stale_answers] { stale->Increment(); };
  router_options.on_placement = [gauge = metrics_->placement_epoch](uint64_t epoch) {
    gauge->Set(static_cast<double>(epoch));
  };
  router_options.on_hedge = [hedges = metrics_->hedges] { hedges->Increment(); };
  router_options.on_eject = [ejections = metrics_->ejections] { ejections->Increment(); };
  router_options.hedge_min_delay = options_.hedge_min_delay;
  router_options.hedge_max_delay = options_.hedge_max_delay;
  router_options.micro_batch_bytes = options_.micro_batch_bytes;
  router_options.inline_forward_multiply_adds = options_.inline_forward_multiply_adds;
  router_options.round_tokens_for_bf16_servers = options_.round_tokens_for_bf16_servers;
  router_ = std::make_unique<Router>(std::move(router_options), std::move(placement), *client_);

  if (options_.metrics_port >= 0) {
    MOE_ASSIGN_OR_RETURN(metrics_endpoint_,
                         MetricsEndpoint::Start(options_.metrics_host, options_.metrics_port,
                                                registry_, options_.credentials));
    metrics_port_ = metrics_endpoint_->port();
  }
  StepCoordinator::Options step_options;
  step_options.default_learning_rate = model.optimizer.learning_rate;
  step_options.default_timeout = options_.step_timeout;
  step_options.checkpoint_dir = options_.checkpoint_dir;
  step_options.checkpoint_every_steps = options_.checkpoint_every_steps;
  step_options.lineage = lineage;
  step_options.on_saved = [m = metrics_.get()](uint64_t step) {
    m->last_checkpoint_timestamp->Set(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()));
    m->last_checkpoint_step->Set(static_cast<double>(step));
  };
  steps_ = std::make_unique<StepCoordinator>(step_options, *router_, *client_);
  placements_ = std::make_unique<PlacementCoordinator>(
      PlacementCoordinator::Options{config.cluster, options_.migration_bytes_per_second,
                                    options_.rebalance_drain_timeout},
      *router_, *client_, *steps_);
  // The servers are the source of truth: a router that starts after a
  // placement change serves the servers' placement, not the config's.
  if (absl::Status adopted = placements_->AdoptServersPlacement(absl::Now() + absl::Seconds(2));
      !adopted.ok()) {
    MOE_LOG(WARNING, "router: the servers' placement: ", adopted.message());
  }
  // Likewise the gate: the servers hold the one of the last committed step.
  if (absl::Status adopted = router_->AdoptServersGate(absl::Now() + absl::Seconds(2));
      !adopted.ok()) {
    MOE_LOG(WARNING, "router: the servers' gate: ", adopted.message());
  }
  metrics_->placement_epoch->Set(static_cast<double>(router_->placement()->version));
  step_pool_ = std::make_unique<ComputePool>(1, 16);
  service_ = std::make_unique<RouterServiceImpl>(
      *router_, *pool_, *metrics_,
      RouterServiceImpl::ClusterView{&options_.config, client_.get(), load_stats_.get(),
                                     &routing_sample_,
                                     [client = client_.get()] { return client->reconnects(); }},
      *steps_, *placements_, *step_pool_, options_.streams, options_.stream_request_timeout);

  // Calls the authorization policy refuses are counted here.
  const TransportCredentials port_credentials = options_.credentials.WithDeniedCallback(
      [metrics = metrics_.get()](absl::string_view method) { metrics->CountDenied(method); });
  MOE_ASSIGN_OR_RETURN(server_,
                       StartGrpcServer(options_.listen_address, port_credentials,
                                       options_.max_message_bytes, {service_.get()}, &port_));
  MOE_LOG(INFO, "router: ", model.num_layers, " layer(s) of ", model.num_experts, " experts",
          model.has_shared_expert()
              ? absl::StrCat(" and a shared expert in ", model.shared_slices, " slices")
              : std::string(),
          ", top_k ", model.top_k, ", ", PlacementStrategyName(config.cluster.strategy), " over ",
          config.cluster.servers.size(), " expert servers; gate from ",
          options_.checkpoint_path.empty() ? absl::StrCat("init seed ", model.seed)
                                           : options_.checkpoint_path,
          "; ", options_.compute_threads, " compute thread(s)");
  if (options_.auto_rebalance) {
    if (options_.auto_rebalance_interval <= absl::ZeroDuration() ||
        options_.auto_rebalance_window <= absl::ZeroDuration() ||
        !(options_.auto_rebalance_threshold >= 1) || !(options_.auto_rebalance_hysteresis >= 0)) {
      return absl::InvalidArgumentError(
          "--auto_rebalance_interval and _window must be positive, _threshold >= 1 and "
          "_hysteresis >= 0");
    }
    AutoRebalancer::Options automatic;
    automatic.model = model;
    automatic.cluster = config.cluster;
    automatic.interval = options_.auto_rebalance_interval;
    automatic.window = options_.auto_rebalance_window;
    automatic.threshold = options_.auto_rebalance_threshold;
    automatic.hysteresis = options_.auto_rebalance_hysteresis;
    automatic.cooldown = options_.auto_rebalance_cooldown;
    automatic.holder = router_->identity();
    automatic.on_change =
        [m = metrics_.get()](const absl::StatusOr<PlacementCoordinator::Result>& changed) {
          m->CountRebalance(changed.status(), changed.ok() ? changed->bytes : 0,
                            changed.ok() ? absl::ToDoubleSeconds(changed->time) : 0);
        };
    auto_rebalancer_ = std::make_unique<AutoRebalancer>(std::move(automatic), *router_, *client_,
                                                        *placements_, &routing_sample_);
    auto_rebalancer_->Start();
    metrics_->auto_rebalance_enabled->Set(1);
  }
  SetReadiness(*server_, health_.get(), true);
  MOE_LOG(INFO, "router serving gRPC on port ", port_, " (", options_.credentials.name(), ", ",
          router_->identity(), ")",
          metrics_port_ >= 0 ? absl::StrCat(", /metrics on port ", metrics_port_)
                             : std::string(", no metrics endpoint"),
          health_ != nullptr ? absl::StrCat(", plaintext health on port ", health_->port())
                             : std::string());
  return absl::OkStatus();
}

void RouterServer::Shutdown() {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  MOE_LOG(INFO, "router: draining, up to ", absl::FormatDuration(options_.drain_timeout));
  server_->GetHealthCheckService()->SetServingStatus(false);
  SetReadiness(*server_, health_.get(), false);
  service_->BeginDrain();
  server_->Shutdown(absl::ToChronoTime(absl::Now() + options_.drain_timeout));
  MOE_LOG(INFO, "router: stopped");
}

RouterServer::~RouterServer() {
  Shutdown();
  // Its looks call the servers and may change the placement.
  auto_rebalancer_.reset();
  step_pool_.reset();
  // Hedges and restarts use the client, the pool and the router; calls
  // still in flight end when the client closes its streams.
  timer_.Stop();
  // The client first: closing its streams fails what they still hold, and
  // those callbacks run into the router and its pool, both still here.
  client_.reset();
  pool_.reset();
  router_.reset();
}

}  // namespace moe::router
