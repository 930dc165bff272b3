#include "common/metrics_exposer.h"

#include "absl/strings/str_cat.h"
#include "common/certificate_expiry.h"

namespace moe {

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry,
    const TransportCredentials& credentials) {
  auto endpoint = std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint());
  try {
    endpoint->exposer_ = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics port ", port, ": ", e.what()));
  }
  endpoint->registry_ = std::move(registry);
  endpoint->exposer_->RegisterCollectable(endpoint->registry_);
  if (const TlsFiles* files = credentials.tls_files()) {
    endpoint->certificates_ = std::make_shared<CertificateExpiryCollector>(*files);
    endpoint->exposer_->RegisterCollectable(endpoint->certificates_);
  }
  return endpoint;
}

}  // namespace moe
