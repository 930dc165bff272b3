// Placement changes on a real cluster while it serves: Rebalance adds a
// replica, moves an expert and removes a replica under load from 4 clients,
// every output checked against the reference (0 failed requests); a second
// router keeps serving through a change made by the first, and a router
// started after it serves the new placement (and a client spreads its
// calls over both routers), as does a server restarted
// after it; a change refused because an expert leaving a server holds
// training state moves nothing; 10 training steps with a change between
// steps 5 and 6 equal the reference.
#include <algorithm>
#include <atomic>
#include <iostream>
#include <map>
#include <set>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/strings/str_cat.h"
#include "clients/cpp/moe_client.h"
#include "common/deterministic_init.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "common/transport_credentials.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr int kDModel = 32;

// servers_of[expert], by server index (names e0, e1, ...).
v1::RebalanceRequest MoveTo(const std::vector<std::vector<int>>& servers_of) {
  v1::RebalanceRequest request;
  for (size_t e = 0; e < servers_of.size(); ++e) {
    v1::ExpertAssignment* expert = request.mutable_placement()->add_experts();
    expert->set_expert_id(static_cast<int>(e));
    for (int s : servers_of[e]) expert->add_servers(absl::StrCat("e", s));
  }
  return request;
}

grpc::Status Rebalance(v1::Router::Stub& stub, const v1::RebalanceRequest& request,
                       v1::RebalanceResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  return stub.Rebalance(&context, request, response);
}

// Expert ids server `s` hosts, and its placement epoch.
std::pair<std::set<int>, uint64_t> Hosted(ProcessCluster& cluster, int s) {
  v1::InfoResponse info;
  const grpc::Status status = cluster.Info(s, &info);
  EXPECT_TRUE(status.ok()) << status.error_message();
  std::set<int> experts;
  for (const v1::ExpertDigest& d : info.experts()) experts.insert(d.expert_id());
  return {experts, info.placement_epoch()};
}

uint64_t RouterEpoch(v1::Router::Stub& stub) {
  v1::ClusterState state;
  grpc::ClientContext context;
  EXPECT_TRUE(stub.GetClusterState(&context, {}, &state).ok());
  return state.placement_epoch();
}

// Clients sending Forwards through `stubs` (round robin over threads) until
// stopped, checking every output against the reference.
class Load {
 public:
  Load(std::vector<v1::Router::Stub*> stubs, const ReferenceMoe& reference, int clients)
      : reference_(reference) {
    for (int c = 0; c < clients; ++c) {
      threads_.emplace_back([this, c, stub = stubs[c % stubs.size()]] { Run(c, *stub); });
    }
  }
  ~Load() { Stop(); }

  void Stop() {
    stop_.store(true);
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  // Blocks until `calls` more have succeeded (or one failed).
  void WaitFor(int calls) {
    const int target = ok_.load() + calls;
    while (ok_.load() < target && failed_.load() == 0) absl::SleepFor(absl::Milliseconds(5));
  }
  int ok() const { return ok_.load(); }
  int failed() const { return failed_.load(); }
  double longest_ms() const { return longest_ms_.load(); }
  std::string first_error() {
    absl::MutexLock lock(&mu_);
    return first_error_;
  }

 private:
  void Run(int c, v1::Router::Stub& stub) {
    for (int i = 0; !stop_.load(); ++i) {
      const FloatTensor x = RandomTensor({16, kDModel}, 1000 * c + i % 40);
      v1::ForwardRequest request;
      EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
      v1::ForwardResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
      const absl::Time start = absl::Now();
      const grpc::Status status = stub.Forward(&context, request, &response);
      const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
      double longest = longest_ms_.load();
      while (ms > longest && !longest_ms_.compare_exchange_weak(longest, ms)) {
      }
      if (status.ok() &&
          TensorNear(Decoded(response.y(), kDModel), reference_.Forward(x)->y, 1e-5)) {
        ok_.fetch_add(1);
        continue;
      }
      failed_.fetch_add(1);
      absl::MutexLock lock(&mu_);
      if (first_error_.empty()) {
        first_error_ = status.ok() ? "output differs from the reference" : status.error_message();
      }
    }
  }

  const ReferenceMoe& reference_;
  std::atomic<bool> stop_{false};
  std::atomic<int> ok_{0}, failed_{0};
  std::atomic<double> longest_ms_{0};
  absl::Mutex mu_;
  std::string first_error_;
  std::vector<std::thread> threads_;
};

ProcessClusterOptions FourExpertsOnTwoServers() {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel, " d_ff: 64 num_experts: 4 top_k: 2 seed: 11");
  options.strategy = "MODEL_PARALLEL";  // e0: {0, 1}, e1: {2, 3}
  return options;
}

