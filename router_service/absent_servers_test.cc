// Absent servers: one that hosts nothing and does not answer is absent; one
// that hosts something and does not answer is an error, never absent.
#include "router_service/absent_servers.h"

#include "common/deterministic_init.h"
#include "common/placement.h"
#include "expert_service/reference_expert_kernel.h"
#include "gtest/gtest.h"
#include "router_service/testing/in_process_expert_client.h"

namespace moe::router {
namespace {

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 8;
  model.d_ff = 16;
  model.num_experts = 2;
  model.top_k = 1;
  model.seed = 3;
  return model;
}

TEST(AbsentServersTest, OnlyServersHostingNothingCanBeAbsent) {
  const ModelConfig model = Model();
  // Server 0: expert 0, server 1: expert 1, server 2: nothing.
  const Placement placement = *Placement::Create(3, {{0}, {1}});
  testing::InProcessExpertClient client(
      model, placement, InitAllWeights(model),
      [](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<expert::ExpertKernel>> {
        return std::make_unique<expert::ReferenceExpertKernel>(w);
      });
  auto hosts_nothing = [&](int s) { return placement.ExpertsOn(s).empty(); };
  const absl::Time deadline = absl::Now() + absl::Seconds(5);

  ServerInfos all_up = AskEveryServer(client, 3, hosts_nothing, deadline);
  EXPECT_FALSE(all_up.any_absent());
  for (const auto& info : all_up.infos) EXPECT_TRUE(info.ok()) << info.status();

  client.Kill(1);
  client.Kill(2);
  ServerInfos down = AskEveryServer(client, 3, hosts_nothing, deadline);
  EXPECT_EQ(down.absent, (std::vector<bool>{false, false, true}));
  EXPECT_EQ(down.absent_servers(), std::vector<int>{2});
  EXPECT_TRUE(down.infos[0].ok());
  EXPECT_FALSE(down.infos[1].ok());  // hosts expert 1: its trouble is an error
  EXPECT_EQ(AbsentNames(down, [](int s) { return "e" + std::to_string(s); }), "e2");

  client.Revive(2);
  EXPECT_FALSE(AskEveryServer(client, 3, hosts_nothing, deadline).absent[2]);
}

}  // namespace
}  // namespace moe::router
