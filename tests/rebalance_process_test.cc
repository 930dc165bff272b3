// Placement on a real cluster: Rebalance with dry_run plans from the load
// the router measured (the placement, what it would copy, the imbalance and
// servers per token before and after) and changes nothing; without it the
// plan is carried out (migration_process_test.cc has the moves under load);
// a replica that releases an expert costs no request; a stopped replica
// costs none either.
#include <algorithm>
#include <atomic>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/reference_moe.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

TEST(RebalanceTest, ADryRunPlansFromTheMeasuredLoadAndMovesNothing) {
  ProcessClusterOptions options;
  options.model = "d_model: 32 d_ff: 64 num_experts: 8 top_k: 2 seed: 4";
  options.strategy = "MODEL_PARALLEL";
  ProcessCluster cluster(options);
  auto rebalance = [&](bool dry_run, v1::RebalanceResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::RebalanceRequest request;
    request.set_dry_run(dry_run);
    return cluster.stub().Rebalance(&context, request, response);
  };
  v1::RebalanceResponse plan;
  grpc::Status status = rebalance(true, &plan);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("no load to balance"));

  for (int i = 0; i < 20; ++i) {
    v1::ForwardResponse response;
    ASSERT_TRUE(cluster.Forward(RandomTensor({64, 32}, i), &response).ok());
  }
  status = rebalance(true, &plan);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(plan.placement_epoch(), 1u);
  EXPECT_EQ(plan.window_seconds(), 60);
  ASSERT_EQ(plan.placement().experts_size(), 8);
  for (const v1::ExpertAssignment& expert : plan.placement().experts()) {
    EXPECT_GE(expert.servers_size(), 1) << expert.expert_id();
  }
  ASSERT_EQ(plan.server_load_before_size(), 2);
  ASSERT_EQ(plan.server_load_after_size(), 2);
  // 20 x 64 tokens x top-2 were served: the loads add up to the pairs.
  EXPECT_NEAR(plan.server_load_before(0) + plan.server_load_before(1), 20 * 64 * 2, 1e-6);
  EXPECT_NEAR(plan.server_load_after(0) + plan.server_load_after(1), 20 * 64 * 2, 1e-6);
  EXPECT_LE(plan.imbalance_after(), plan.imbalance_before() + 1e-9);
  EXPECT_EQ(plan.bytes_moved(), plan.experts_moved() * int64_t{(2 * 32 * 64 + 32 + 64) * 4});
  EXPECT_GT(plan.servers_per_token_before(), 1.0);
  EXPECT_LE(plan.servers_per_token_after(), 2.0);

  // Nothing moved: the cluster is at the same placement epoch.
  v1::ClusterState state;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(cluster.stub().GetClusterState(&context, {}, &state).ok());
  }
  EXPECT_EQ(state.placement_epoch(), 1u);
  std::string metrics = local::HttpGet(cluster.router_metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("moe_router_placement_epoch 1"));
  EXPECT_THAT(metrics, HasSubstr("moe_router_rebalance_plan_imbalance{when=\"after\"}"));

  // Carried out: the servers host what the plan says, at epoch 2, and the
  // cluster still equals the reference.
  v1::RebalanceResponse done;
  status = rebalance(false, &done);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(done.placement_epoch(), 2u);
  for (int s = 0; s < 2; ++s) {
    v1::InfoResponse info;
    ASSERT_TRUE(cluster.Info(s, &info).ok());
    EXPECT_EQ(info.placement_epoch(), 2u);
    std::vector<int> hosted, planned;
    for (const v1::ExpertDigest& d : info.experts()) hosted.push_back(d.expert_id());
    for (const v1::ExpertAssignment& e : done.placement().experts()) {
      for (const std::string& name : e.servers()) {
        if (name == absl::StrCat("e", s)) planned.push_back(e.expert_id());
      }
    }
    std::sort(hosted.begin(), hosted.end());
    EXPECT_EQ(hosted, planned) << "server e" << s;
  }
  const ReferenceMoe reference = cluster.Reference();
  for (int i = 0; i < 5; ++i) {
    const FloatTensor x = RandomTensor({64, 32}, 300 + i);
    v1::ForwardResponse response;
    ASSERT_TRUE(cluster.Forward(x, &response).ok());
    EXPECT_TRUE(TensorNear(Decoded(response.y(), 32), reference.Forward(x)->y, 1e-5));
  }
  metrics = local::HttpGet(cluster.router_metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("moe_router_placement_epoch 2"));
  EXPECT_THAT(metrics, HasSubstr("moe_router_requests_total{code=\"OK\",method=\"Rebalance\"} 2"));
}

