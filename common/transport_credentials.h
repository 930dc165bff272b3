// The one place that decides how moe-serve's gRPC connections are secured:
// every server port and every channel (router to servers, server to server,
// clients to the router) takes its credentials from here. Plaintext is the
// only mode today; TLS and per-identity authorization plug in here, behind
// the same calls, with flags of their own.
// Thread-safe (immutable).
#ifndef MOE_COMMON_TRANSPORT_CREDENTIALS_H_
#define MOE_COMMON_TRANSPORT_CREDENTIALS_H_

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// --transport_security: "plaintext" (the default, and the only mode yet).
ABSL_DECLARE_FLAG(std::string, transport_security);

namespace moe {

class TransportCredentials {
 public:
  static TransportCredentials Plaintext();
  // From --transport_security; INVALID_ARGUMENT naming the flag otherwise.
  static absl::StatusOr<TransportCredentials> FromFlags();

  std::shared_ptr<grpc::ServerCredentials> ForServer() const;
  std::shared_ptr<grpc::ChannelCredentials> ForChannel() const;
  // For logs and for passing on to child processes: the flag's value.
  absl::string_view name() const;
  // The flag that gives a child process the same credentials.
  std::string AsFlag() const;

 private:
  enum class Mode { kPlaintext };
  explicit TransportCredentials(Mode mode) : mode_(mode) {}

  Mode mode_;
};

// A channel to `address` with `credentials` and both message limits set to
// `max_message_bytes`.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& address,
                                          const TransportCredentials& credentials,
                                          int max_message_bytes);

}  // namespace moe

#endif  // MOE_COMMON_TRANSPORT_CREDENTIALS_H_