TEST(MigrationTest, AddMoveAndRemoveUnderLoadFailNoRequest) {
  ProcessCluster cluster(FourExpertsOnTwoServers());
  const ReferenceMoe reference = cluster.Reference();
  Load load({&cluster.stub()}, reference, 4);
  load.WaitFor(100);

  struct Change {
    const char* what;
    std::vector<std::vector<int>> servers_of;
    std::set<int> on_e0, on_e1;
    int added, removed;
  };
  const std::vector<Change> changes = {
      {"a replica of expert 0 on e1", {{0, 1}, {0}, {1}, {1}}, {0, 1}, {0, 2, 3}, 1, 0},
      {"expert 1 moves from e0 to e1", {{0, 1}, {1}, {1}, {1}}, {0}, {0, 1, 2, 3}, 1, 1},
      {"the replica of expert 0 on e0 goes", {{1}, {1}, {1}, {1}}, {}, {0, 1, 2, 3}, 0, 1},
      {"back to the start", {{0}, {0}, {1}, {1}}, {0, 1}, {2, 3}, 2, 2},
  };
  uint64_t epoch = 1;
  for (const Change& change : changes) {
    SCOPED_TRACE(change.what);
    v1::RebalanceResponse response;
    const grpc::Status status = Rebalance(cluster.stub(), MoveTo(change.servers_of), &response);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    ++epoch;
    EXPECT_EQ(response.placement_epoch(), epoch);
    EXPECT_EQ(response.experts_moved(), change.added);
    EXPECT_EQ(response.replicas_removed(), change.removed);
    EXPECT_EQ(response.bytes_moved(),
              change.added * int64_t{(2 * kDModel * 64 + kDModel + 64) * 4});
    EXPECT_EQ(Hosted(cluster, 0), std::make_pair(change.on_e0, epoch));
    EXPECT_EQ(Hosted(cluster, 1), std::make_pair(change.on_e1, epoch));
    EXPECT_EQ(RouterEpoch(cluster.stub()), epoch);
    std::cout << change.what << ": pulls " << response.pull_seconds() * 1e3 << " ms, drain "
              << response.drain_seconds() * 1e3 << " ms, in all " << response.seconds() * 1e3
              << " ms\n";
    load.WaitFor(100);
  }
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_error() << "\n" << cluster.RouterLog();
  std::cout << load.ok() << " Forwards through 4 placement changes, longest " << load.longest_ms()
            << " ms\n";
  const std::string metrics = local::HttpGet(cluster.router_metrics_port(), "/metrics");
  for (const char* line :
       {"moe_router_rebalances_total{outcome=\"committed\"} 4", "moe_router_placement_epoch 5",
        "moe_router_migration_seconds_count 4", "moe_router_migration_bytes_total 67072"}) {
    EXPECT_TRUE(metrics.find(line) != std::string::npos) << line;
  }
}

