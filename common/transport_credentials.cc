#include "common/transport_credentials.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, transport_security, "plaintext",
          "How gRPC connections are secured: plaintext (the only mode yet; for loopback "
          "and trusted networks, e.g. behind the Kubernetes NetworkPolicy).");

namespace moe {

TransportCredentials TransportCredentials::Plaintext() {
  return TransportCredentials(Mode::kPlaintext);
}

absl::StatusOr<TransportCredentials> TransportCredentials::FromFlags() {
  const std::string mode = absl::GetFlag(FLAGS_transport_security);
  if (mode == "plaintext") return Plaintext();
  return absl::InvalidArgumentError(absl::StrCat(
      "--transport_security=", mode, ": unknown mode (the only mode yet is plaintext)"));
}

std::shared_ptr<grpc::ServerCredentials> TransportCredentials::ForServer() const {
  switch (mode_) {
    case Mode::kPlaintext:
      return grpc::InsecureServerCredentials();
  }
  return nullptr;
}

std::shared_ptr<grpc::ChannelCredentials> TransportCredentials::ForChannel() const {
  switch (mode_) {
    case Mode::kPlaintext:
      return grpc::InsecureChannelCredentials();
  }
  return nullptr;
}

absl::string_view TransportCredentials::name() const {
  switch (mode_) {
    case Mode::kPlaintext:
      return "plaintext";
  }
  return "unknown";
}

std::string TransportCredentials::AsFlag() const {
  return absl::StrCat("--transport_security=", name());
}

std::shared_ptr<grpc::Channel> NewChannel(const std::string& address,
                                          const TransportCredentials& credentials,
                                          int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  return grpc::CreateCustomChannel(address, credentials.ForChannel(), args);
}

}  // namespace moe
