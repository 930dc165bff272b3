// The expert server assembled: loads this server's experts (from a
// checkpoint or the deterministic init), builds the oneDNN runtime, the
// store, the compute pool and the service, and serves them over gRPC with
// the health service, reflection and a Prometheus /metrics endpoint.
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_EXPERT_SERVER_H_
#define MOE_EXPERT_SERVICE_EXPERT_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "common/expert_key.h"
#include "common/health_endpoint.h"
#include "common/metrics_exposer.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "common/stream_set.h"
#include "common/transport_credentials.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/collective_service.h"
#include "expert_service/allreduce/grpc_ring_link.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_service.h"
#include "expert_service/expert_store.h"
#include "expert_service/grpc_sync_peers.h"
#include "expert_service/micro_batcher.h"
#include "expert_service/onednn_runtime.h"
#include "expert_service/placement_keeper.h"
#include "expert_service/step_executor.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

namespace moe::expert {

class ExpertServer {
 public:
  struct Options {
    ServingConfig config;
    // This server's name in config.cluster.servers; it hosts the experts the
    // placement gives that name.
    std::string name;
    // gRPC listening address; port 0 picks a free port (see port()).
    std::string listen_address = "0.0.0.0:50061";
    // Prometheus /metrics on this port of `metrics_host`; 0 picks a free
    // port, -1 disables.
    int metrics_port = 9091;
    std::string metrics_host = "0.0.0.0";
    // Plaintext health for probes (health_endpoint.h) on `metrics_host`,
    // live from the start, ready once loaded, synced and listening; 0 picks
    // a port, -1 (the default) serves health on the gRPC port only.
    int health_port = -1;
    // Checkpoint to load: a safetensors file, or a sharded checkpoint
    // directory (whose step the experts start at); empty: deterministic
    // init from the seed.
    std::string checkpoint_path;
    // Where SaveExperts writes checkpoint shards; empty: saving refused.
    // At start, the latest complete checkpoint there is loaded instead of
    // checkpoint_path when it is of a later step.
    std::string checkpoint_dir;
    DType compute_dtype = DType::kFloat32;
    // oneDNN (OpenMP) threads per compute thread; 0: the cores allowed.
    int onednn_threads = 0;
    // Threads running expert kernels.
    int compute_threads = 1;
    // Requests queued for compute beyond which new ones are refused.
    size_t max_queued_requests = 4096;
    // Bounds of the Dispatch and BackwardDispatch streams (stream_set.h).
    StreamBounds streams;
    TrainingStateStore::Options training;
    // Micro-batching of inference requests for the same expert
    // (micro_batcher.h): on, merging what queues up without waiting (the
    // default), or also waiting up to batch_window for company; the largest
    // merged batch.
    bool merge_requests = true;
    // ExpertDispatcher::Options::inline_call_multiply_adds.
    int64_t inline_call_multiply_adds = int64_t{1} << 17;
    absl::Duration batch_window = absl::ZeroDuration();
    int64_t max_batch_rows = 4096;
    // How long SIGTERM waits for open streams to answer what they accepted.
    absl::Duration drain_timeout = absl::Seconds(10);
    // The gradient all-reduce's pipeline segment and window.
    allreduce::RingOptions ring;
    // A prepared step with no commit or abort within this after its
    // deadline asks the peers what became of it (StepExecutor).
    absl::Duration step_prepared_timeout = absl::Seconds(60);
    // Largest gRPC message either way.
    int max_message_bytes = 512 << 20;
    // Of the server's port and of its ring links to its peers.
    TransportCredentials credentials = TransportCredentials::Plaintext();
    // Rejoin by sync (weight_sync.h): before listening, ask the peers'
    // committed step (each within sync_info_timeout) and pull the hosted
    // experts that are behind it (all within sync_timeout).
    bool sync_on_start = true;
    absl::Duration sync_info_timeout = absl::Seconds(3);
    absl::Duration sync_timeout = absl::Minutes(10);
    // Makes each expert's kernel; empty: OnednnExpertKernel in compute_dtype.
    // Tests substitute kernels here.
    KernelFactory kernel_factory;
    // Clock for deadlines and training-state expiry (tests inject one).
    std::function<absl::Time()> clock = [] { return absl::Now(); };
  };

  static absl::StatusOr<std::unique_ptr<ExpertServer>> Create(Options options);
  ~ExpertServer();