TEST(MigrationTest, AnotherRouterLearnsTheNewPlacementFromTheServers) {
  ProcessCluster cluster(FourExpertsOnTwoServers());
  const ReferenceMoe reference = cluster.Reference();
  ProcessCluster::OtherRouter other = cluster.StartAnotherRouter();
  Load load({&cluster.stub(), other.stub.get()}, reference, 4);
  load.WaitFor(100);
  // Expert 1 moves to e1 and expert 2 to e0: the other router's epoch-1
  // calls meet servers that no longer serve epoch 1.
  v1::RebalanceResponse response;
  const grpc::Status status = Rebalance(cluster.stub(), MoveTo({{0}, {1}, {0}, {1}}), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  load.WaitFor(200);
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_error() << "\n" << other.process->output();
  EXPECT_EQ(RouterEpoch(*other.stub), 2u);
  // A router that starts now serves the servers' placement, not the
  // config's.
  ProcessCluster::OtherRouter late = cluster.StartAnotherRouter();
  EXPECT_EQ(RouterEpoch(*late.stub), 2u);
  for (int i = 0; i < 10; ++i) {
    const FloatTensor x = RandomTensor({16, kDModel}, 50 + i);
    v1::ForwardRequest request;
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
    v1::ForwardResponse y;
    grpc::ClientContext context;
    ASSERT_TRUE(late.stub->Forward(&context, request, &y).ok());
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Forward(x)->y, 1e-5));
  }
}

// HTTP/2 keeps a connection to one router; MoeClient spreads its calls
// over every router its target resolves to (round robin), as over a
// headless Service's pods.
TEST(MigrationTest, AClientSpreadsItsCallsOverEveryRouter) {
  ProcessCluster cluster(FourExpertsOnTwoServers());
  ProcessCluster::OtherRouter other = cluster.StartAnotherRouter();
  auto client = client::MoeClient::Connect(
      absl::StrCat("ipv4:", cluster.router_address(), ",", other.address),
      TransportCredentials::Plaintext());
  ASSERT_TRUE(client->WaitUntilHealthy(absl::Seconds(30)).ok());
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(client->Forward(RandomTensor({4, kDModel}, i)).ok());
  }
  auto forwards = [](int metrics_port) {
    const std::string metrics = local::HttpGet(metrics_port, "/metrics");
    const std::string key = "moe_router_requests_total{code=\"OK\",method=\"Forward\"} ";
    const size_t at = metrics.find(key);
    return at == std::string::npos ? 0.0 : std::stod(metrics.substr(at + key.size()));
  };
  const double first = forwards(cluster.router_metrics_port());
  const double second = forwards(other.metrics_port);
  EXPECT_EQ(first + second, 20);
  EXPECT_GE(first, 5);
  EXPECT_GE(second, 5);
}

TEST(MigrationTest, AServerRestartedAfterAChangeAdoptsItFromItsPeers) {
  ProcessCluster cluster(FourExpertsOnTwoServers());
  const ReferenceMoe reference = cluster.Reference();
  v1::RebalanceResponse response;
  grpc::Status status = Rebalance(cluster.stub(), MoveTo({{0, 1}, {1}, {0}, {1}}), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  cluster.KillServer(0);
  cluster.StartServer(0);
  // Back with epoch 2's experts, not the config's.
  EXPECT_EQ(Hosted(cluster, 0), std::make_pair(std::set<int>{0, 2}, uint64_t{2}));
  EXPECT_THAT(cluster.ServerLog(0), HasSubstr("adopting placement epoch 2 from server e1"));
  // Expert 2 has no other replica: once the router has reconnected to e0,
  // it is served again.
  const absl::Time patience = absl::Now() + absl::Seconds(20);
  for (v1::ForwardResponse y;
       !cluster.Forward(RandomTensor({16, kDModel}, 69), &y).ok() && absl::Now() < patience;) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  for (int i = 0; i < 20; ++i) {
    const FloatTensor x = RandomTensor({16, kDModel}, 70 + i);
    v1::ForwardResponse y;
    status = cluster.Forward(x, &y);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Forward(x)->y, 1e-5));
  }
  // And the next change finds it at the cluster's epoch.
  status = Rebalance(cluster.stub(), MoveTo({{0}, {0}, {1}, {1}}), &response);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(response.placement_epoch(), 3u);
  EXPECT_EQ(Hosted(cluster, 0), std::make_pair(std::set<int>{0, 1}, uint64_t{3}));
  EXPECT_EQ(Hosted(cluster, 1), std::make_pair(std::set<int>{2, 3}, uint64_t{3}));
}

