// The one place that decides how moe-serve's gRPC connections are secured:
// every server port and every channel (router to servers, server to server,
// clients to the router) takes its credentials from here.
//   plaintext: no encryption (loopback, or behind the Kubernetes
//              NetworkPolicy).
//   tls:       TLS with this process's certificate (--tls_cert, --tls_key),
//              peers verified against --tls_ca. With --require_client_cert
//              a server accepts only clients with a certificate from that CA
//              (mutual TLS); channels always present the certificate, so
//              router-to-server and server-to-server calls are mutual.
//              Certificates are re-read from disk (gRPC's file-watcher
//              provider, every --tls_refresh_interval): rotating them needs
//              no restart. With --authz_policy every server port checks each
//              call against the policy (authorization.h) by the peer's
//              certificate identity, before any handler runs.
// Thread-safe (immutable).
#ifndef MOE_COMMON_TRANSPORT_CREDENTIALS_H_
#define MOE_COMMON_TRANSPORT_CREDENTIALS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/authorization.h"
#include "common/grpc_authorization.h"

ABSL_DECLARE_FLAG(std::string, transport_security);
ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(std::string, tls_ca);
ABSL_DECLARE_FLAG(bool, require_client_cert);
ABSL_DECLARE_FLAG(absl::Duration, tls_refresh_interval);
ABSL_DECLARE_FLAG(std::string, authz_policy);

namespace moe {

// PEM files of one process's TLS identity and the CA it trusts.
struct TlsFiles {
  std::string cert;  // certificate chain
  std::string key;   // private key
  std::string ca;    // CA bundle peers must chain to
};

class TransportCredentials {
 public:
  static TransportCredentials Plaintext();
  // INVALID_ARGUMENT naming the file when one is missing or unreadable.
  static absl::StatusOr<TransportCredentials> Tls(
      TlsFiles files, bool require_client_cert,
      absl::Duration refresh_interval = absl::Seconds(60));
  // From --transport_security, the --tls_* flags and --authz_policy;
  // INVALID_ARGUMENT naming the flag otherwise.
  static absl::StatusOr<TransportCredentials> FromFlags();

  // The same credentials whose server ports check calls against the policy
  // in `path` (TLS only: identities come from certificates).
  absl::StatusOr<TransportCredentials> WithPolicy(const std::string& path) const;
  // The same credentials, telling `on_denied` of each refused call (for a
  // metric).
  TransportCredentials WithDeniedCallback(OnDenied on_denied) const;
  bool has_policy() const { return policy_ != nullptr; }
  // The certificate files of TLS credentials; null for plaintext.
  const TlsFiles* tls_files() const { return mode_ == Mode::kTls ? &files_ : nullptr; }

  std::shared_ptr<grpc::ServerCredentials> ForServer() const;
  std::shared_ptr<grpc::ChannelCredentials> ForChannel() const;
  // For logs: "plaintext", "tls" or "mutual tls".
  std::string name() const;
  // The flags that give a child process the same credentials.
  std::vector<std::string> AsFlags() const;

 private:
  enum class Mode { kPlaintext, kTls };
  explicit TransportCredentials(Mode mode) : mode_(mode) {}

  Mode mode_;
  TlsFiles files_;
  std::string policy_path_;
  std::shared_ptr<const AuthorizationPolicy> policy_;
  OnDenied on_denied_;
  bool require_client_cert_ = false;
  absl::Duration refresh_interval_ = absl::Seconds(60);
};

// A channel to `address` with `credentials` and both message limits set to
// `max_message_bytes`. With `round_robin`, calls go to every address the
// target resolves to in turn (a headless Service's pods, or
// "ipv4:host:port,host:port") rather than all to the first.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& address,
                                          const TransportCredentials& credentials,
                                          int max_message_bytes, bool round_robin = false);

}  // namespace moe

#endif  // MOE_COMMON_TRANSPORT_CREDENTIALS_H_