// ReleaseExpert on one of two replicas: the router fails over on the
// NOT_FOUND answer and avoids that replica; no request fails.
TEST(RebalanceTest, ReleasingOneReplicaFailsNoRequest) {
  ProcessClusterOptions options;
  options.model = "d_model: 32 d_ff: 64 num_experts: 4 top_k: 2 seed: 6";
  options.strategy = "DATA_PARALLEL";
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  {
    grpc::ClientContext context;
    v1::ReleaseExpertRequest request;
    request.set_expert_id(0);
    v1::ReleaseExpertResponse response;
    const grpc::Status status = cluster.server_stub(0).ReleaseExpert(&context, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  for (int i = 0; i < 20; ++i) {
    const FloatTensor x = RandomTensor({16, 32}, 100 + i);
    v1::ForwardResponse response;
    const grpc::Status status = cluster.Forward(x, &response);
    ASSERT_TRUE(status.ok()) << "request " << i << ": " << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(response.y(), 32), reference.Forward(x)->y, 1e-5));
  }
  v1::ClusterState state;
  grpc::ClientContext context;
  ASSERT_TRUE(cluster.stub().GetClusterState(&context, {}, &state).ok());
  // Expert 0 is avoided there (a slow first answer may have another
  // expert avoided for a while too: hedging's outlier marks).
  EXPECT_THAT(state.servers(0).stale_expert_ids(), ::testing::Contains(0));
}

// One of two replicas SIGSTOPped under load from 4 clients: the router
// hedges the calls it does not answer and then avoids it; no request fails.
// The longest delay is reported (a stopped server is otherwise noticed by
// keepalive after about 4 s).
TEST(RebalanceTest, AStoppedReplicaUnderLoadFailsNoRequest) {
  ProcessClusterOptions options;
  options.model = "d_model: 32 d_ff: 64 num_experts: 4 top_k: 2 seed: 6";
  options.strategy = "DATA_PARALLEL";
  ProcessCluster cluster(options);
  const ReferenceMoe reference = cluster.Reference();
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<double> longest(4, 0), typical(4, 0);
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      std::vector<double> ms;
      for (int i = 0; !stop.load(); ++i) {
        const FloatTensor x = RandomTensor({16, 32}, 1000 * c + i % 50);
        v1::ForwardResponse response;
        const absl::Time start = absl::Now();
        const grpc::Status status = cluster.Forward(x, &response);
        ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
        if (status.ok() && TensorNear(Decoded(response.y(), 32), reference.Forward(x)->y, 1e-5)) {
          ok.fetch_add(1);
        } else {
          failed.fetch_add(1);
        }
      }
      std::sort(ms.begin(), ms.end());
      typical[c] = ms[ms.size() / 2];
      longest[c] = ms.back();
    });
  }
  auto wait_for = [&](int calls) {
    const int target = ok.load() + calls;
    while (ok.load() < target && failed.load() == 0) absl::SleepFor(absl::Milliseconds(5));
  };
  wait_for(100);
  cluster.PauseServer(1);
  wait_for(300);
  cluster.ContinueServer(1);
  stop.store(true);
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed.load(), 0);
  const double worst = *std::max_element(longest.begin(), longest.end());
  std::cout << ok.load() << " Forwards with server 1 stopped for part of them: p50 " << typical[0]
            << " ms, longest " << worst << " ms\n";
  // Hedging answers well before keepalive (about 4 s) would.
  EXPECT_LT(worst, 2000);
  const std::string metrics = local::HttpGet(cluster.router_metrics_port(), "/metrics");
  const size_t at = metrics.find("\nmoe_router_hedges_total ");
  ASSERT_NE(at, std::string::npos);
  EXPECT_GT(std::stod(metrics.substr(at + 25)), 0) << "no call was hedged";
}

}  // namespace
}  // namespace moe::testing