  // The bound gRPC and metrics ports.
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  int health_port() const { return health_ != nullptr ? health_->port() : -1; }
  std::shared_ptr<grpc::Channel> InProcessChannel();
  ExpertStore& store() { return *store_; }
  ExpertServiceImpl& service() { return *service_; }
  const ExpertMetrics& metrics() const { return *metrics_; }
  const OnednnRuntime& runtime() const { return *runtime_; }

  // Graceful stop: health NOT_SERVING, no new streams, open streams answer
  // what they accepted (up to drain_timeout), then the server stops.
  // Idempotent.
  void Shutdown();
  // Blocks until Shutdown() has completed.
  void Wait();

 private:
  explicit ExpertServer(Options options) : options_(std::move(options)) {}
  absl::Status Start();
  // Rejoin by sync (Options::sync_on_start), before the server listens.
  absl::Status SyncFromPeersOnStart();
  // Pulls the hosted experts that are behind the peers' committed step and
  // adopts that step (both metrics set): the start's sync and the roll
  // forward's.
  absl::StatusOr<SyncResult> SyncToCluster();
  // Catching up with the cluster, on roll_forward_ (one at a time; told of
  // a later step meanwhile, it goes again). `weights_step` (0: none): the
  // cluster committed that step and this server did not; it rolls forward
  // by sync (RollForward), and steps wait for it. `gate_step` (0: none):
  // this server committed that step without its CommitStep; it takes the
  // step's gate from a peer (AdoptPeersGate).
  void StartCatchUp(uint64_t weights_step, uint64_t gate_step)
      ABSL_LOCKS_EXCLUDED(roll_forward_mu_);
  absl::Status RollForward(uint64_t committed);
  // The peers' answers on their steps (StepExecutor::Options::ask_peers).
  std::vector<PeerAnswer> AskPeersSteps();
  // The gate of committed step `step` from the first peer that keeps it
  // (this server committed the step without its CommitStep, or synced to
  // it), so that routers learn it here too.
  void AdoptPeersGate(uint64_t step);
  // The highest placement epoch the peers report (with its placement),
  // when above `epoch`.
  absl::Status AdoptPeersPlacement(Placement& placement, uint64_t& epoch);
  // The weights of `experts` from the checkpoint (of `checkpoint_step`) or
  // the seed's init, with the optimizer's state when the checkpoint has it.
  absl::StatusOr<std::map<ExpertKey, ExpertSnapshot>> LoadHosted(
      absl::Span<const ExpertKey> experts, const std::string& checkpoint_path,
      uint64_t checkpoint_step) const;
  // This server's rings, from the placement's replica groups (their groups
  // registered, those of the rings before dropped).
  std::vector<StepRing> BuildRings(const Placement& placement, int index);

  const Options options_;
  std::unique_ptr<OnednnRuntime> runtime_;
  std::unique_ptr<ExpertStore> store_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<ExpertMetrics> metrics_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::unique_ptr<HealthEndpoint> health_;
  std::unique_ptr<ComputePool> pool_;
  std::unique_ptr<MicroBatcher> batcher_;
  // The other servers (rejoin by sync, placement changes, what became of a
  // step): before the executor, which asks them until it is destroyed.
  std::unique_ptr<GrpcSyncPeers> peers_;
  // The training step: ring links to this server's successors (by server
  // index; null where none), the registry of collectives, the executor and
  // its thread.
  std::unique_ptr<allreduce::CollectiveRegistry> collectives_;
  std::vector<std::unique_ptr<allreduce::GrpcRingLink>> ring_links_;
  std::unique_ptr<StepExecutor> steps_;
  // The registry groups of the rings in force.
  std::vector<uint64_t> ring_groups_;
  std::unique_ptr<ComputePool> step_pool_;
  // This server's placement.
  std::unique_ptr<PlacementKeeper> placement_;
  LeaseTable leases_;
  std::unique_ptr<allreduce::CollectiveService> collective_service_;
  std::unique_ptr<ExpertDispatcher> dispatcher_;
  std::unique_ptr<ExpertServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  int metrics_port_ = -1;
  absl::Mutex roll_forward_mu_;
  bool rolling_forward_ ABSL_GUARDED_BY(roll_forward_mu_) = false;
  // The highest committed step this server was told it is behind, and the
  // steps whose gate it is to take (and has taken) from a peer.
  uint64_t roll_target_ ABSL_GUARDED_BY(roll_forward_mu_) = 0;
  uint64_t gate_target_ ABSL_GUARDED_BY(roll_forward_mu_) = 0;
  uint64_t gate_done_ ABSL_GUARDED_BY(roll_forward_mu_) = 0;
  std::thread roll_forward_ ABSL_GUARDED_BY(roll_forward_mu_);
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_EXPERT_SERVER_H_
