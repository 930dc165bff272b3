// Starts a gRPC server the way every moe-serve binary does: its services, the
// standard health service (SERVING once started), server reflection, and
// message size limits large enough for token batches.
#ifndef MOE_COMMON_GRPC_SERVER_H_
#define MOE_COMMON_GRPC_SERVER_H_

#include <initializer_list>
#include <memory>
#include <string>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/transport_credentials.h"

namespace moe {

inline constexpr int kMaxStreamsPerConnection = 256;

// Listens on `address` (port 0 picks one; the bound port goes to `*port`)
// with `credentials`. The services must outlive the server.
inline absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const std::string& address, const TransportCredentials& credentials,
    int max_message_bytes, std::initializer_list<grpc::Service*> services, int* port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials.ForServer(), port);
  builder.SetMaxReceiveMessageSize(max_message_bytes);
  builder.SetMaxSendMessageSize(max_message_bytes);
  // Our peers ping every 2 s, with or without calls (KeepaliveChannel in
  // common/client_stream_session.h), to find dead peers fast; gRPC's default
  // policy would answer that with GOAWAY "too_many_pings".
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  // Calls open at once per connection (HTTP/2 SETTINGS: a client queues
  // the rest); StreamSet bounds the streams of all connections together.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, kMaxStreamsPerConnection);
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  return server;
}

}  // namespace moe

#endif  // MOE_COMMON_GRPC_SERVER_H_
