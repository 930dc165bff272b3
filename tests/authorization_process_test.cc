// Authorization by certificate identity on a real cluster: every process
// serves mutual TLS with a policy (default deny), and each caller gets what
// its role allows: an inference client can Forward but not Step, and
// cannot reach the expert servers' step, weight or ring RPCs at all; a
// training identity can Step. Denials are PERMISSION_DENIED naming the
// method and the identity, counted per method, and the cluster keeps
// serving.
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "clients/cpp/moe_client.h"
#include "common/certificate_expiry.h"
#include "common/test_ca.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "common/transport_credentials.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/collective.grpc.pb.h"
#include "proto/expert.grpc.pb.h"
#include "proto/health.grpc.pb.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kPolicy[] = R"json({
  "roles": {
    "anyone": ["*"],
    "cluster": ["moe-node"],
    "inference": ["inference-client", "trainer"],
    "training": ["trainer"]
  },
  "methods": {
    "/grpc.health.v1.Health/*": ["anyone"],
    "/moe.v1.Router/Forward": ["inference"],
    "/moe.v1.Router/ForwardStream": ["inference"],
    "/moe.v1.Router/GetClusterState": ["inference"],
    "/moe.v1.Router/Backward": ["training"],
    "/moe.v1.Router/Step": ["training"],
    "/moe.v1.ExpertServer/*": ["cluster"],
    "/moe.v1.Collective/*": ["cluster"]
  }
})json";

// A local cluster of two DATA_PARALLEL servers working in `dir`.
local::LocalClusterOptions TwoServers(const std::string& dir) {
  local::LocalClusterOptions options;
  options.config = *ParseServingConfig(R"pb(
    model { d_model: 32 d_ff: 64 num_experts: 4 top_k: 2 seed: 5 }
    cluster {
      servers { name: "a" address: "127.0.0.1:1" }
      servers { name: "b" address: "127.0.0.1:2" }
      strategy: PLACEMENT_STRATEGY_DATA_PARALLEL
    }
  )pb");
  options.work_dir = dir;
  options.onednn_threads = 1;
  return options;
}

