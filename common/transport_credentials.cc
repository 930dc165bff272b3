#include "common/transport_credentials.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <fstream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, transport_security, "plaintext",
          "How gRPC connections are secured: plaintext (loopback and trusted networks, e.g. "
          "behind the Kubernetes NetworkPolicy) or tls (needs --tls_cert, --tls_key, --tls_ca).");
ABSL_FLAG(std::string, tls_cert, "", "tls: PEM certificate chain of this process.");
ABSL_FLAG(std::string, tls_key, "", "tls: PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_ca, "", "tls: PEM CA bundle that peers' certificates must chain to.");
ABSL_FLAG(bool, require_client_cert, false,
          "tls: this process's server accepts only clients with a certificate from --tls_ca "
          "(mutual TLS; set it on expert servers).");
ABSL_FLAG(absl::Duration, tls_refresh_interval, absl::Seconds(60),
          "tls: how often the certificate files are re-read (rotation without a restart).");
ABSL_FLAG(std::string, authz_policy, "",
          "tls: JSON authorization policy (roles of certificate identities, roles per "
          "method; default deny) checked on every call this process serves; empty: none.");

namespace moe {
namespace {

absl::Status CheckReadable(absl::string_view flag, const std::string& path) {
  if (path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " is required with tls"));
  }
  if (!std::ifstream(path)) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot read it"));
  }
  return absl::OkStatus();
}

unsigned int RefreshSeconds(absl::Duration interval) {
  return static_cast<unsigned int>(std::max<int64_t>(1, absl::ToInt64Seconds(interval)));
}

}  // namespace

TransportCredentials TransportCredentials::Plaintext() {
  return TransportCredentials(Mode::kPlaintext);
}

absl::StatusOr<TransportCredentials> TransportCredentials::Tls(TlsFiles files,
                                                               bool require_client_cert,
                                                               absl::Duration refresh_interval) {
  if (absl::Status s = CheckReadable("tls_cert", files.cert); !s.ok()) return s;
  if (absl::Status s = CheckReadable("tls_key", files.key); !s.ok()) return s;
  if (absl::Status s = CheckReadable("tls_ca", files.ca); !s.ok()) return s;
  TransportCredentials credentials(Mode::kTls);
  credentials.files_ = std::move(files);
  credentials.require_client_cert_ = require_client_cert;
  credentials.refresh_interval_ = refresh_interval;
  return credentials;
}

absl::StatusOr<TransportCredentials> TransportCredentials::FromFlags() {
  const std::string mode = absl::GetFlag(FLAGS_transport_security);
  if (mode == "plaintext") return Plaintext();
  const std::string policy = absl::GetFlag(FLAGS_authz_policy);
  if (mode == "tls") {
    absl::StatusOr<TransportCredentials> tls = Tls(
        {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_ca)},
        absl::GetFlag(FLAGS_require_client_cert), absl::GetFlag(FLAGS_tls_refresh_interval));
    if (!tls.ok() || policy.empty()) return tls;
    return tls->WithPolicy(policy);
  }
  if (mode == "plaintext" && !policy.empty()) {
    return absl::InvalidArgumentError(
        "--authz_policy needs --transport_security=tls: identities come from certificates");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--transport_security=", mode, ": unknown mode (plaintext or tls)"));
}

absl::StatusOr<TransportCredentials> TransportCredentials::WithPolicy(
    const std::string& path) const {
  if (mode_ != Mode::kTls) {
    return absl::InvalidArgumentError(
        "--authz_policy needs --transport_security=tls: identities come from certificates");
  }
  absl::StatusOr<AuthorizationPolicy> policy = AuthorizationPolicy::Load(path);
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--authz_policy=", policy.status().message()));
  }
  TransportCredentials with = *this;
  with.policy_path_ = path;
  with.policy_ = std::make_shared<const AuthorizationPolicy>(*std::move(policy));
  return with;
}

TransportCredentials TransportCredentials::WithDeniedCallback(OnDenied on_denied) const {
  TransportCredentials with = *this;
  with.on_denied_ = std::move(on_denied);
  return with;
}

std::shared_ptr<grpc::ServerCredentials> TransportCredentials::ForServer() const {
  if (mode_ == Mode::kPlaintext) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files_.key, files_.cert, files_.ca, RefreshSeconds(refresh_interval_));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  // Without --require_client_cert a client may still present one (it is
  // then verified); mutual TLS refuses the handshake without it.
  options.set_cert_request_type(require_client_cert_
                                    ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                    : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  if (policy_ != nullptr) {
    credentials->SetAuthMetadataProcessor(
        std::make_shared<PolicyAuthProcessor>(policy_, on_denied_));
  }
  return credentials;
}

std::shared_ptr<grpc::ChannelCredentials> TransportCredentials::ForChannel() const {
  if (mode_ == Mode::kPlaintext) return grpc::InsecureChannelCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files_.key, files_.cert, files_.ca, RefreshSeconds(refresh_interval_));
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  // The server's certificate must chain to the CA and name the host dialled.
  options.set_verify_server_certs(true);
  return grpc::experimental::TlsCredentials(options);
}

std::string TransportCredentials::name() const {
  if (mode_ == Mode::kPlaintext) return "plaintext";
  return absl::StrCat(require_client_cert_ ? "mutual tls" : "tls",
                      policy_ != nullptr ? ", authorization policy" : "");
}

std::vector<std::string> TransportCredentials::AsFlags() const {
  if (mode_ == Mode::kPlaintext) return {"--transport_security=plaintext"};
  std::vector<std::string> flags = {
      "--transport_security=tls",
      "--tls_cert=" + files_.cert,
      "--tls_key=" + files_.key,
      "--tls_ca=" + files_.ca,
      absl::StrCat("--require_client_cert=", require_client_cert_ ? "true" : "false"),
      absl::StrCat("--tls_refresh_interval=", absl::FormatDuration(refresh_interval_))};
  if (!policy_path_.empty()) flags.push_back("--authz_policy=" + policy_path_);
  return flags;
}

std::shared_ptr<grpc::Channel> NewChannel(const std::string& address,
                                          const TransportCredentials& credentials,
                                          int max_message_bytes, bool round_robin) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  if (round_robin) args.SetLoadBalancingPolicyName("round_robin");
  return grpc::CreateCustomChannel(address, credentials.ForChannel(), args);
}

}  // namespace moe

#if defined(__SANITIZE_ADDRESS__)
// LeakSanitizer's suppressions for every binary that makes credentials (the
// asan configuration): OpenSSL's objects of a gRPC TLS handshake still in
// flight when a process exits (a connection attempt of a channel just
// destroyed, finishing on gRPC's executor thread) are reported as leaked,
// now and then, on a loaded machine. libcrypto has no frame pointers, so
// LSan cannot unwind past it to tell those from others: every leak whose
// stack reaches libcrypto is suppressed. Our own OpenSSL use
// (certificate_expiry.cc) frees through unique_ptr deleters.
extern "C" const char* __lsan_default_suppressions() { return "leak:libcrypto.so\n"; }
#endif
