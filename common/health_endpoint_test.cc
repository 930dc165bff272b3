#include "common/health_endpoint.h"

#include <grpcpp/generic/generic_stub.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_server.h"
#include "common/transport_credentials.h"
#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"

namespace moe {
namespace {

using ::grpc::health::v1::HealthCheckResponse;

HealthCheckResponse::ServingStatus Check(int port, const std::string& service) {
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  const grpc::Status status = health->Check(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response.status();
}

// One empty message to the reflection method, as a unary call.
grpc::StatusCode CallReflection(int port) {
  grpc::GenericStub stub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1), response;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  return status.error_code();
}

TEST(HealthEndpointTest, LiveAtOnceReadyWhenToldAndNothingElseServed) {
  absl::StatusOr<std::unique_ptr<HealthEndpoint>> endpoint = HealthEndpoint::Start("127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  const int port = (*endpoint)->port();
  EXPECT_EQ(Check(port, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check(port, kReadinessService), HealthCheckResponse::NOT_SERVING);
  (*endpoint)->SetReady(true);
  EXPECT_EQ(Check(port, kReadinessService), HealthCheckResponse::SERVING);
  (*endpoint)->SetReady(false);
  EXPECT_EQ(Check(port, kReadinessService), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(CallReflection(port), grpc::StatusCode::UNIMPLEMENTED);
}

TEST(HealthEndpointTest, ReadinessIsSetOnTheMainPortAndTheEndpointAlike) {
  int main_port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartGrpcServer("127.0.0.1:0", TransportCredentials::Plaintext(), 1 << 20, {}, &main_port);
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<std::unique_ptr<HealthEndpoint>> endpoint = HealthEndpoint::Start("127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  SetReadiness(**server, endpoint->get(), true);
  EXPECT_EQ(Check(main_port, kReadinessService), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check((*endpoint)->port(), kReadinessService), HealthCheckResponse::SERVING);
  SetReadiness(**server, endpoint->get(), false);
  EXPECT_EQ(Check(main_port, kReadinessService), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Check((*endpoint)->port(), kReadinessService), HealthCheckResponse::NOT_SERVING);
  // The main port serves reflection; the endpoint does not (test above).
  EXPECT_NE(CallReflection(main_port), grpc::StatusCode::UNIMPLEMENTED);
  (*server)->Shutdown();
}

}  // namespace
}  // namespace moe
