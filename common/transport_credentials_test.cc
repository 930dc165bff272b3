#include "common/transport_credentials.h"

#include "absl/flags/flag.h"
#include "common/grpc_server.h"
#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"

namespace moe {
namespace {

TEST(TransportCredentialsTest, PlaintextIsTheDefaultAndAnUnknownModeIsNamed) {
  absl::StatusOr<TransportCredentials> credentials = TransportCredentials::FromFlags();
  ASSERT_TRUE(credentials.ok()) << credentials.status();
  EXPECT_EQ(credentials->name(), "plaintext");
  EXPECT_EQ(credentials->AsFlag(), "--transport_security=plaintext");

  absl::SetFlag(&FLAGS_transport_security, "tls");
  absl::StatusOr<TransportCredentials> unknown = TransportCredentials::FromFlags();
  absl::SetFlag(&FLAGS_transport_security, "plaintext");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("--transport_security=tls"), std::string::npos);
}

// A server and a channel made from the same credentials talk.
TEST(TransportCredentialsTest, AServerAndAChannelFromThemConnect) {
  const TransportCredentials credentials = TransportCredentials::Plaintext();
  int port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartGrpcServer("127.0.0.1:0", credentials, 1 << 20, {}, &port);
  ASSERT_TRUE(server.ok()) << server.status();
  auto health = grpc::health::v1::Health::NewStub(
      NewChannel(absl::StrCat("127.0.0.1:", port), credentials, 1 << 20));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = health->Check(&context, {}, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  (*server)->Shutdown();
}

}  // namespace
}  // namespace moe
