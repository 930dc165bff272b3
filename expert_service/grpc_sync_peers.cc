#include "expert_service/grpc_sync_peers.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"

namespace moe::expert {

GrpcSyncPeers::GrpcSyncPeers(const ClusterConfig& cluster, const std::string& self,
                             const TransportCredentials& credentials, int max_message_bytes) {
  for (const ServerSpec& spec : cluster.servers) {
    if (spec.name == self) continue;
    std::shared_ptr<grpc::Channel> channel =
        NewChannel(spec.address, credentials, max_message_bytes);
    peers_.push_back({spec, channel, v1::ExpertServer::NewStub(channel)});
  }
}

std::string GrpcSyncPeers::name(int peer) const {
  const ServerSpec& spec = peers_.at(peer).spec;
  return absl::StrCat(spec.name, " (", spec.address, ")");
}

absl::StatusOr<v1::InfoResponse> GrpcSyncPeers::Info(int peer, absl::Time deadline) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(deadline));
  v1::InfoResponse response;
  const grpc::Status status = peers_.at(peer).stub->Info(&context, v1::InfoRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::GetGateResponse> GrpcSyncPeers::Gate(int peer, absl::Time deadline) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(deadline));
  v1::GetGateResponse response;
  const grpc::Status status =
      peers_.at(peer).stub->GetGate(&context, v1::GetGateRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status GrpcSyncPeers::FetchExpert(
    int peer, ExpertKey expert, absl::Time deadline,
    absl::FunctionRef<absl::Status(const v1::ExpertWeightsChunk&)> sink) {
  // A peer that was down when this server started may be up now, behind
  // the channel's reconnect back-off: connect first (briefly), rather than
  // fail at once.
  const Peer& p = peers_.at(peer);
  const auto connect_by = absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(5)));
  for (grpc_connectivity_state state = p.channel->GetState(/*try_to_connect=*/true);
       state != GRPC_CHANNEL_READY && p.channel->WaitForStateChange(state, connect_by);
       state = p.channel->GetState(true)) {
  }
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(deadline));
  v1::GetExpertWeightsRequest request;
  SetExpertKey(expert, &request);
  std::unique_ptr<grpc::ClientReader<v1::ExpertWeightsChunk>> reader =
      peers_.at(peer).stub->GetExpertWeights(&context, request);
  v1::ExpertWeightsChunk chunk;
  absl::Status sunk;
  while (sunk.ok() && reader->Read(&chunk)) sunk = sink(chunk);
  if (!sunk.ok()) {
    context.TryCancel();
    reader->Finish();  // cancelled: its status says only that
    return sunk;
  }
  return FromGrpcStatus(reader->Finish());
}

}  // namespace moe::expert
