// Serves a Prometheus registry on http://host:port/metrics (prometheus-cpp's
// civetweb exposer), for the router and the expert servers alike.
#ifndef MOE_COMMON_METRICS_EXPOSER_H_
#define MOE_COMMON_METRICS_EXPOSER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

namespace moe {

// Port 0 picks a free port; the bound one is exposer->GetListeningPorts()[0].
inline absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartMetricsExposer(
    const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry) {
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics port ", port, ": ", e.what()));
  }
  exposer->RegisterCollectable(registry);
  return exposer;
}

}  // namespace moe

#endif  // MOE_COMMON_METRICS_EXPOSER_H_