// Clients whose tokens all go to two experts of one server: the servers'
// counters show it with all the load; with --auto_rebalance on two
// routers, the one holding the lease moves the cluster (a hot expert
// replicated onto the other server) while serving, once.
TEST(MigrationTest, AutomaticRebalanceFollowsTheTrafficWithOneRouterDeciding) {
  ProcessClusterOptions options = FourExpertsOnTwoServers();
  options.router_flags = {"--auto_rebalance", "--auto_rebalance_interval=200ms",
                          "--auto_rebalance_window=2s", "--auto_rebalance_threshold=1.3",
                          "--auto_rebalance_cooldown=1h"};
  ProcessCluster cluster(options);
  ProcessCluster::OtherRouter other = cluster.StartAnotherRouter();
  const ReferenceMoe reference = cluster.Reference();
  // Tokens the gate sends to two experts of one server (0 and 1 on e0, or
  // 2 and 3 on e1): whichever server such tokens favour takes all the load.
  std::vector<FloatTensor> hot_on[2];
  for (int seed = 0; seed < 4000; ++seed) {
    const FloatTensor x = RandomTensor({1, kDModel}, 5000 + seed);
    const std::vector<int> ids = reference.Forward(x)->routing.expert_ids;
    if (ids[0] / 2 == ids[1] / 2) hot_on[ids[0] / 2].push_back(x);
  }
  const int hot_server = hot_on[0].size() >= hot_on[1].size() ? 0 : 1;
  const std::vector<FloatTensor>& hot = hot_on[hot_server];
  ASSERT_GE(hot.size(), 20u) << hot_on[0].size() << " " << hot_on[1].size();
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c, stub = c % 2 == 0 ? &cluster.stub() : other.stub.get()] {
      for (int i = 0; !stop.load(); ++i) {
        FloatTensor x({8, kDModel});
        for (int r = 0; r < 8; ++r) {
          absl::c_copy(hot[(8 * i + r + c) % hot.size()].row(0), x.mutable_row(r).begin());
        }
        v1::ForwardRequest request;
        EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
        v1::ForwardResponse y;
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
        const bool good = stub->Forward(&context, request, &y).ok() &&
                          TensorNear(Decoded(y.y(), kDModel), reference.Forward(x)->y, 1e-5);
        (good ? ok : failed).fetch_add(1);
      }
    });
  }
  const absl::Time patience = absl::Now() + absl::Seconds(60);
  while (Hosted(cluster, 0).second < 2 && absl::Now() < patience && failed.load() == 0) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  // Some more traffic on the new placement, then stop.
  const int served = ok.load();
  while (ok.load() < served + 100 && failed.load() == 0) absl::SleepFor(absl::Milliseconds(10));
  stop.store(true);
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  // A hot expert gained a replica on the other server.
  const auto [on_cold, epoch] = Hosted(cluster, 1 - hot_server);
  ASSERT_EQ(epoch, 2u) << cluster.RouterLog() << "\n--- other router\n" << other.process->output();
  EXPECT_TRUE(on_cold.count(2 * hot_server) == 1 || on_cold.count(2 * hot_server + 1) == 1);
  // One router decided; the other watched.
  const std::string logs[] = {cluster.RouterLog(), other.process->output()};
  int changed = 0, watched = 0;
  for (const std::string& log : logs) {
    changed += log.find("automatic rebalance: changed") != std::string::npos;
    watched += log.find("automatic rebalance: another router decides") != std::string::npos;
  }
  EXPECT_EQ(changed, 1);
  EXPECT_GE(watched, 1);
  EXPECT_EQ(RouterEpoch(cluster.stub()), 2u);
  EXPECT_EQ(RouterEpoch(*other.stub), 2u);
}