TEST(AuthorizationTest, EachIdentityGetsWhatItsRoleAllows) {
  const std::string dir = ::testing::TempDir();
  absl::StatusOr<TestCertificateAuthority> ca = TestCertificateAuthority::Create(dir);
  ASSERT_TRUE(ca.ok()) << ca.status();
  const std::string policy = dir + "/policy.json";
  std::ofstream(policy) << kPolicy;
  auto credentials = [&](const std::string& name) {
    return *TransportCredentials::Tls(*ca->Issue(name), /*require_client_cert=*/true);
  };
  local::LocalClusterOptions options = TwoServers(dir);
  options.credentials = *credentials("moe-node").WithPolicy(policy);
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const FloatTensor x = RandomTensor({16, 32}, 1);

  // An inference client: Forward, but not Step.
  const TransportCredentials inference = credentials("inference-client");
  auto client = client::MoeClient::Connect((*cluster)->router_address(), inference);
  ASSERT_TRUE(client->WaitUntilHealthy(absl::Seconds(30)).ok());
  ASSERT_TRUE(client->Forward(x).ok());
  const absl::Status step = client->Step(0.1f).status();
  EXPECT_EQ(step.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(step.message(),
            "permission denied: /moe.v1.Router/Step for identity "
            "[inference-client, localhost, 127.0.0.1] (allowed: training)");

  // Nor can it reach an expert server's state-changing RPCs or its ring.
  auto server = v1::ExpertServer::NewStub(
      NewChannel((*cluster)->config().cluster.servers[0].address, inference, 1 << 20));
  {
    grpc::ClientContext context;
    v1::ReleaseExpertRequest release;
    v1::ReleaseExpertResponse released;
    const grpc::Status status = server->ReleaseExpert(&context, release, &released);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(status.error_message(), HasSubstr("/moe.v1.ExpertServer/ReleaseExpert"));
  }
  {
    grpc::ClientContext context;
    v1::AbortStepRequest abort;
    abort.set_step(~uint64_t{0});
    v1::AbortStepResponse aborted;
    EXPECT_EQ(server->AbortStep(&context, abort, &aborted).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  {
    // Nor change the placement (which would pull and drop experts).
    grpc::ClientContext context;
    v1::PreparePlacementRequest prepare;
    prepare.set_from_epoch(1);
    prepare.set_epoch(2);
    v1::PreparePlacementResponse prepared;
    const grpc::Status status = server->PreparePlacement(&context, prepare, &prepared);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(status.error_message(), HasSubstr("/moe.v1.ExpertServer/PreparePlacement"));
  }
  {
    // Nor take the lease that decides automatic changes.
    grpc::ClientContext context;
    v1::AcquireLeaseRequest lease;
    lease.set_name("auto-rebalance");
    lease.set_holder("intruder");
    lease.set_ttl_ms(60000);
    v1::AcquireLeaseResponse leased;
    EXPECT_EQ(server->AcquireLease(&context, lease, &leased).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  {
    // Nor scale a step's update.
    grpc::ClientContext context;
    v1::UpdateStepRequest update;
    v1::UpdateStepResponse updated;
    const grpc::Status status = server->UpdateStep(&context, update, &updated);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(status.error_message(), HasSubstr("/moe.v1.ExpertServer/UpdateStep"));
  }
  {
    // Nor add to the gate's gradient, which every Step applies.
    grpc::ClientContext context;
    v1::AddGateGradientRequest gradient;
    v1::AddGateGradientResponse added;
    const grpc::Status status = server->AddGateGradient(&context, gradient, &added);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(status.error_message(), HasSubstr("/moe.v1.ExpertServer/AddGateGradient"));
  }
  {
    auto ring = v1::Collective::NewStub(
        NewChannel((*cluster)->config().cluster.servers[1].address, inference, 1 << 20));
    grpc::ClientContext context;
    auto stream = ring->Ring(&context);
    stream->WritesDone();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }

  // A training identity trains: the cluster's own calls (router to
  // servers, the servers' ring) pass the policy.
  auto trainer = client::MoeClient::Connect((*cluster)->router_address(), credentials("trainer"));
  absl::StatusOr<client::ForwardOutput> y = trainer->Forward(x, {/*training=*/true});
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(trainer->Backward(y->request_id, RandomTensor({16, 32}, 2)).ok());
  absl::StatusOr<client::StepOutput> stepped = trainer->Step(0.1f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_EQ(stepped->step, 1u);
  EXPECT_TRUE(client->Forward(x).ok());

  // Denials are counted per method.
  EXPECT_THAT(local::HttpGet((*cluster)->router_metrics_port(), "/metrics"),
              HasSubstr("moe_router_authz_denied_total{method=\"/moe.v1.Router/Step\"} 1"));
  const std::string expert_metrics =
      local::HttpGet((*cluster)->server_metrics_ports()[0], "/metrics");
  EXPECT_THAT(expert_metrics, HasSubstr("moe_expert_authz_denied_total{method=\"/moe.v1."
                                        "ExpertServer/ReleaseExpert\"} 1"));
  EXPECT_THAT(expert_metrics, HasSubstr("moe_expert_authz_denied_total{method=\"/moe.v1."
                                        "ExpertServer/AbortStep\"} 1"));
  EXPECT_THAT(expert_metrics, HasSubstr("moe_expert_authz_denied_total{method=\"/moe.v1."
                                        "ExpertServer/PreparePlacement\"} 1"));
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A Secret volume as the kubelet writes it: the files are symlinks through
// "..data", which is swapped atomically to a new directory on an update.
class SecretVolume {
 public:
  explicit SecretVolume(std::string dir) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
    for (const char* name : {"tls.crt", "tls.key", "ca.crt"}) {
      std::filesystem::create_symlink(std::string("..data/") + name, dir_ + "/" + name);
    }
  }
  void Write(const TlsFiles& files, const std::string& ca_bundle) {
    const std::string version = absl::StrCat("..v", ++versions_);
    std::filesystem::create_directories(dir_ + "/" + version);
    std::filesystem::copy_file(files.cert, dir_ + "/" + version + "/tls.crt");
    std::filesystem::copy_file(files.key, dir_ + "/" + version + "/tls.key");
    std::ofstream(dir_ + "/" + version + "/ca.crt") << ca_bundle;
    std::filesystem::create_symlink(version, dir_ + "/..data_tmp");
    std::filesystem::rename(dir_ + "/..data_tmp", dir_ + "/..data");
  }
  TlsFiles files() const { return {dir_ + "/tls.crt", dir_ + "/tls.key", dir_ + "/ca.crt"}; }

 private:
  const std::string dir_;
  int versions_ = 0;
};

// A CA rotation under load, as cert-manager and the kubelet do it: the
// processes trust both CAs, their certificates are swapped from the old
// CA's to the new one's while clients keep calling. No call fails, and a
// client that trusts only the new CA then reaches the router.
TEST(AuthorizationTest, CertificatesRotateUnderLoadWithoutAFailedRequest) {
  const std::string dir = ::testing::TempDir() + "/rotation";
  std::filesystem::create_directories(dir + "/old");
  std::filesystem::create_directories(dir + "/new");
  absl::StatusOr<TestCertificateAuthority> old_ca =
      TestCertificateAuthority::Create(dir + "/old", "old CA");
  absl::StatusOr<TestCertificateAuthority> new_ca =
      TestCertificateAuthority::Create(dir + "/new", "new CA");
  ASSERT_TRUE(old_ca.ok() && new_ca.ok());
  const std::string bundle = ReadFile(old_ca->ca_path()) + ReadFile(new_ca->ca_path());
  std::ofstream(dir + "/bundle.pem") << bundle;
  SecretVolume secret(dir + "/secret");
  secret.Write(*old_ca->Issue("moe-node"), bundle);

  local::LocalClusterOptions options = TwoServers(dir);
  options.credentials = *TransportCredentials::Tls(secret.files(), /*require_client_cert=*/true,
                                                   absl::Seconds(1));
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();

  TlsFiles client_files = *old_ca->Issue("client");
  client_files.ca = dir + "/bundle.pem";
  const TransportCredentials client_credentials = *TransportCredentials::Tls(client_files, true);
  const FloatTensor x = RandomTensor({8, 32}, 3);
  const client::ForwardOutput expected = *[&] {
    auto client = client::MoeClient::Connect((*cluster)->router_address(), client_credentials);
    EXPECT_TRUE(client->WaitUntilHealthy(absl::Seconds(30)).ok());
    return client->Forward(x);
  }();

  // Load: two clients on their connections, one that connects anew for
  // every call (a new handshake each time).
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::string first_failure;
  absl::Mutex failure_mu;
  std::vector<std::thread> load;
  for (int c = 0; c < 3; ++c) {
    load.emplace_back([&, c] {
      auto client = client::MoeClient::Connect((*cluster)->router_address(), client_credentials);
      while (!stop.load()) {
        if (c == 2) {
          client = client::MoeClient::Connect((*cluster)->router_address(), client_credentials);
        }
        absl::StatusOr<client::ForwardOutput> y = client->Forward(x);
        if (y.ok() && TensorNear(y->y, expected.y, 1e-6)) {
          ok.fetch_add(1);
          continue;
        }
        failed.fetch_add(1);
        absl::MutexLock lock(&failure_mu);
        if (first_failure.empty()) first_failure = y.status().ToString();
      }
    });
  }
  auto wait_for_calls = [&](int calls) {
    const int target = ok.load() + calls;
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (ok.load() < target && failed.load() == 0 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
  };
  wait_for_calls(50);
  secret.Write(*new_ca->Issue("moe-node"), bundle);
  // Every process re-reads its files within the refresh interval (1 s); a
  // client of the new CA alone gets through once the router presents the
  // new certificate.
  TlsFiles new_client = *new_ca->Issue("client");
  const TransportCredentials trusts_new_ca_only = *TransportCredentials::Tls(new_client, true);
  absl::Status reached;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    auto client = client::MoeClient::Connect((*cluster)->router_address(), trusts_new_ca_only);
    reached = client->Forward(x).status();
  } while (!reached.ok() && absl::Now() < deadline);
  EXPECT_TRUE(reached.ok()) << reached;
  // The servers too: new connections to them (a restarted router would
  // open them) need the new certificates; calls through the router still
  // work throughout.
  wait_for_calls(50);
  stop.store(true);
  for (auto& t : load) t.join();
  EXPECT_EQ(failed.load(), 0) << first_failure;
  EXPECT_GE(ok.load(), 100);
  std::cout << ok.load() << " Forwards, " << failed.load() << " failed, across the rotation\n";
}

grpc::health::v1::HealthCheckResponse::ServingStatus CheckHealth(
    int port, const TransportCredentials& credentials, const std::string& service,
    grpc::Status* status) {
  auto health = grpc::health::v1::Health::NewStub(
      NewChannel(absl::StrCat("127.0.0.1:", port), credentials, 1 << 20));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  *status = health->Check(&context, request, &response);
  return response.status();
}

// The kubelet's probes present no certificate: a server whose gRPC port
// requires mutual TLS answers them on its plaintext health port, which
// serves nothing else; its /metrics tells when its certificates expire.
TEST(AuthorizationTest, ProbesUseThePlaintextHealthPortAndMetricsShowCertificateExpiry) {
  const std::string dir = ::testing::TempDir() + "/health";
  std::filesystem::create_directories(dir);
  absl::StatusOr<TestCertificateAuthority> ca = TestCertificateAuthority::Create(dir);
  ASSERT_TRUE(ca.ok()) << ca.status();
  absl::StatusOr<TlsFiles> files = ca->Issue("moe-node");
  ASSERT_TRUE(files.ok()) << files.status();
  const std::string config = dir + "/serving.pbtxt";
  std::ofstream(config) << R"pb(
    model { d_model: 16 d_ff: 32 num_experts: 2 top_k: 1 seed: 5 }
    cluster {
      servers { name: "a" address: "127.0.0.1:1" }
      strategy: PLACEMENT_STRATEGY_DATA_PARALLEL
    }
  )pb";
  local::ChildProcess server(
      local::RunfilePath("expert_service/expert_server"),
      {"--config=" + config, "--name=a", "--host=127.0.0.1", "--port=0", "--metrics_port=0",
       "--metrics_host=127.0.0.1", "--health_port=0", "--transport_security=tls",
       "--tls_cert=" + files->cert, "--tls_key=" + files->key, "--tls_ca=" + files->ca,
       "--require_client_cert"});
  const std::optional<std::string> line =
      server.WaitForLine("serving gRPC on port", absl::Seconds(60));
  ASSERT_TRUE(line.has_value()) << server.output();
  EXPECT_THAT(*line, HasSubstr("(mutual tls)"));
  const int port = local::NumberAfter(*line, "serving gRPC on port ");
  const int health_port = local::NumberAfter(*line, "plaintext health on port ");
  const int metrics_port = local::NumberAfter(*line, "/metrics on port ");
  ASSERT_GT(health_port, 0) << *line;

  const TransportCredentials plaintext = TransportCredentials::Plaintext();
  grpc::Status status;
  EXPECT_EQ(CheckHealth(health_port, plaintext, "", &status),
            grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(CheckHealth(health_port, plaintext, "moe.ready", &status),
            grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_TRUE(status.ok()) << status.error_message();
  // The gRPC port itself refuses a plaintext caller.
  CheckHealth(port, plaintext, "", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  // Nothing but health on the plaintext port.
  {
    auto stub = v1::ExpertServer::NewStub(
        NewChannel(absl::StrCat("127.0.0.1:", health_port), plaintext, 1 << 20));
    grpc::ClientContext context;
    v1::ReleaseExpertResponse response;
    EXPECT_EQ(stub->ReleaseExpert(&context, {}, &response).error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }

  const absl::Time not_after = *CertificateNotAfter(files->cert);
  EXPECT_THAT(
      local::HttpGet(metrics_port, "/metrics"),
      HasSubstr(absl::StrCat("moe_tls_certificate_expiry_timestamp_seconds{certificate=\"own\"} ",
                             absl::ToInt64Seconds(not_after - absl::UnixEpoch()))));
  EXPECT_EQ(server.Stop(SIGTERM, absl::Seconds(30)), 0);
}

}  // namespace
}  // namespace moe::testing
