#include "common/certificate_expiry.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <ctime>
#include <memory>

#include "absl/strings/str_cat.h"

namespace moe {

absl::StatusOr<absl::Time> CertificateNotAfter(const std::string& path) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(path.c_str(), "r"), &BIO_free);
  if (bio == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot open certificate ", path));
  }
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr), &X509_free);
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("no PEM certificate in ", path));
  }
  std::tm tm{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert.get()), &tm) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("unreadable notAfter in ", path));
  }
  return absl::FromTimeT(timegm(&tm));
}

std::vector<prometheus::MetricFamily> CertificateExpiryCollector::Collect() const {
  prometheus::MetricFamily family;
  family.name = "moe_tls_certificate_expiry_timestamp_seconds";
  family.help =
      "When this process's TLS certificate (own) and CA (ca) expire, in seconds since the "
      "epoch; 0: unreadable";
  family.type = prometheus::MetricType::Gauge;
  for (const auto& [label, path] :
       {std::pair<const char*, const std::string&>{"own", files_.cert}, {"ca", files_.ca}}) {
    prometheus::ClientMetric metric;
    metric.label.push_back({"certificate", label});
    const absl::StatusOr<absl::Time> not_after = CertificateNotAfter(path);
    metric.gauge.value =
        not_after.ok() ? absl::ToDoubleSeconds(*not_after - absl::UnixEpoch()) : 0.0;
    family.metric.push_back(std::move(metric));
  }
  return {std::move(family)};
}

}  // namespace moe
