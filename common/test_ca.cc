#include "common/test_ca.h"

#include <cstdlib>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace moe {
namespace {

// Names go into file names and subjects: keep them plain.
absl::Status CheckName(const std::string& name) {
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != ' ') {
      return absl::InvalidArgumentError(absl::StrCat("test CA: bad name \"", name, "\""));
    }
  }
  return name.empty() ? absl::InvalidArgumentError("test CA: empty name") : absl::OkStatus();
}

absl::Status Run(const std::string& command) {
  // The output goes to the log only on failure.
  const int rc = std::system((command + " >/dev/null 2>&1").c_str());
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("test CA: `", command, "` failed (", rc,
                                            "); is the openssl package installed?"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TestCertificateAuthority> TestCertificateAuthority::Create(
    const std::string& directory, const std::string& name) {
  if (absl::Status s = CheckName(name); !s.ok()) return s;
  const std::string ca = directory + "/ca.pem";
  const std::string key = directory + "/ca.key";
  if (absl::Status s = Run(absl::StrCat(
          "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7",
          " -keyout '", key, "' -out '", ca, "' -subj '/CN=", name, "'"));
      !s.ok()) {
    return s;
  }
  return TestCertificateAuthority(directory, ca, key);
}

absl::StatusOr<TlsFiles> TestCertificateAuthority::Issue(const std::string& name) const {
  if (absl::Status s = CheckName(name); !s.ok()) return s;
  const std::string base = absl::StrCat(directory_, "/", name);
  const std::string extensions = base + ".ext";
  std::ofstream(extensions) << "subjectAltName=DNS:" << name << ",DNS:localhost,IP:127.0.0.1\n"
                            << "extendedKeyUsage=serverAuth,clientAuth\n"
                            << "basicConstraints=CA:FALSE\n";
  if (absl::Status s = Run(absl::StrCat(
          "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout '", base,
          ".key' -out '", base, ".csr' -subj '/CN=", name, "'"));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Run(absl::StrCat("openssl x509 -req -days 7 -in '", base, ".csr' -CA '",
                                        ca_path_, "' -CAkey '", ca_key_, "' -CAcreateserial -out '",
                                        base, ".pem' -extfile '", extensions, "'"));
      !s.ok()) {
    return s;
  }
  return TlsFiles{base + ".pem", base + ".key", ca_path_};
}

}  // namespace moe
