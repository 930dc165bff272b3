#include "router_service/rebalance.h"

#include "common/gating.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router_service/routing_sample.h"

namespace moe::router {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 64;
  model.d_ff = 128;
  model.num_experts = 8;
  model.top_k = 2;
  return model;
}

TEST(RebalanceTest, SlotsAndBytesFollowTheConfigAndTheServers) {
  const ModelConfig model = Model();
  ClusterConfig cluster;
  EXPECT_THAT(ServerSlots(model, cluster, ModelParallelPlacement(8, 2)), ElementsAre(5, 5));
  // A server holding every expert has the memory for them.
  EXPECT_THAT(ServerSlots(model, cluster, DataParallelPlacement(8, 2)), ElementsAre(8, 8));
  cluster.slots_per_server = 6;
  EXPECT_THAT(ServerSlots(model, cluster, ModelParallelPlacement(8, 2)), ElementsAre(6, 6));
  EXPECT_EQ(ReplicaBytes(model), (2 * 64 * 128 + 64 + 128) * 4);
  ModelConfig momentum = model;
  momentum.optimizer.type = OptimizerType::kSgdMomentum;
  EXPECT_EQ(ReplicaBytes(momentum), 2 * ReplicaBytes(model));
}

TEST(RebalanceTest, APlanBalancesTheMeasuredLoad) {
  const ModelConfig model = Model();
  ClusterConfig cluster;
  const Placement current = ModelParallelPlacement(8, 2);  // 0-3 | 4-7
  RebalanceInputs inputs;
  inputs.model = &model;
  inputs.cluster = &cluster;
  inputs.current = &current;
  inputs.load.window = absl::Seconds(60);
  inputs.load.expert_tokens = {900, 800, 700, 600, 10, 10, 10, 10};
  absl::StatusOr<PlacementPlan> plan = PlanRebalance(inputs);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_NEAR(plan->imbalance_before, 3000.0 / 1520, 1e-9);
  EXPECT_LT(plan->imbalance_after, 1.05);
  EXPECT_GT(plan->replicas_added, 0);
  EXPECT_EQ(plan->bytes_moved, plan->replicas_added * ReplicaBytes(model));

  inputs.load.expert_tokens.assign(8, 0);
  EXPECT_THAT(PlanRebalance(inputs).status().message(),
              HasSubstr("no tokens were served in the last 1m"));
}

TEST(RebalanceTest, ADrainedServerIsLeftEmpty) {
  const ModelConfig model = Model();
  ClusterConfig cluster;
  const Placement current = ModelParallelPlacement(8, 4);  // 2 experts each
  RebalanceInputs inputs;
  inputs.model = &model;
  inputs.cluster = &cluster;
  inputs.current = &current;
  inputs.load.window = absl::Seconds(60);
  inputs.load.expert_tokens.assign(8, 0);  // idle: draining still plans
  inputs.drain = {3};
  absl::StatusOr<PlacementPlan> plan = PlanRebalance(inputs);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->placement.ExpertsOn(3).empty());
  for (int e = 0; e < 8; ++e) {
    EXPECT_FALSE(plan->placement.ServersOf(ExpertKey(0, e)).empty()) << "expert " << e;
  }
  // Three servers of ceil(8/4) + 1 = 3 slots hold 8 experts; two do not.
  inputs.drain = {2, 3};
  EXPECT_EQ(PlanRebalance(inputs).status().code(), absl::StatusCode::kInvalidArgument);
}

Routing TwoChoices(int64_t tokens, int first, int second) {
  Routing routing;
  routing.num_tokens = tokens;
  routing.num_experts = 8;
  routing.top_k = 2;
  for (int64_t t = 0; t < tokens; ++t) {
    routing.expert_ids.push_back(first);
    routing.expert_ids.push_back(second);
    routing.dropped.push_back(0);
    routing.dropped.push_back(t % 2);  // every other second choice dropped
  }
  return routing;
}

TEST(RoutingSampleTest, KeepsAFewTokensPerRequestAndTheNewest) {
  RoutingSample sample(/*capacity=*/6, /*per_request=*/4);
  sample.Record(TwoChoices(100, 1, 2));  // tokens 0, 25, 50, 75
  std::vector<std::vector<ExpertKey>> tokens = sample.Tokens();
  ASSERT_EQ(tokens.size(), 4u);
  EXPECT_THAT(tokens[0], ElementsAre(ExpertKey(0, 1), ExpertKey(0, 2)));
  EXPECT_THAT(tokens[1], ElementsAre(ExpertKey(0, 1)));  // its second choice was dropped
  sample.Record(TwoChoices(3, 5, 6));                    // all three; the ring keeps 6
  tokens = sample.Tokens();
  ASSERT_EQ(tokens.size(), 6u);
  EXPECT_THAT(tokens[0], ElementsAre(ExpertKey(0, 1)));  // token 25; token 0 is gone
  EXPECT_THAT(tokens[4], ElementsAre(ExpertKey(0, 5)));
  EXPECT_THAT(tokens[5], ElementsAre(ExpertKey(0, 5), ExpertKey(0, 6)));
}

}  // namespace
}  // namespace moe::router
