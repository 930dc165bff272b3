// A small C++ client of the router: Forward and Backward on fp32 tensors,
// and waiting for the router to be healthy. Synchronous; one channel reused
// for every call. Thread-safe.
#ifndef MOE_CLIENTS_CPP_MOE_CLIENT_H_
#define MOE_CLIENTS_CPP_MOE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/tensor.h"
#include "common/transport_credentials.h"
#include "proto/health.grpc.pb.h"
#include "proto/router.grpc.pb.h"

namespace moe::client {

struct ForwardOptions {
  // Keep state for Backward (the result's request_id names it).
  bool training = false;
  // Ask for the chosen experts and weights per token.
  bool return_routing = false;
  // Send x as bf16 instead of fp32 (y comes back in the same dtype).
  DType wire_dtype = DType::kFloat32;
  absl::Duration timeout = absl::Seconds(60);
  // The MoE layer (0 to the model's num_layers - 1).
  int layer = 0;
};

struct ForwardOutput {
  FloatTensor y;
  uint64_t request_id = 0;
  int64_t dropped_pairs = 0;
  // The batch's load-balancing loss and router z-loss (unweighted).
  double aux_loss = 0.0;
  double z_loss = 0.0;
  // With return_routing: [tokens * top_k] expert ids, weights, and whether
  // the pair was dropped for capacity.
  int top_k = 0;
  std::vector<int32_t> expert_ids;
  std::vector<float> weights;
  std::vector<bool> dropped;
};

struct StepOutput {
  uint64_t step = 0;
  absl::Duration step_time;
  // The slowest server's gradient all-reduces and optimizer; the commit.
  absl::Duration allreduce_time;
  absl::Duration optimizer_time;
  absl::Duration commit_time;
  // Servers that did not confirm the commit (the step is committed; they
  // commit it when they hear from a peer or the next step).
  std::vector<std::string> servers_behind;
  // Servers behind the committed step, left out of this one (they sync
  // to it).
  std::vector<std::string> servers_left_out;
};

struct SavedCheckpoint {
  uint64_t step = 0;
  // As the router sees it: pass it to --checkpoint to serve it.
  std::string directory;
  std::vector<std::string> files;
  int64_t bytes = 0;
  absl::Duration time;
  std::string lineage;
};

// Forwards over one long-lived Router.ForwardStream, one at a time: the
// stream (and its HTTP/2 stream) stays open between requests. Not
// thread-safe; one per client thread.
class ForwardStreamClient {
 public:
  ~ForwardStreamClient();
  absl::StatusOr<ForwardOutput> Forward(const FloatTensor& x, const ForwardOptions& options = {});

 private:
  friend class MoeClient;
  explicit ForwardStreamClient(v1::Router::Stub& stub);

  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ForwardRequest, v1::ForwardResponse>> stream_;
  uint64_t next_client_id_ = 1;
};

class MoeClient {
 public:
  // `address` is a gRPC target naming the router(s): host:port, a headless
  // Service's dns:///name:port, or ipv4:host:port,host:port; calls go to
  // every router it resolves to in turn (round robin).
  static std::unique_ptr<MoeClient> Connect(
      const std::string& address,
      const TransportCredentials& credentials = TransportCredentials::Plaintext(),
      int max_message_bytes = 512 << 20);

  // Waits (without polling) until the router's health service says
  // SERVING, up to `timeout`.
  absl::Status WaitUntilHealthy(absl::Duration timeout);
  // One health Check, failing fast: an RPC with no payload and no work
  // behind it, gRPC's own round trip.
  absl::Status HealthCheck();

  absl::StatusOr<ForwardOutput> Forward(const FloatTensor& x,
                                        const ForwardOptions& options = {});
  absl::StatusOr<FloatTensor> Backward(uint64_t request_id, const FloatTensor& grad_output,
                                       absl::Duration timeout = absl::Seconds(60));
  // Opens a ForwardStream (options.timeout of each Forward does not apply:
  // the stream has no deadline).
  std::unique_ptr<ForwardStreamClient> OpenForwardStream();
  // One training step (learning_rate 0: the config's).
  absl::StatusOr<StepOutput> Step(float learning_rate,
                                  absl::Duration timeout = absl::Seconds(60));
  // The placement the router would move to for the load it measured, and
  // what it would cost (Router.Rebalance with dry_run; an admin call).
  absl::StatusOr<v1::RebalanceResponse> PlanRebalance(absl::Duration timeout = absl::Seconds(30));
  // Moves the cluster to that placement while it serves (Router.Rebalance;
  // an admin call): the answer has the plan, the new epoch and the time
  // the weight pulls, the drain and the whole change took.
  // `drain`: servers (by name) the new placement leaves empty, so that
  // they can be stopped.
  absl::StatusOr<v1::RebalanceResponse> Rebalance(const std::vector<std::string>& drain = {},
                                                  absl::Duration timeout = absl::Minutes(10));
  // A checkpoint of the last committed step (Router.SaveCheckpoint).
  absl::StatusOr<SavedCheckpoint> SaveCheckpoint(DType dtype = DType::kFloat32,
                                                 absl::Duration timeout = absl::Minutes(10));

 private:
  explicit MoeClient(std::shared_ptr<grpc::Channel> channel);
  absl::StatusOr<v1::RebalanceResponse> CallRebalance(bool dry_run,
                                                      const std::vector<std::string>& drain,
                                                      absl::Duration timeout);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Router::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace moe::client

#endif  // MOE_CLIENTS_CPP_MOE_CLIENT_H_
