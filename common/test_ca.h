// A throwaway certificate authority for local runs and tests, made at run
// time with the openssl command-line tool (Debian's openssl package): a CA
// and, per name, a certificate for both TLS server and client use whose
// subject alternative names are that name, localhost and 127.0.0.1. Never
// for production, and never committed: the keys live in `directory`.
#ifndef MOE_COMMON_TEST_CA_H_
#define MOE_COMMON_TEST_CA_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/transport_credentials.h"

namespace moe {

class TestCertificateAuthority {
 public:
  // Creates the CA's key and certificate in `directory` (which must exist).
  static absl::StatusOr<TestCertificateAuthority> Create(
      const std::string& directory, const std::string& name = "moe-serve test CA");

  const std::string& ca_path() const { return ca_path_; }
  // Issues `name`.pem / `name`.key, signed by this CA; the files name the
  // CA as their trust root.
  absl::StatusOr<TlsFiles> Issue(const std::string& name) const;

 private:
  TestCertificateAuthority(std::string directory, std::string ca_path, std::string ca_key)
      : directory_(std::move(directory)),
        ca_path_(std::move(ca_path)),
        ca_key_(std::move(ca_key)) {}

  std::string directory_;
  std::string ca_path_;
  std::string ca_key_;
};

}  // namespace moe

#endif  // MOE_COMMON_TEST_CA_H_
