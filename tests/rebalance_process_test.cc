// Router.Rebalance on a real cluster, as far as it goes today: with
// dry_run it plans from the load the router measured (the placement, what
// it would copy, the imbalance and servers per token before and after) and
// changes nothing; moving is refused by name.
#include "absl/strings/str_cat.h"
#include "common/testing/random_tensor.h"
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
  status = rebalance(false, &plan);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(status.error_message(), HasSubstr("dry_run"));
}

}  // namespace
}  // namespace moe::testing
