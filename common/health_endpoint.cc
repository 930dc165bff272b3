#include "common/health_endpoint.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/health.grpc.pb.h"

namespace moe {
namespace {

// Drops the builder's plugins: server reflection, registered process-wide
// for the main ports, stays off the plaintext port.
class NoPlugins final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->clear();
  }
};

}  // namespace

// Check only (what probes call); a callback service, so the port needs no
// polling threads.
class HealthEndpoint::Service final : public grpc::health::v1::Health::CallbackService {
 public:
  void SetReady(bool ready) {
    absl::MutexLock lock(&mu_);
    ready_ = ready;
  }

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    using Response = grpc::health::v1::HealthCheckResponse;
    if (request->service().empty()) {
      response->set_status(Response::SERVING);
    } else if (request->service() == kReadinessService) {
      absl::MutexLock lock(&mu_);
      response->set_status(ready_ ? Response::SERVING : Response::NOT_SERVING);
    } else {
      reactor->Finish(grpc::Status(
          grpc::StatusCode::NOT_FOUND,
          absl::StrCat("unknown health service \"", request->service().substr(0, 100), "\"")));
      return reactor;
    }
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  absl::Mutex mu_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
};

absl::StatusOr<std::unique_ptr<HealthEndpoint>> HealthEndpoint::Start(const std::string& address) {
  auto endpoint = std::unique_ptr<HealthEndpoint>(new HealthEndpoint());
  endpoint->service_ = std::make_unique<Service>();
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<NoPlugins>());
  builder.RegisterService(endpoint->service_.get());
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &endpoint->port_);
  // Probes send tiny requests.
  builder.SetMaxReceiveMessageSize(4096);
  endpoint->server_ = builder.BuildAndStart();
  if (endpoint->server_ == nullptr || endpoint->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for health on ", address));
  }
  return endpoint;
}

HealthEndpoint::HealthEndpoint() = default;

HealthEndpoint::~HealthEndpoint() {
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
}

void HealthEndpoint::SetReady(bool ready) { service_->SetReady(ready); }

void SetReadiness(grpc::Server& server, HealthEndpoint* endpoint, bool ready) {
  server.GetHealthCheckService()->SetServingStatus(kReadinessService, ready);
  if (endpoint != nullptr) endpoint->SetReady(ready);
}

}  // namespace moe
