// Health for probes that present no client certificate (the kubelet's gRPC
// probes): a plaintext port serving only the standard health service, beside
// a server whose own port may require mutual TLS. Health says nothing an
// attacker could use, and nothing else is served there (no reflection).
//
// Two services: "" is liveness (SERVING while the process runs, also while
// it loads or syncs weights), kReadinessService is readiness (SERVING only
// while the server takes traffic: not before it has loaded and synced, not
// while it drains). The main port reports the same two.
#ifndef MOE_COMMON_HEALTH_ENDPOINT_H_
#define MOE_COMMON_HEALTH_ENDPOINT_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace moe {

inline constexpr char kReadinessService[] = "moe.ready";

class HealthEndpoint {
 public:
  // Listens on `address` (port 0 picks one), not ready.
  static absl::StatusOr<std::unique_ptr<HealthEndpoint>> Start(const std::string& address);
  ~HealthEndpoint();

  int port() const { return port_; }
  void SetReady(bool ready);

 private:
  class Service;
  HealthEndpoint();

  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// Sets readiness on `server`'s health service (and on `endpoint`, if any).
void SetReadiness(grpc::Server& server, HealthEndpoint* endpoint, bool ready);

}  // namespace moe

#endif  // MOE_COMMON_HEALTH_ENDPOINT_H_
