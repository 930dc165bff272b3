// Serves a Prometheus registry on http://host:port/metrics (prometheus-cpp's
// civetweb exposer), for the router and the expert servers alike; with TLS
// credentials also the certificates' expiry (certificate_expiry.h).
#ifndef MOE_COMMON_METRICS_EXPOSER_H_
#define MOE_COMMON_METRICS_EXPOSER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/transport_credentials.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

namespace moe {

class MetricsEndpoint {
 public:
  // Port 0 picks a free port (see port()).
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry,
      const TransportCredentials& credentials);

  int port() const { return exposer_->GetListeningPorts().at(0); }

 private:
  MetricsEndpoint() = default;

  // The exposer holds weak references: these live as long as it.
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> certificates_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace moe

#endif  // MOE_COMMON_METRICS_EXPOSER_H_
