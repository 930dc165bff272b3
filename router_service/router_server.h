// The router assembled: the gate (from a checkpoint or the deterministic
// init), the placement, gRPC streams to every expert server, the Router
// core and its service, health, reflection and /metrics. Thread-safe.
#ifndef MOE_ROUTER_SERVICE_ROUTER_SERVER_H_
#define MOE_ROUTER_SERVICE_ROUTER_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "common/deadline_timer.h"
#include "common/health_endpoint.h"
#include "common/metrics_exposer.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/stream_set.h"
#include "common/transport_credentials.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"
#include "router_service/auto_rebalancer.h"
#include "router_service/grpc_expert_client.h"
#include "router_service/load_stats.h"
#include "router_service/placement_coordinator.h"
#include "router_service/router.h"
#include "router_service/router_metrics.h"
#include "router_service/router_service.h"
#include "router_service/step_coordinator.h"

namespace moe::router {

class RouterServer {
 public:
  struct Options {
    ServingConfig config;
    // gRPC listening address; port 0 picks a free port (see port()).
    std::string listen_address = "0.0.0.0:50051";
    // Prometheus /metrics port on `metrics_host`; 0 picks one, -1 disables.
    int metrics_port = 9090;
    std::string metrics_host = "0.0.0.0";
    // Plaintext health for probes (health_endpoint.h) on `metrics_host`;
    // 0 picks a port, -1 (the default) serves health on the gRPC port only.
    int health_port = -1;
    // Checkpoint for the gate: a safetensors file or a sharded checkpoint
    // directory (its step is the gate's); empty: deterministic init.
    std::string checkpoint_path;
    // Where SaveCheckpoint writes (StepCoordinator::Options); empty: off.
    // At start, the latest complete checkpoint there is loaded instead of
    // checkpoint_path when it is of a later step.
    std::string checkpoint_dir;
    int checkpoint_every_steps = 0;
    // Threads gating and combining; 0: CpuBudget() (common/cpu_budget.h).
    int compute_threads = 2;
    size_t max_queued_requests = 4096;
    int max_message_bytes = 512 << 20;
    // Bounds of the ForwardStreams (stream_set.h), and the deadline of a
    // stream's request that sets no timeout_ms.
    StreamBounds streams;
    absl::Duration stream_request_timeout = absl::Seconds(30);
    // Hedging of inference forwards (Router::Options); a zero max disables.
    absl::Duration hedge_min_delay = absl::Milliseconds(10);
    absl::Duration hedge_max_delay = absl::Milliseconds(200);
    // Router::Options::micro_batch_bytes.
    int64_t micro_batch_bytes = 0;
    // Router::Options::inline_forward_multiply_adds.
    int64_t inline_forward_multiply_adds = int64_t{1} << 16;
    // GrpcExpertClient::Options::dispatch_streams.
    int dispatch_streams = 2;
    // Router::Options::round_tokens_for_bf16_servers.
    bool round_tokens_for_bf16_servers = true;
    // Forward state kept for Backward, at most (Router::Options).
    int64_t training_state_bytes = int64_t{1} << 30;
    // Of the router's port and of its channels to the expert servers.
    TransportCredentials credentials = TransportCredentials::Plaintext();
    absl::Duration drain_timeout = absl::Seconds(10);
    // Deadline of a Step whose client set none.
    absl::Duration step_timeout = absl::Seconds(60);
    // Placement changes (PlacementCoordinator::Options): the pace of each
    // server's weight pulls (0: unpaced), and how long calls planned with
    // the old placement may take to finish.
    int64_t migration_bytes_per_second = int64_t{256} << 20;
    absl::Duration rebalance_drain_timeout = absl::Seconds(10);
    // Automatic Rebalance (AutoRebalancer::Options), off by default.
    bool auto_rebalance = false;
    absl::Duration auto_rebalance_interval = absl::Seconds(10);
    absl::Duration auto_rebalance_window = absl::Seconds(60);
    double auto_rebalance_threshold = 1.25;
    double auto_rebalance_hysteresis = 0.1;
    absl::Duration auto_rebalance_cooldown = absl::Minutes(10);
  };

  static absl::StatusOr<std::unique_ptr<RouterServer>> Create(Options options);
  ~RouterServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  int health_port() const { return health_ != nullptr ? health_->port() : -1; }
  Router& router() { return *router_; }

  // Health NOT_SERVING, then gRPC shutdown with in-flight calls bounded by
  // drain_timeout. Idempotent.
  void Shutdown();

 private:
  explicit RouterServer(Options options) : options_(std::move(options)) {}
  absl::Status Start();

  const Options options_;
  std::unique_ptr<GrpcExpertClient> client_;
  std::unique_ptr<ComputePool> pool_;
  std::unique_ptr<LoadStats> load_stats_;
  RoutingSample routing_sample_;
  DeadlineTimer timer_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<StepCoordinator> steps_;
  std::unique_ptr<PlacementCoordinator> placements_;
  std::unique_ptr<AutoRebalancer> auto_rebalancer_;
  std::unique_ptr<ComputePool> step_pool_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<RouterMetrics> metrics_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::unique_ptr<HealthEndpoint> health_;
  std::unique_ptr<RouterServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  int metrics_port_ = -1;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROUTER_SERVER_H_
