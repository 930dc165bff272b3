// A real cluster for the multi-process tests: expert_server processes on
// ports picked up front (the config names them, and the ring uses them) and
// a router process, started from one generated config, with stubs to talk
// to them. Servers can be killed, stopped, continued and restarted.
// Thread-compatible.
#ifndef MOE_TESTS_PROCESS_CLUSTER_H_
#define MOE_TESTS_PROCESS_CLUSTER_H_

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "common/model_config.h"
#include "common/reference_moe.h"
#include "common/tensor.h"
#include "deploy/local/child_process.h"
#include "proto/expert.grpc.pb.h"
#include "proto/router.grpc.pb.h"

namespace moe::testing {

struct ProcessClusterOptions {
  // The body of the config's `model { ... }`.
  std::string model;
  // PLACEMENT_STRATEGY_<strategy>.
  std::string strategy = "HYBRID";
  int num_servers = 2;
  // More lines for `cluster { ... }` (a load profile).
  std::string cluster_extra;
  // More flags for every expert server and for the router.
  std::vector<std::string> server_flags;
  std::vector<std::string> router_flags;
  // Servers the config lists that are not started with the cluster (a
  // StatefulSet scaled below the list); StartServer starts them.
  std::vector<int> not_started;
};

class ProcessCluster {
 public:
  explicit ProcessCluster(ProcessClusterOptions options);
  ~ProcessCluster();

  void StartServer(int s);
  void KillServer(int s);
  // The router restarts on a new port; stub() follows it.
  void KillRouter();
  void StartRouter();
  // Another router of the same cluster (several routers serve one fleet);
  // it runs as long as `process` lives.
  struct OtherRouter {
    std::unique_ptr<local::ChildProcess> process;
    std::unique_ptr<v1::Router::Stub> stub;
    std::string address;
    int metrics_port = -1;
  };
  OtherRouter StartAnotherRouter();
  // SIGSTOP / SIGCONT.
  void PauseServer(int s);
  void ContinueServer(int s);
  pid_t router_pid() const { return router_->pid(); }
  int router_metrics_port() const { return router_metrics_port_; }
  const std::string& router_address() const { return router_address_; }
  // The router's log so far (for failure messages).
  std::string RouterLog();
  std::string ServerLog(int s);
  // Waits for a line of server `s`'s log containing `needle`.
  bool WaitForServerLine(int s, const std::string& needle, absl::Duration timeout);

  grpc::Status Forward(const FloatTensor& x, v1::ForwardResponse* response, bool training = false,
                       int layer = 0);
  grpc::Status Backward(uint64_t id, const FloatTensor& dy, v1::BackwardResponse* response);
  grpc::Status Step(float learning_rate, absl::Duration timeout, v1::StepResponse* response);
  // Info of expert server `s`, straight from it.
  grpc::Status Info(int s, v1::InfoResponse* response);

  v1::Router::Stub& stub() { return *stub_; }
  v1::ExpertServer::Stub& server_stub(int s) { return *server_stubs_.at(s); }
  std::shared_ptr<grpc::Channel> router_channel() const { return router_channel_; }
  std::shared_ptr<grpc::Channel> server_channel(int s) const { return server_channels_.at(s); }
  const ServingConfig& config() const { return config_; }
  // The in-process reference of MoE layer `layer` on the cluster's
  // (deterministic) weights.
  ReferenceMoe Reference(int layer = 0) const;

 private:
  const ProcessClusterOptions options_;
  std::vector<int> ports_;
  std::string config_path_;
  ServingConfig config_;
  std::vector<std::unique_ptr<local::ChildProcess>> servers_;
  std::vector<std::shared_ptr<grpc::Channel>> server_channels_;
  std::vector<std::unique_ptr<v1::ExpertServer::Stub>> server_stubs_;
  std::unique_ptr<local::ChildProcess> router_;
  std::shared_ptr<grpc::Channel> router_channel_;
  int router_metrics_port_ = -1;
  std::string router_address_;
  std::unique_ptr<v1::Router::Stub> stub_;
};

// A [rows, width] tensor from the wire, as fp32.
FloatTensor Decoded(const v1::Tensor& t, int64_t width);

}  // namespace moe::testing

#endif  // MOE_TESTS_PROCESS_CLUSTER_H_