// The server that pulls new replicas is killed mid-pull: the change aborts
// everywhere, no expert loses a replica, no request fails, and once the
// server is back a change goes through.
TEST(MigrationTest, AServerKilledMidMigrationAbortsTheChangeAndNothingIsLost) {
  ProcessClusterOptions options;
  options.model = "d_model: 256 d_ff: 1024 num_experts: 4 top_k: 2 seed: 13";
  options.strategy = "EXPLICIT";
  options.num_servers = 3;
  // Every expert on e0 and e1; e2 holds nothing yet.
  options.cluster_extra = "  explicit_placement {\n";
  for (int e = 0; e < 4; ++e) {
    absl::StrAppend(&options.cluster_extra, "    experts { expert_id: ", e,
                    " servers: \"e0\" servers: \"e1\" }\n");
  }
  absl::StrAppend(&options.cluster_extra, "  }\n");
  // About 2 s per expert pulled: the kill lands mid-pull.
  options.router_flags = {"--migration_bytes_per_second=1000000"};
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; !stop.load(); ++i) {
        const FloatTensor x = RandomTensor({8, 256}, 100 * c + i % 20);
        v1::ForwardResponse y;
        const bool good = cluster.Forward(x, &y).ok() &&
                          TensorNear(Decoded(y.y(), 256), reference.Forward(x)->y, 1e-5);
        (good ? ok : failed).fetch_add(1);
      }
    });
  }
  const v1::RebalanceRequest everywhere = MoveTo({{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2}});
  grpc::Status status;
  std::thread change([&] {
    v1::RebalanceResponse response;
    status = Rebalance(cluster.stub(), everywhere, &response);
  });
  ASSERT_TRUE(cluster.WaitForServerLine(2, "preparing placement epoch 2", absl::Seconds(30)))
      << cluster.ServerLog(2);
  cluster.KillServer(2);
  change.join();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.error_message(), HasSubstr("placement epoch 2 aborted, no replica moved"));
  EXPECT_THAT(status.error_message(), HasSubstr("e2"));
  // Every expert is where it was, at epoch 1.
  EXPECT_EQ(Hosted(cluster, 0), std::make_pair(std::set<int>{0, 1, 2, 3}, uint64_t{1}));
  EXPECT_EQ(Hosted(cluster, 1), std::make_pair(std::set<int>{0, 1, 2, 3}, uint64_t{1}));
  EXPECT_EQ(RouterEpoch(cluster.stub()), 1u);
  const int served = ok.load();
  while (ok.load() < served + 20 && failed.load() == 0) absl::SleepFor(absl::Milliseconds(10));
  stop.store(true);
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);

  // Once it is back, a change goes through.
  cluster.StartServer(2);
  v1::RebalanceResponse response;
  status = Rebalance(cluster.stub(), MoveTo({{0, 1, 2}, {0, 1}, {0, 1}, {0, 1}}), &response);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(Hosted(cluster, 2), std::make_pair(std::set<int>{0}, uint64_t{2}));
}

// A server to be removed is drained first: Rebalance with `drain` leaves
// it empty while serving, then it stops and nothing notices.
TEST(MigrationTest, ADrainedServerStopsWithoutAFailedRequest) {
  ProcessClusterOptions options = FourExpertsOnTwoServers();
  options.num_servers = 3;  // e0 {0, 1}, e1 {2}, e2 {3}
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  Load load({&cluster.stub()}, reference, 2);
  load.WaitFor(50);
  v1::RebalanceRequest drain;
  drain.add_drain("e2");
  v1::RebalanceResponse response;
  const grpc::Status status = Rebalance(cluster.stub(), drain, &response);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(Hosted(cluster, 2), std::make_pair(std::set<int>{}, uint64_t{2}));
  load.WaitFor(50);
  cluster.KillServer(2);
  load.WaitFor(100);
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_error();
}

