#include "common/placement.h"

#include <algorithm>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<int> Servers(const Placement& p, int expert) {
  auto s = p.ServersOf(ExpertKey(0, expert));
  return {s.begin(), s.end()};
}
// Expert indices of layer-0 keys (the strategies place layer 0).
std::vector<int> Layer0(absl::Span<const ExpertKey> keys) {
  std::vector<int> ids;
  for (ExpertKey key : keys) {
    EXPECT_EQ(key.layer, 0) << key;
    ids.push_back(key.expert);
  }
  return ids;
}
std::vector<int> Experts(const Placement& p, int server) { return Layer0(p.ExpertsOn(server)); }

TEST(PlacementTest, DataParallelPutsEveryExpertEverywhere) {
  const Placement p = DataParallelPlacement(4, 3);
  for (int e = 0; e < 4; ++e) EXPECT_THAT(Servers(p, e), ElementsAre(0, 1, 2));
  EXPECT_EQ(p.num_replicas(), 12);
  const std::vector<ReplicaGroup> groups = ReplicaGroups(p);
  ASSERT_EQ(groups.size(), 1u);
  EXPECT_THAT(groups[0].servers, ElementsAre(0, 1, 2));
  EXPECT_THAT(Layer0(groups[0].experts), ElementsAre(0, 1, 2, 3));
}

TEST(PlacementTest, ModelParallelSplitsContiguousBlocks) {
  const Placement p = ModelParallelPlacement(8, 3);
  EXPECT_THAT(Experts(p, 0), ElementsAre(0, 1, 2));
  EXPECT_THAT(Experts(p, 1), ElementsAre(3, 4, 5));
  EXPECT_THAT(Experts(p, 2), ElementsAre(6, 7));
  EXPECT_EQ(p.num_replicas(), 8);
  EXPECT_TRUE(ReplicaGroups(p).empty());
  // More servers than experts: the last servers hold nothing.
  const Placement sparse = ModelParallelPlacement(2, 4);
  EXPECT_THAT(Experts(sparse, 1), ElementsAre(1));
  EXPECT_TRUE(Experts(sparse, 3).empty());
}

TEST(PlacementTest, HybridReplicatesTheFirstHalf) {
  const Placement p = HybridPlacement(6, 2);
  for (int e = 0; e < 3; ++e) EXPECT_THAT(Servers(p, e), ElementsAre(0, 1));
  EXPECT_THAT(Servers(p, 3), ElementsAre(0));
  EXPECT_THAT(Servers(p, 4), ElementsAre(0));
  EXPECT_THAT(Servers(p, 5), ElementsAre(1));
  const std::vector<ReplicaGroup> groups = ReplicaGroups(p);
  ASSERT_EQ(groups.size(), 1u);
  EXPECT_THAT(groups[0].servers, ElementsAre(0, 1));
  EXPECT_THAT(Layer0(groups[0].experts), ElementsAre(0, 1, 2));
  // One expert: nothing to replicate.
  EXPECT_EQ(HybridPlacement(1, 3).num_replicas(), 1);
}

TEST(PlacementTest, EveryStrategyHoldsEveryExpert) {
  for (int experts : {1, 2, 3, 7, 8, 64}) {
    for (int servers : {1, 2, 3, 5, 8}) {
      std::vector<double> load(experts);
      for (int e = 0; e < experts; ++e) load[e] = 1.0 + (e * 7919 % 13);
      for (const Placement& p :
           {DataParallelPlacement(experts, servers),
            ModelParallelPlacement(experts, servers),
            HybridPlacement(experts, servers),
            *DynamicPlacement(experts, servers, load, 0)}) {
        ASSERT_EQ(p.num_layers(), 1);
        ASSERT_EQ(p.num_experts(0), experts);
        ASSERT_EQ(p.num_servers(), servers);
        for (int e = 0; e < experts; ++e) {
          EXPECT_FALSE(Servers(p, e).empty()) << e;
          for (int s : Servers(p, e)) EXPECT_TRUE(p.Holds(s, ExpertKey(0, e)));
        }
      }
    }
  }
}

TEST(PlacementTest, DynamicGivesHotExpertsMoreReplicas) {
  // Expert 0 carries 60% of the load.
  const std::vector<double> load = {12, 1, 1, 1, 1, 1, 1, 2};
  absl::StatusOr<Placement> p = DynamicPlacement(8, 4, load, 3);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_replicas(), 12);
  EXPECT_EQ(Servers(*p, 0).size(), 4u);
  for (int s = 0; s < 4; ++s) EXPECT_LE(p->ExpertsOn(s).size(), 3u);
  const double dynamic = Imbalance(ServerLoads(*p, 0, load));
  const double model_parallel = Imbalance(ServerLoads(ModelParallelPlacement(8, 4), 0, load));
  EXPECT_LT(dynamic, model_parallel);
  EXPECT_LT(dynamic, 1.25);
}

