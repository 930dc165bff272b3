// When this process's TLS certificates expire, as a Prometheus metric read
// from the files at every scrape (so a rotated certificate shows at once):
//   moe_tls_certificate_expiry_timestamp_seconds{certificate="own"|"ca"}
// the notAfter of the first certificate in --tls_cert and in --tls_ca, in
// seconds since the epoch; 0 when the file cannot be read or parsed (the
// expiry alert fires for that too).
#ifndef MOE_COMMON_CERTIFICATE_EXPIRY_H_
#define MOE_COMMON_CERTIFICATE_EXPIRY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/transport_credentials.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace moe {

// The notAfter of the first certificate in the PEM file at `path`;
// INVALID_ARGUMENT naming the file when there is none.
absl::StatusOr<absl::Time> CertificateNotAfter(const std::string& path);

class CertificateExpiryCollector final : public prometheus::Collectable {
 public:
  explicit CertificateExpiryCollector(TlsFiles files) : files_(std::move(files)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const TlsFiles files_;
};

}  // namespace moe

#endif  // MOE_COMMON_CERTIFICATE_EXPIRY_H_
