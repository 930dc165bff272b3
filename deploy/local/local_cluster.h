// A moe-serve cluster on this machine: N expert_server processes and a
// router process on free loopback ports, from one serving config. Starts
// them, waits until they serve, and stops them (SIGTERM, then their exit
// codes). Thread-compatible.
#ifndef MOE_DEPLOY_LOCAL_LOCAL_CLUSTER_H_
#define MOE_DEPLOY_LOCAL_LOCAL_CLUSTER_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/transport_credentials.h"
#include "deploy/local/child_process.h"
#include "deploy/local/cpu_pinning.h"

namespace moe::local {

struct LocalClusterOptions {
  // Its server addresses are replaced by free loopback ports.
  ServingConfig config;
  std::string checkpoint_path;
  // Expert kernel dtype: "fp32" or "bf16".
  std::string dtype = "fp32";
  // oneDNN threads per expert server (0: all cores).
  int onednn_threads = 0;
  // Where the generated config goes.
  std::string work_dir;
  // --checkpoint_dir of the router and every server (SaveCheckpoint); empty:
  // none.
  std::string checkpoint_dir;
  // Given to every process (--transport_security).
  TransportCredentials credentials = TransportCredentials::Plaintext();
  // More flags for the router, and for every expert server (after the ones
  // set here, which they must not repeat: CheckExtraFlags).
  std::vector<std::string> router_flags;
  std::vector<std::string> server_flags;
  // Each process on its CPUs (one block per server, in config order);
  // nullopt: wherever the scheduler puts them.
  std::optional<CpuPinning> pinning;
};

// INVALID_ARGUMENT naming the flag unless each of `flags` is "--name" or
// "--name=value" with a name the local cluster does not set itself
// (--config, --host, --port, --name, --metrics_port, --dtype,
// --onednn_threads, --checkpoint, --checkpoint_dir, --transport_security
// and the TLS files).
absl::Status CheckExtraFlags(const std::vector<std::string>& flags);

class LocalCluster {
 public:
  static absl::StatusOr<std::unique_ptr<LocalCluster>> Start(LocalClusterOptions options);
  // Stops whatever still runs.
  ~LocalCluster();

  const ServingConfig& config() const { return config_; }
  const std::string& config_path() const { return config_path_; }
  std::string router_address() const;
  int router_metrics_port() const { return router_metrics_port_; }
  const std::vector<int>& server_metrics_ports() const { return server_metrics_ports_; }

  // Writes a Prometheus file_sd_configs target file naming every process's
  // /metrics (job "moe-router" or "moe-expert", and the server's name), for
  // deploy/prometheus/prometheus.yml.
  absl::Status WritePrometheusTargets(const std::string& path) const;

  // SIGKILL to server `s`, then the same server started again, waited for
  // until it serves (after its rejoin by sync); its log so far.
  absl::StatusOr<std::string> RestartServer(int s);

  // SIGTERM to the router, then the servers; a line per process with how it
  // ended ("exit 0").
  std::vector<std::string> Stop();

 private:
  LocalCluster() = default;

  ServingConfig config_;
  std::string config_path_;
  std::vector<std::unique_ptr<ChildProcess>> servers_;
  std::vector<std::vector<std::string>> server_args_;
  // Empty: not pinned.
  std::vector<std::vector<int>> server_cpus_;
  std::vector<int> server_metrics_ports_;
  std::unique_ptr<ChildProcess> router_;
  int router_port_ = 0;
  int router_metrics_port_ = 0;
};

}  // namespace moe::local

#endif  // MOE_DEPLOY_LOCAL_LOCAL_CLUSTER_H_