// The config lists e2 as a spare server: it hosts nothing and is not
// running at first (a StatefulSet scaled below the list). Steps and placement changes go on
// without it; started later, it adopts the cluster's placement epoch and
// step from its peers, gets an expert through a Rebalance and serves it;
// drained and stopped, it is left out again. No restart of anything else,
// and every output under load equals the reference.
TEST(MigrationTest, AServerJoinsAndLeavesWithoutARestart) {
  ProcessClusterOptions options = FourExpertsOnTwoServers();
  options.num_servers = 3;
  options.cluster_extra = "spare_servers: 1";  // e0 {0, 1}, e1 {2, 3}, e2 {}
  options.not_started = {2};
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  Load load({&cluster.stub()}, reference, 2);
  load.WaitFor(30);
  // A step with no Backward since the last changes no weight (the load's
  // reference holds) but moves the cluster to step 1.
  auto step = [&](const std::vector<std::string>& left_out) {
    v1::StepResponse response;
    const grpc::Status status = cluster.Step(0.1f, absl::Seconds(30), &response);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    EXPECT_EQ(std::vector<std::string>(response.servers_left_out().begin(),
                                       response.servers_left_out().end()),
              left_out);
  };
  step({"e2"});
  auto rebalance = [&](const v1::RebalanceRequest& request, uint64_t epoch) {
    v1::RebalanceResponse response;
    const grpc::Status status = Rebalance(cluster.stub(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    EXPECT_EQ(response.placement_epoch(), epoch);
  };
  // Expert 0 replicated onto e1, e2 left out.
  rebalance(MoveTo({{0, 1}, {0}, {1}, {1}}), 2);
  load.WaitFor(30);

  cluster.StartServer(2);  // scaled up
  EXPECT_EQ(Hosted(cluster, 2), std::make_pair(std::set<int>{}, uint64_t{2}));
  v1::InfoResponse info;
  ASSERT_TRUE(cluster.Info(2, &info).ok());
  EXPECT_EQ(info.step(), 1u);
  // Expert 3 moves to e2, which pulls it and serves it.
  rebalance(MoveTo({{0, 1}, {0}, {1}, {2}}), 3);
  EXPECT_EQ(Hosted(cluster, 2), std::make_pair(std::set<int>{3}, uint64_t{3}));
  const int served_before = load.ok();
  load.WaitFor(50);
  EXPECT_GT(load.ok(), served_before);
  step({});

  // Scaled down: drained first, then stopped.
  v1::RebalanceRequest drain;
  drain.add_drain("e2");
  rebalance(drain, 4);
  EXPECT_EQ(Hosted(cluster, 2).first, std::set<int>{});
  cluster.KillServer(2);
  load.WaitFor(30);
  step({"e2"});
  rebalance(MoveTo({{0}, {0}, {1}, {1}}), 5);
  load.WaitFor(30);
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_error() << "\n" << cluster.RouterLog();
}

// With the automatic mode, a spare server that starts gets experts by
// itself: it counts as a server with room and no load (before it ran, it
// did not count), so the cluster is out of balance until it serves.
TEST(MigrationTest, TheAutomaticModeGivesAStartedSpareServerExperts) {
  ProcessClusterOptions options = FourExpertsOnTwoServers();
  options.num_servers = 3;
  options.cluster_extra = "spare_servers: 1";  // e0 {0, 1}, e1 {2, 3}, e2 {}
  options.not_started = {2};
  options.router_flags = {"--auto_rebalance", "--auto_rebalance_interval=200ms",
                          "--auto_rebalance_window=2s", "--auto_rebalance_threshold=1.3",
                          "--auto_rebalance_cooldown=1s"};
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  Load load({&cluster.stub()}, reference, 2);
  // A whole window without e2: the automatic mode reads the load of the
  // others and does not count e2 (its looks never fail on it).
  absl::SleepFor(absl::Seconds(2.5));
  const std::string before = cluster.RouterLog();
  EXPECT_EQ(before.find("reading the servers' load"), std::string::npos) << before;
  EXPECT_EQ(before.find("unreachable"), std::string::npos) << before;
  cluster.StartServer(2);
  const absl::Time patience = absl::Now() + absl::Seconds(60);
  // Hosting something at epoch 2 or later (while it pulls, it reports the
  // epoch it started from).
  auto joined = [&] {
    const auto [hosted, epoch] = Hosted(cluster, 2);
    return !hosted.empty() && epoch >= 2;
  };
  while (!joined() && absl::Now() < patience && load.failed() == 0) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  const auto [hosted, epoch] = Hosted(cluster, 2);
  EXPECT_FALSE(hosted.empty()) << cluster.RouterLog();
  EXPECT_GE(epoch, 2u);
  load.WaitFor(50);
  load.Stop();
  EXPECT_EQ(load.failed(), 0) << load.first_error() << "\n" << cluster.RouterLog();
}

TEST(MigrationTest, TrainingWithAChangeBetweenStepsEqualsTheReference) {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel,
                               " d_ff: 64 num_experts: 4 top_k: 2 seed: 12 optimizer { type: "
                               "OPTIMIZER_TYPE_SGD_MOMENTUM momentum: 0.9 }");
  options.strategy = "HYBRID";  // e0: {0, 1, 2}, e1: {0, 1, 3}
  ProcessCluster cluster(options);
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  constexpr float kLr = 0.01f;
  for (int step = 1; step <= 10; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    const FloatTensor x = RandomTensor({64, kDModel}, 100 + step);
    const FloatTensor dy = RandomTensor({64, kDModel}, 200 + step);
    const ReferenceTraining::Step expected = reference.Train(x, dy, kLr);
    v1::ForwardResponse y;
    ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
    ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5));
    if (step == 6) {
      // A forward waits for its Backward: the experts leaving e1 would
      // lose its state, so the change is refused and moves nothing.
      v1::RebalanceResponse response;
      const grpc::Status refused =
          Rebalance(cluster.stub(), MoveTo({{0}, {0}, {0}, {0}}), &response);
      EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
      EXPECT_THAT(refused.error_message(), HasSubstr("Step first"));
      EXPECT_EQ(Hosted(cluster, 0), std::make_pair(std::set<int>{1, 2, 3}, uint64_t{2}));
      EXPECT_EQ(Hosted(cluster, 1), std::make_pair(std::set<int>{0, 1, 2, 3}, uint64_t{2}));
    }
    v1::BackwardResponse dx;
    ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
    v1::StepResponse stepped;
    const grpc::Status status = cluster.Step(kLr, absl::Seconds(30), &stepped);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    if (step == 5) {
      // Between steps 5 and 6: expert 0 leaves e0, expert 2 joins e1 (with
      // its momentum), expert 3 joins e0; the rings follow.
      v1::RebalanceResponse response;
      const grpc::Status changed =
          Rebalance(cluster.stub(), MoveTo({{1}, {0, 1}, {0, 1}, {0, 1}}), &response);
      ASSERT_TRUE(changed.ok()) << changed.error_message() << "\n" << cluster.RouterLog();
      EXPECT_EQ(response.placement_epoch(), 2u);
      EXPECT_EQ(Hosted(cluster, 0), std::make_pair(std::set<int>{1, 2, 3}, uint64_t{2}));
      EXPECT_EQ(Hosted(cluster, 1), std::make_pair(std::set<int>{0, 1, 2, 3}, uint64_t{2}));
    }
  }
  // Every replica equals the reference, and replicas of one expert are
  // bit-identical.
  std::map<int, uint64_t> digests;
  for (int s = 0; s < 2; ++s) {
    v1::InfoResponse info;
    ASSERT_TRUE(cluster.Info(s, &info).ok());
    for (const v1::ExpertDigest& d : info.experts()) {
      EXPECT_EQ(d.step(), 10u);
      auto [it, first] = digests.emplace(d.expert_id(), d.weights_digest());
      EXPECT_EQ(it->second, d.weights_digest()) << "expert " << d.expert_id();
    }
  }
  const FloatTensor x = RandomTensor({64, kDModel}, 999);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y).ok());
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.y, 1e-5));
}

}  // namespace
}  // namespace moe::testing
