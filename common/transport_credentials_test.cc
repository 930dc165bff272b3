#include "common/transport_credentials.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_server.h"
#include "common/test_ca.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

TEST(TransportCredentialsTest, PlaintextIsTheDefaultAndAnUnknownModeIsNamed) {
  absl::StatusOr<TransportCredentials> credentials = TransportCredentials::FromFlags();
  ASSERT_TRUE(credentials.ok()) << credentials.status();
  EXPECT_EQ(credentials->name(), "plaintext");
  EXPECT_THAT(credentials->AsFlags(), ::testing::ElementsAre("--transport_security=plaintext"));

  absl::SetFlag(&FLAGS_transport_security, "ssl");
  absl::StatusOr<TransportCredentials> unknown = TransportCredentials::FromFlags();
  absl::SetFlag(&FLAGS_transport_security, "tls");
  absl::StatusOr<TransportCredentials> no_files = TransportCredentials::FromFlags();
  absl::SetFlag(&FLAGS_transport_security, "plaintext");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("--transport_security=ssl"));
  EXPECT_THAT(no_files.status().message(), HasSubstr("--tls_cert is required with tls"));
  EXPECT_THAT(TransportCredentials::Tls({"/nonexistent.pem", "/x", "/y"}, false).status().message(),
              HasSubstr("--tls_cert=/nonexistent.pem: cannot read it"));
}

// Calls the health service at `port` through `credentials`.
grpc::Status Check(int port, const TransportCredentials& credentials) {
  auto health = grpc::health::v1::Health::NewStub(
      NewChannel(absl::StrCat("127.0.0.1:", port), credentials, 1 << 20));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse response;
  return health->Check(&context, {}, &response);
}

struct Running {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

Running Serve(const TransportCredentials& credentials) {
  Running running;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartGrpcServer("127.0.0.1:0", credentials, 1 << 20, {}, &running.port);
  EXPECT_TRUE(server.ok()) << server.status();
  if (server.ok()) running.server = *std::move(server);
  return running;
}

// A server and a channel made from the same credentials talk.
TEST(TransportCredentialsTest, AServerAndAChannelFromThemConnect) {
  const TransportCredentials credentials = TransportCredentials::Plaintext();
  Running running = Serve(credentials);
  const grpc::Status status = Check(running.port, credentials);
  EXPECT_TRUE(status.ok()) << status.error_message();
  running.server->Shutdown();
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = absl::StrCat(::testing::TempDir(), "/tls_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_ + "/ca1");
    std::filesystem::create_directories(dir_ + "/ca2");
    absl::StatusOr<TestCertificateAuthority> ca1 = TestCertificateAuthority::Create(dir_ + "/ca1");
    absl::StatusOr<TestCertificateAuthority> ca2 =
        TestCertificateAuthority::Create(dir_ + "/ca2", "another CA");
    ASSERT_TRUE(ca1.ok()) << ca1.status();
    ASSERT_TRUE(ca2.ok()) << ca2.status();
    server_ = *ca1->Issue("server");
    client_ = *ca1->Issue("client");
    other_ = *ca1->Issue("other");
    stranger_ = *ca2->Issue("stranger");
  }

  TransportCredentials Tls(const TlsFiles& files, bool require_client_cert) {
    return *TransportCredentials::Tls(files, require_client_cert, absl::Seconds(1));
  }

  std::string dir_;
  TlsFiles server_, client_, other_, stranger_;
};

TEST_F(TlsTest, MutualTlsAdmitsOnlyCertificatesOfTheCa) {
  const TransportCredentials server = Tls(server_, /*require_client_cert=*/true);
  EXPECT_EQ(server.name(), "mutual tls");
  Running running = Serve(server);
  const grpc::Status ok = Check(running.port, Tls(client_, false));
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  // Plaintext, and a certificate from another CA, do not get through.
  EXPECT_EQ(Check(running.port, TransportCredentials::Plaintext()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Check(running.port, Tls(stranger_, false)).error_code(), grpc::StatusCode::UNAVAILABLE);
  running.server->Shutdown();
}

TEST_F(TlsTest, TheClientChecksTheServersCertificate) {
  // A server whose certificate is from another CA is refused by the client.
  Running running = Serve(Tls(stranger_, false));
  EXPECT_EQ(Check(running.port, Tls(client_, false)).error_code(), grpc::StatusCode::UNAVAILABLE);
  running.server->Shutdown();
}

TEST_F(TlsTest, APolicyDecidesByCertificateIdentityBeforeAnyHandler) {
  const std::string policy = dir_ + "/policy.json";
  std::ofstream(policy) << R"({"roles": {"probe": ["client"]},
                              "methods": {"/grpc.health.v1.Health/Check": ["probe"]}})";
  absl::StatusOr<TransportCredentials> with_policy = Tls(server_, false).WithPolicy(policy);
  ASSERT_TRUE(with_policy.ok()) << with_policy.status();
  EXPECT_EQ(with_policy->name(), "tls, authorization policy");
  EXPECT_THAT(with_policy->AsFlags(), ::testing::Contains("--authz_policy=" + policy));
  std::vector<std::string> denied;
  absl::Mutex mu;
  Running running = Serve(with_policy->WithDeniedCallback([&](absl::string_view method) {
    absl::MutexLock lock(&mu);
    denied.emplace_back(method);
  }));
  const grpc::Status ok = Check(running.port, Tls(client_, false));
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  // Same CA, another identity: refused by name, counted.
  const grpc::Status refused = Check(running.port, Tls(other_, false));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(refused.error_message(),
            "permission denied: /grpc.health.v1.Health/Check for identity "
            "[other, localhost, 127.0.0.1] (allowed: probe)");
  {
    absl::MutexLock lock(&mu);
    EXPECT_THAT(denied, ::testing::ElementsAre("/grpc.health.v1.Health/Check"));
  }
  running.server->Shutdown();
  // A policy needs identities, so TLS.
  EXPECT_THAT(TransportCredentials::Plaintext().WithPolicy(policy).status().message(),
              HasSubstr("needs --transport_security=tls"));
}

TEST_F(TlsTest, RotatedCertificatesAreReadWithoutARestart) {
  // The server starts with a certificate clients of ca2 do not trust...
  const std::string cert = dir_ + "/live.pem", key = dir_ + "/live.key", ca = dir_ + "/live-ca.pem";
  std::filesystem::copy_file(server_.cert, cert);
  std::filesystem::copy_file(server_.key, key);
  std::filesystem::copy_file(server_.ca, ca);
  Running running = Serve(Tls({cert, key, ca}, false));
  const TransportCredentials trusts_ca2 = Tls({stranger_.cert, stranger_.key, stranger_.ca}, false);
  EXPECT_EQ(Check(running.port, trusts_ca2).error_code(), grpc::StatusCode::UNAVAILABLE);
  // ...then its files are replaced by one from ca2 (and ca2 as its root).
  std::filesystem::copy_file(stranger_.cert, cert,
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(stranger_.key, key, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(stranger_.ca, ca, std::filesystem::copy_options::overwrite_existing);
  // The watcher reads them within its refresh interval (1 s here).
  grpc::Status status;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  do {
    absl::SleepFor(absl::Milliseconds(200));
    status = Check(running.port, trusts_ca2);
  } while (!status.ok() && absl::Now() < deadline);
  EXPECT_TRUE(status.ok()) << status.error_message();
  running.server->Shutdown();
}

}  // namespace
}  // namespace moe
