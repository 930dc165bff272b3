#include "router_service/grpc_expert_client.h"

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "common/client_stream_session.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "proto/expert.grpc.pb.h"

namespace moe::router {

class GrpcExpertClient::Connection {
 public:
  Connection(const ServerSpec& spec, const Options& options) {
    channel_ = KeepaliveChannel(spec.address, options.max_message_bytes, options.min_backoff,
                                options.max_backoff);
    stub_ = v1::ExpertServer::NewStub(channel_);
    v1::ExpertServer::Stub* stub = stub_.get();
    dispatch_ = std::make_unique<DispatchSession>(
        absl::StrCat("server ", spec.name, " (", spec.address, ") Dispatch"),
        [stub](grpc::ClientContext* context,
               grpc::ClientBidiReactor<v1::DispatchRequest, v1::DispatchResponse>* reactor) {
          stub->async()->Dispatch(context, reactor);
        },
        options.min_backoff, options.max_backoff);
    backward_ = std::make_unique<BackwardSession>(
        absl::StrCat("server ", spec.name, " (", spec.address, ") BackwardDispatch"),
        [stub](grpc::ClientContext* context,
               grpc::ClientBidiReactor<v1::BackwardDispatchRequest,
                                       v1::BackwardDispatchResponse>* reactor) {
          stub->async()->BackwardDispatch(context, reactor);
        },
        options.min_backoff, options.max_backoff);
    dispatch_->Connect();
  }

  using DispatchSession = ClientStreamSession<v1::DispatchRequest, v1::DispatchResponse>;
  using BackwardSession =
      ClientStreamSession<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>;

  DispatchSession& dispatch() { return *dispatch_; }
  BackwardSession& backward() { return *backward_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertServer::Stub> stub_;
  std::unique_ptr<DispatchSession> dispatch_;
  std::unique_ptr<BackwardSession> backward_;
};

GrpcExpertClient::GrpcExpertClient(Options options) : options_(std::move(options)) {}

std::unique_ptr<GrpcExpertClient> GrpcExpertClient::Create(Options options) {
  auto client = std::unique_ptr<GrpcExpertClient>(new GrpcExpertClient(std::move(options)));
  for (const ServerSpec& spec : client->options_.servers) {
    client->connections_.push_back(std::make_unique<Connection>(spec, client->options_));
  }
  return client;
}

GrpcExpertClient::~GrpcExpertClient() = default;

void GrpcExpertClient::Forward(int server, const v1::DispatchRequest& request,
                               ForwardDone done) {
  connections_.at(server)->dispatch().Send(request, std::move(done));
}

void GrpcExpertClient::Backward(int server, const v1::BackwardDispatchRequest& request,
                                BackwardDone done) {
  connections_.at(server)->backward().Send(request, std::move(done));
}

bool GrpcExpertClient::IsHealthy(int server) const {
  return connections_.at(server)->dispatch().healthy();
}

int64_t GrpcExpertClient::reconnects() const {
  int64_t total = 0;
  for (const auto& c : connections_) total += c->dispatch().opened() + c->backward().opened();
  return total;
}

}  // namespace moe::router