TEST(PlacementTest, DynamicRespectsSlotsOnRandomProfiles) {
  std::mt19937 rng(7);
  std::exponential_distribution<double> dist(1.0);
  double dynamic_sum = 0, blocks_sum = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int experts = 2 + trial % 30;
    const int servers = 1 + trial % 7;
    std::vector<double> load(experts);
    for (double& l : load) l = dist(rng);
    absl::StatusOr<Placement> p = DynamicPlacement(experts, servers, load, 0);
    ASSERT_TRUE(p.ok()) << p.status();
    const int slots = std::min(experts, (experts + servers - 1) / servers + 1);
    for (int s = 0; s < servers; ++s) {
      EXPECT_LE(static_cast<int>(p->ExpertsOn(s).size()), slots)
          << "experts " << experts << " servers " << servers;
    }
    // A greedy heuristic: close to, and on average far better than, one
    // copy each in contiguous blocks.
    const double dynamic = Imbalance(ServerLoads(*p, 0, load));
    const double blocks = Imbalance(ServerLoads(ModelParallelPlacement(experts, servers), 0, load));
    EXPECT_LE(dynamic, blocks + 0.05);
    dynamic_sum += dynamic;
    blocks_sum += blocks;
  }
  EXPECT_LT(dynamic_sum, 0.8 * blocks_sum);
}

TEST(PlacementTest, DynamicGroupsReplicasBySharedServers) {
  const std::vector<double> load = {10, 10, 1, 1};
  absl::StatusOr<Placement> p = DynamicPlacement(4, 4, load, 2);
  ASSERT_TRUE(p.ok());
  for (const ReplicaGroup& group : ReplicaGroups(*p)) {
    EXPECT_GE(group.servers.size(), 2u);
    for (int e : Layer0(group.experts)) {
      EXPECT_THAT(Servers(*p, e), ::testing::ElementsAreArray(group.servers));
    }
  }
}

TEST(PlacementTest, DynamicRejectsBadInput) {
  EXPECT_THAT(DynamicPlacement(4, 2, {1, 1}, 0).status().message(),
              HasSubstr("2 values for 4 experts"));
  EXPECT_THAT(DynamicPlacement(8, 2, std::vector<double>(8, 1.0), 3).status().message(),
              HasSubstr("cannot hold 8 experts"));
}

TEST(PlacementTest, CreateValidates) {
  EXPECT_THAT(Placement::Create(2, {{0}, {}}).status().message(),
              HasSubstr("expert 1 is held by no server"));
  EXPECT_THAT(Placement::Create(2, {{0, 2}}).status().message(),
              HasSubstr("unknown server 2"));
  EXPECT_THAT(Placement::Create(2, {{1, 1}}).status().message(),
              HasSubstr("more than once"));
  EXPECT_FALSE(Placement::Create(0, {{0}}).ok());
  absl::StatusOr<Placement> p = Placement::Create(3, {{2, 0}, {1}});
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(Servers(*p, 0), ElementsAre(0, 2));
  EXPECT_THAT(Experts(*p, 0), ElementsAre(0));
  EXPECT_TRUE(Experts(*p, 1) == std::vector<int>{1});
}

TEST(PlacementTest, ReplicaGroupIdsAreStableAndDistinct) {
  absl::StatusOr<Placement> p = Placement::Create(3, {{0, 1}, {0, 1}, {1, 2}, {2}});
  ASSERT_TRUE(p.ok());
  const std::vector<ReplicaGroup> groups = ReplicaGroups(*p);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_THAT(Layer0(groups[0].experts), ElementsAre(0, 1));
  EXPECT_THAT(groups[1].servers, ElementsAre(1, 2));
  EXPECT_NE(groups[0].id, groups[1].id);
  EXPECT_EQ(ReplicaGroups(*p)[0].id, groups[0].id);
}

