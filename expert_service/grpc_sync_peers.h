// SyncPeers over gRPC: the other expert servers of the cluster config,
// reached with the cluster's transport credentials (blocking calls: the
// sync runs once, before the server listens).
#ifndef MOE_EXPERT_SERVICE_GRPC_SYNC_PEERS_H_
#define MOE_EXPERT_SERVICE_GRPC_SYNC_PEERS_H_

#include <memory>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/transport_credentials.h"
#include "expert_service/weight_sync.h"
#include "proto/expert.grpc.pb.h"

namespace moe::expert {

class GrpcSyncPeers : public SyncPeers {
 public:
  // Every server of `cluster` but `self`.
  GrpcSyncPeers(const ClusterConfig& cluster, const std::string& self,
                const TransportCredentials& credentials, int max_message_bytes);

  int num_peers() const override { return static_cast<int>(peers_.size()); }
  std::string name(int peer) const override;
  absl::StatusOr<v1::InfoResponse> Info(int peer, absl::Time deadline) override;
  absl::Status FetchExpert(
      int peer, ExpertKey expert, absl::Time deadline,
      absl::FunctionRef<absl::Status(const v1::ExpertWeightsChunk&)> sink) override;
  absl::StatusOr<v1::GetGateResponse> Gate(int peer, absl::Time deadline) override;

 private:
  struct Peer {
    ServerSpec spec;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::ExpertServer::Stub> stub;
  };
  std::vector<Peer> peers_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_GRPC_SYNC_PEERS_H_