TEST(PlacementTest, LayersAreKeptApart) {
  // Layer 0: two experts on both servers; layer 1: three experts, one each
  // on server 1 and the third on both.
  absl::StatusOr<Placement> p = Placement::CreateLayers(2, {{{0, 1}, {0, 1}}, {{1}, {0}, {1, 0}}});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_layers(), 2);
  EXPECT_EQ(p->num_experts(1), 3);
  EXPECT_EQ(p->num_experts(2), 0);
  EXPECT_EQ(p->num_replicas(), 8);
  EXPECT_THAT(p->ExpertsOn(0),
              ElementsAre(ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(1, 1), ExpertKey(1, 2)));
  EXPECT_TRUE(p->Holds(1, ExpertKey(1, 0)));
  EXPECT_FALSE(p->Holds(0, ExpertKey(1, 0)));
  EXPECT_FALSE(p->Holds(0, ExpertKey(1, 3)));
  EXPECT_FALSE(p->Contains(ExpertKey(-1, 0)));
  // One group for servers {0, 1}: both layers' replicated experts, one sum.
  const std::vector<ReplicaGroup> groups = ReplicaGroups(*p);
  ASSERT_EQ(groups.size(), 1u);
  EXPECT_THAT(groups[0].experts, ElementsAre(ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(1, 2)));
  // The layer is part of the group's identity.
  absl::StatusOr<Placement> shifted = Placement::CreateLayers(2, {{{0}}, {{0, 1}, {0, 1}}});
  ASSERT_TRUE(shifted.ok());
  absl::StatusOr<Placement> flat = Placement::Create(2, {{0, 1}, {0, 1}});
  EXPECT_NE(ReplicaGroups(*shifted)[0].id, ReplicaGroups(*flat)[0].id);
  EXPECT_THAT(Placement::CreateLayers(2, {{{0}}, {}}).status().message(),
              HasSubstr("layer 1 has no experts"));
  EXPECT_THAT(Placement::CreateLayers(2, {{{0}}, {{0}, {}}}).status().message(),
              HasSubstr("layer 1 expert 1 is held by no server"));
}

TEST(PlacementTest, ComputePlacementFollowsTheConfig) {
  ModelConfig model;
  model.num_experts = 4;
  ClusterConfig cluster;
  cluster.servers = {{"a", "a:1"}, {"b", "b:1"}};
  cluster.strategy = PlacementStrategy::kExplicit;
  cluster.explicit_placement = {{{1}, {0, 1}, {0}, {1}}};
  absl::StatusOr<Placement> p = ComputePlacement(model, cluster);
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(Experts(*p, 1), ElementsAre(0, 1, 3));
  cluster.strategy = PlacementStrategy::kHybrid;
  EXPECT_EQ(ComputePlacement(model, cluster)->num_replicas(), 6);
}

// Spare servers (the last ones) host nothing: the strategies place on the
// others, as they would on a cluster of those only.
TEST(PlacementTest, SpareServersHostNothing) {
  ModelConfig model;
  model.num_experts = 4;
  ClusterConfig cluster;
  cluster.servers = {{"a", "a:1"}, {"b", "b:1"}, {"c", "c:1"}};
  cluster.spare_servers = 1;
  for (PlacementStrategy strategy :
       {PlacementStrategy::kDataParallel, PlacementStrategy::kModelParallel,
        PlacementStrategy::kHybrid}) {
    cluster.strategy = strategy;
    absl::StatusOr<Placement> p = ComputePlacement(model, cluster);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->num_servers(), 3);
    EXPECT_TRUE(p->ExpertsOn(2).empty());
    ClusterConfig two = cluster;
    two.servers.pop_back();
    two.spare_servers = 0;
    for (int e = 0; e < 4; ++e) {
      EXPECT_EQ(p->ServersOf(ExpertKey(0, e)),
                ComputePlacement(model, two)->ServersOf(ExpertKey(0, e)));
    }
  }
}

TEST(PlacementTest, ImbalanceIsMaxOverMean) {
  EXPECT_DOUBLE_EQ(Imbalance({1, 1, 1, 1}), 1.0);
  EXPECT_DOUBLE_EQ(Imbalance({4, 0, 0, 0}), 4.0);
  EXPECT_DOUBLE_EQ(Imbalance({0, 0}), 1.0);
  // A server with neither load nor room (drained, absent) does not count.
  EXPECT_DOUBLE_EQ(Imbalance({2, 2, 0}, {1, 1, 0}), 1.0);
  EXPECT_DOUBLE_EQ(Imbalance({2, 2, 2}, {1, 1, 0}), 1.0);
  EXPECT_DOUBLE_EQ(Imbalance({2, 2, 0}, {1, 1, 1}), 1.5);
}

}  // namespace
}  // namespace moe
