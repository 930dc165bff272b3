#include "common/model_config.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/placement.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr char kValid[] = R"pb(
  model {
    d_model: 64
    d_ff: 256
    num_experts: 8
    top_k: 2
    capacity_factor: 1.25
    overflow_policy: OVERFLOW_POLICY_DROP
    seed: 42
    optimizer { type: OPTIMIZER_TYPE_SGD_MOMENTUM learning_rate: 0.01 momentum: 0.9 }
  }
  cluster {
    servers { name: "expert-0" address: "127.0.0.1:50061" }
    servers { name: "expert-1" address: "127.0.0.1:50062" }
    strategy: PLACEMENT_STRATEGY_HYBRID
  }
)pb";

// The valid config with `from` replaced by `to`.
std::string With(absl::string_view from, absl::string_view to) {
  const std::string text = absl::StrReplaceAll(kValid, {{from, to}});
  EXPECT_NE(text, kValid) << "test bug: " << from << " not found";
  return text;
}

std::string ErrorOf(const std::string& text) {
  absl::StatusOr<ServingConfig> config = ParseServingConfig(text);
  EXPECT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(config.status().message());
}

TEST(ModelConfigTest, ParsesAValidConfig) {
  absl::StatusOr<ServingConfig> config = ParseServingConfig(kValid);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.d_model, 64);
  EXPECT_EQ(config->model.d_ff, 256);
  EXPECT_EQ(config->model.num_experts, 8);
  EXPECT_EQ(config->model.top_k, 2);
  EXPECT_FLOAT_EQ(config->model.capacity_factor, 1.25f);
  EXPECT_EQ(config->model.overflow, OverflowPolicy::kDrop);
  EXPECT_EQ(config->model.seed, 42u);
  EXPECT_EQ(config->model.optimizer.type, OptimizerType::kSgdMomentum);
  EXPECT_FLOAT_EQ(config->model.optimizer.momentum, 0.9f);
  EXPECT_EQ(config->model.max_batch_tokens, 65536);
  ASSERT_EQ(config->cluster.servers.size(), 2u);
  EXPECT_EQ(config->cluster.servers[1].address, "127.0.0.1:50062");
  EXPECT_EQ(config->cluster.strategy, PlacementStrategy::kHybrid);
  EXPECT_EQ(config->cluster.FindServer("expert-1"), 1);
  EXPECT_EQ(config->cluster.FindServer("nope"), -1);
}

TEST(ModelConfigTest, ModelProtoRoundTrips) {
  absl::StatusOr<ServingConfig> config = ParseServingConfig(kValid);
  ASSERT_TRUE(config.ok());
  absl::StatusOr<ModelConfig> again =
      ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->d_ff, 256);
  EXPECT_EQ(again->overflow, OverflowPolicy::kDrop);
  EXPECT_EQ(again->optimizer.type, OptimizerType::kSgdMomentum);
}

TEST(ModelConfigTest, AdamWTakesPyTorchsDefaultsUnlessGiven) {
  const std::string adamw =
      With("type: OPTIMIZER_TYPE_SGD_MOMENTUM learning_rate: 0.01 momentum: 0.9",
           "type: OPTIMIZER_TYPE_ADAMW learning_rate: 0.001 beta2: 0.95 max_grad_norm: 1.0");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(adamw);
  ASSERT_TRUE(config.ok()) << config.status();
  const OptimizerOptions& optimizer = config->model.optimizer;
  EXPECT_EQ(optimizer.type, OptimizerType::kAdamW);
  EXPECT_EQ(optimizer.beta1, 0.9);
  EXPECT_EQ(optimizer.beta2, 0.95);
  EXPECT_EQ(optimizer.eps, 1e-8);
  EXPECT_EQ(optimizer.weight_decay, 0.01);
  EXPECT_EQ(optimizer.max_grad_norm, 1.0f);
  // Round trip: the servers' Info reports the same optimizer.
  absl::StatusOr<ModelConfig> again = ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->optimizer.beta2, 0.95);
  EXPECT_EQ(again->optimizer.max_grad_norm, 1.0f);
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(adamw, {{"beta2: 0.95", "beta2: 1"}})),
              HasSubstr("model.optimizer.beta2: must be in [0, 1)"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(adamw, {{"beta2: 0.95", "eps: 0"}})),
              HasSubstr("model.optimizer.eps"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(adamw, {{"max_grad_norm: 1.0", "max_grad_norm: -1"}})),
              HasSubstr("model.optimizer.max_grad_norm"));
}

TEST(ModelConfigTest, GatesAreMixtralsUnlessGiven) {
  absl::StatusOr<ServingConfig> config = ParseServingConfig(kValid);
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(config->model.gate.renormalize);
  EXPECT_EQ(config->model.gate.num_groups, 0);
  EXPECT_EQ(config->model.gate.scaling_factor, 1.0);
  // DeepSeek-V2's: 8 experts in 4 groups, the best 2 groups, scaled.
  const std::string grouped =
      With("seed: 42", "seed: 42 gate { weights: WEIGHTS_PROBABILITIES num_groups: 4 "
                       "top_groups: 2 scaling_factor: 16 }");
  config = ParseServingConfig(grouped);
  ASSERT_TRUE(config.ok()) << config.status();
  const GateOptions& gate = config->model.gate;
  EXPECT_FALSE(gate.renormalize);
  EXPECT_EQ(gate.num_groups, 4);
  EXPECT_EQ(gate.top_groups, 2);
  EXPECT_EQ(gate.scaling_factor, 16.0);
  absl::StatusOr<ModelConfig> again = ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->gate.renormalize);
  EXPECT_EQ(again->gate.top_groups, 2);
  EXPECT_EQ(again->gate.scaling_factor, 16.0);
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(grouped, {{"num_groups: 4", "num_groups: 3"}})),
              HasSubstr("model.gate.num_groups: must divide num_experts = 8, got 3"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(grouped, {{"top_groups: 2", "top_groups: 5"}})),
              HasSubstr("model.gate.top_groups: must be in [1, num_groups = 4]"));
  // top_k 2 needs 2 experts: one group of 2 is enough, of 1 not.
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(grouped, {{"num_groups: 4 top_groups: 2",
                                                     "num_groups: 8 top_groups: 1"}})),
              HasSubstr("top_k = 2 <= top_groups x 1 experts per group, got 1"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(grouped, {{"scaling_factor: 16", "scaling_factor: -1"}})),
              HasSubstr("model.gate.scaling_factor"));
}

TEST(ModelConfigTest, AHuggingFaceLayoutNamesItsBlock) {
  const std::string nllb = With("seed: 42",
                                "seed: 42 checkpoint_layout { family: FAMILY_NLLB_MOE prefix: "
                                "\"model.encoder.layers.3.ffn\" }");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(nllb);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.checkpoint_layout.family, CheckpointFamily::kNllbMoe);
  EXPECT_EQ(config->model.checkpoint_layout.prefix, "model.encoder.layers.3.ffn");
  EXPECT_FALSE(config->model.bias_free());
  absl::StatusOr<ModelConfig> again = ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->checkpoint_layout.prefix, "model.encoder.layers.3.ffn");
  const std::string switch_layout =
      absl::StrReplaceAll(nllb, {{"FAMILY_NLLB_MOE", "FAMILY_SWITCH_TRANSFORMERS"}});
  config = ParseServingConfig(switch_layout);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->model.bias_free());
  for (const char* bad : {"\"\"", "\".ffn\"", "\"a/../b\""}) {
    EXPECT_THAT(ErrorOf(absl::StrReplaceAll(nllb, {{"\"model.encoder.layers.3.ffn\"", bad}})),
                HasSubstr("model.checkpoint_layout.prefix: must be a module name"));
  }
}

// Several MoE layers: every strategy places each layer's experts as it
// would one layer's; a Hugging Face prefix names the layer as "{layer}",
// mapped to the model's layer numbers; EXPLICIT lists (layer, expert).
TEST(ModelConfigTest, SeveralLayersAreCheckedAndPlaced) {
  const std::string nllb =
      With("seed: 42",
           "seed: 42 num_layers: 3 checkpoint_layout { family: FAMILY_NLLB_MOE prefix: "
           "\"model.encoder.layers.{layer}.ffn\" layer_numbers: [3, 7, 11] }");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(nllb);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.num_layers, 3);
  EXPECT_EQ(config->model.total_experts(), 24);
  EXPECT_EQ(config->model.gate_shape(), Shape({3 * 64, 8}));
  EXPECT_EQ(config->model.checkpoint_layout.LayerPrefix(2), "model.encoder.layers.11.ffn");
  absl::StatusOr<ModelConfig> again = ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->num_layers, 3);
  EXPECT_EQ(again->checkpoint_layout.layer_numbers, (std::vector<int>{3, 7, 11}));
  absl::StatusOr<Placement> placement = ComputePlacement(config->model, config->cluster);
  ASSERT_TRUE(placement.ok()) << placement.status();
  ASSERT_EQ(placement->num_layers(), 3);
  for (int l = 0; l < 3; ++l) {
    for (int e = 0; e < 8; ++e) {
      EXPECT_EQ(placement->ServersOf(ExpertKey(l, e)), placement->ServersOf(ExpertKey(0, e)));
    }
  }
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(nllb, {{"{layer}", "3"}})),
              HasSubstr("with num_layers 3 it must name the layer as \"{layer}\""));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(nllb, {{"[3, 7, 11]", "[3, 7]"}})),
              HasSubstr("layer_numbers: lists 2 layers, num_layers is 3"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(nllb, {{"[3, 7, 11]", "[3, 3, 11]"}})),
              HasSubstr("must be distinct"));
  EXPECT_THAT(ErrorOf(With("seed: 42", "seed: 42 num_layers: 1025")),
              HasSubstr("model.num_layers: must be in [0, 1024]"));

  // EXPLICIT: layer 1 kept together on expert-1, layer 0 spread.
  std::string explicit_text = With("strategy: PLACEMENT_STRATEGY_HYBRID",
                                   "strategy: PLACEMENT_STRATEGY_EXPLICIT\n"
                                   "explicit_placement { PLACEMENTS }");
  explicit_text = absl::StrReplaceAll(explicit_text, {{"seed: 42", "seed: 42 num_layers: 2"}});
  std::string all;
  for (int e = 0; e < 8; ++e) {
    absl::StrAppend(&all, "experts { expert_id: ", e, " servers: \"expert-", e % 2, "\" } ");
    absl::StrAppend(&all, "experts { layer: 1 expert_id: ", e, " servers: \"expert-1\" } ");
  }
  config = ParseServingConfig(absl::StrReplaceAll(explicit_text, {{"PLACEMENTS", all}}));
  ASSERT_TRUE(config.ok()) << config.status();
  placement = ComputePlacement(config->model, config->cluster);
  ASSERT_TRUE(placement.ok()) << placement.status();
  EXPECT_EQ(placement->ExpertsOn(0).size(), 4u);
  EXPECT_EQ(placement->ExpertsOn(1).size(), 12u);
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(
                  explicit_text, {{"PLACEMENTS", absl::StrReplaceAll(all, {{"layer: 1 expert_id: 5",
                                                                            "layer: 2 "
                                                                            "expert_id: "
                                                                            "5"}})}})),
              HasSubstr("layer 2 is out of range [0, 2)"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(
                  explicit_text, {{"PLACEMENTS", absl::StrReplaceAll(all, {{"experts { layer: 1 "
                                                                            "expert_id: 5 servers: "
                                                                            "\"expert-1\" } ",
                                                                            ""}})}})),
              HasSubstr("layer 1 expert 5 is not placed"));

  // Spare servers: room to scale up, hosting nothing at first.
  EXPECT_THAT(
      ErrorOf(absl::StrReplaceAll(
          explicit_text, {{"PLACEMENTS", all}, {"strategy:", "spare_servers: 1 strategy:"}})),
      HasSubstr("cluster.explicit_placement: expert 1 on spare server expert-1"));
  EXPECT_THAT(ErrorOf(With("strategy: PLACEMENT_STRATEGY_HYBRID",
                           "strategy: PLACEMENT_STRATEGY_HYBRID spare_servers: 2")),
              HasSubstr("cluster.spare_servers: 2 of 2 servers"));
  config = ParseServingConfig(With("strategy: PLACEMENT_STRATEGY_HYBRID",
                                   "strategy: PLACEMENT_STRATEGY_HYBRID spare_servers: 1"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.active_servers(), 1);
  EXPECT_EQ(ClusterConfigToProto(config->cluster).spare_servers(), 1);
}

// Qwen2-MoE's shared expert: slices of d_ff, placed as experts after the
// routed ones, its gate a column of W_g; only for gated SiLU experts and
// the layouts that have one.
TEST(ModelConfigTest, ASharedExpertIsSlicesOfDff) {
  const std::string qwen = With("seed: 42",
                                "seed: 42 activation: EXPERT_ACTIVATION_SILU_GATED "
                                "shared_expert_d_ff: 768");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(qwen);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.shared_slices, 3);
  EXPECT_EQ(config->model.experts_per_layer(), 11);
  EXPECT_EQ(config->model.gate_width(), 9);
  EXPECT_EQ(config->model.gate_shape(), Shape({64, 9}));
  EXPECT_EQ(ModelConfigToProto(config->model).shared_expert_d_ff(), 768);
  absl::StatusOr<Placement> placement = ComputePlacement(config->model, config->cluster);
  ASSERT_TRUE(placement.ok()) << placement.status();
  EXPECT_EQ(placement->num_experts(0), 11);
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(qwen, {{"768", "700"}})),
              HasSubstr("model.shared_expert_d_ff: must be a multiple of d_ff = 256"));
  EXPECT_THAT(ErrorOf(With("seed: 42", "seed: 42 shared_expert_d_ff: 512")),
              HasSubstr("set activation: EXPERT_ACTIVATION_SILU_GATED"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(qwen, {{"shared_expert_d_ff",
                                                  "checkpoint_layout { family: FAMILY_MIXTRAL "
                                                  "prefix: \"m\" } shared_expert_d_ff"}})),
              HasSubstr("FAMILY_MIXTRAL has no shared expert"));
}

// The activation is said, and a Hugging Face family's experts have the one
// its models have.
TEST(ModelConfigTest, GatedSiluExpertsAreSaidNotGuessed) {
  const std::string mixtral =
      With("seed: 42",
           "seed: 42 activation: EXPERT_ACTIVATION_SILU_GATED checkpoint_layout { family: "
           "FAMILY_MIXTRAL prefix: \"model.layers.0.block_sparse_moe\" }");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(mixtral);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->model.gated());
  EXPECT_TRUE(config->model.bias_free());
  EXPECT_EQ(config->model.activation_width(), 2 * config->model.d_ff);
  absl::StatusOr<ModelConfig> again = ModelConfigFromProto(ModelConfigToProto(config->model));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->gated());
  EXPECT_EQ(again->checkpoint_layout.family, CheckpointFamily::kMixtral);
  EXPECT_THAT(
      ErrorOf(absl::StrReplaceAll(mixtral, {{"activation: EXPERT_ACTIVATION_SILU_GATED", ""}})),
      HasSubstr("model.activation: checkpoint_layout.family FAMILY_MIXTRAL has gated SiLU "
                "experts: set activation: EXPERT_ACTIVATION_SILU_GATED"));
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(mixtral, {{"FAMILY_MIXTRAL", "FAMILY_NLLB_MOE"}})),
              HasSubstr("FAMILY_NLLB_MOE has ReLU experts"));
  EXPECT_TRUE(
      ParseServingConfig(absl::StrReplaceAll(mixtral, {{"FAMILY_MIXTRAL", "FAMILY_QWEN2_MOE"}}))
          .ok());
  // moe-serve's own layout takes either.
  EXPECT_TRUE(
      ParseServingConfig(With("seed: 42", "seed: 42 activation: EXPERT_ACTIVATION_SILU_GATED"))
          .ok());
}

TEST(ModelConfigTest, ErrorsNameTheField) {
  EXPECT_EQ(ErrorOf(With("top_k: 2", "top_k: 9")),
            "model.top_k: must be in [1, num_experts = 8], got 9");
  EXPECT_THAT(ErrorOf(With("d_model: 64", "d_model: 0")),
              HasSubstr("model.d_model: must be in [1, 65536], got 0"));
  EXPECT_THAT(ErrorOf(With("num_experts: 8", "num_experts: -1")),
              HasSubstr("model.num_experts"));
  EXPECT_THAT(ErrorOf(With("capacity_factor: 1.25", "capacity_factor: 0")),
              HasSubstr("model.capacity_factor: must be > 0 with OVERFLOW_POLICY_DROP"));
  EXPECT_THAT(ErrorOf(With("momentum: 0.9", "momentum: 1.5")),
              HasSubstr("model.optimizer.momentum"));
  EXPECT_THAT(ErrorOf(With("learning_rate: 0.01", "learning_rate: -1")),
              HasSubstr("model.optimizer.learning_rate"));
  EXPECT_THAT(ErrorOf(With("strategy: PLACEMENT_STRATEGY_HYBRID", "")),
              HasSubstr("cluster.strategy: must be"));
  EXPECT_THAT(ErrorOf(With("\"expert-1\"", "\"expert-0\"")),
              HasSubstr("cluster.servers[1].name: duplicate server name \"expert-0\""));
  EXPECT_THAT(ErrorOf(With("127.0.0.1:50062", "127.0.0.1:50061")),
              HasSubstr("cluster.servers[1].address: duplicate address"));
  EXPECT_THAT(ErrorOf(With("\"expert-1\"", "\"bad name!\"")),
              HasSubstr("cluster.servers[1].name"));
  EXPECT_THAT(ErrorOf(With("address: \"127.0.0.1:50062\"", "")),
              HasSubstr("cluster.servers[1].address: must be set"));
}

TEST(ModelConfigTest, DroplessNeedsNoCapacity) {
  absl::StatusOr<ServingConfig> config = ParseServingConfig(With(
      "capacity_factor: 1.25\n    overflow_policy: OVERFLOW_POLICY_DROP", ""));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.overflow, OverflowPolicy::kDropless);
}

TEST(ModelConfigTest, SyntaxErrorsGiveTheLine) {
  EXPECT_THAT(ErrorOf(With("top_k: 2", "top_k: two")), HasSubstr("line 6"));
  EXPECT_THAT(ErrorOf(With("d_ff", "d_fff")), HasSubstr("d_fff"));
}

TEST(ModelConfigTest, ExplicitPlacementIsResolvedAndChecked) {
  const std::string base = With("strategy: PLACEMENT_STRATEGY_HYBRID",
                                "strategy: PLACEMENT_STRATEGY_EXPLICIT\n"
                                "explicit_placement { PLACEMENTS }");
  auto with_placements = [&](absl::string_view placements) {
    return absl::StrReplaceAll(base, {{"PLACEMENTS", placements}});
  };
  std::string all;
  for (int e = 0; e < 8; ++e) {
    absl::StrAppend(&all, "experts { expert_id: ", e, " servers: \"expert-", e % 2,
                    "\"", e == 0 ? " servers: \"expert-1\"" : "", " } ");
  }
  absl::StatusOr<ServingConfig> config = ParseServingConfig(with_placements(all));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.explicit_placement[0][0], (std::vector<int>{0, 1}));
  EXPECT_EQ(config->cluster.explicit_placement[0][3], (std::vector<int>{1}));

  EXPECT_THAT(ErrorOf(with_placements(absl::StrReplaceAll(
                  all, {{"expert_id: 7 servers: \"expert-1\"",
                         "expert_id: 7 servers: \"expert-9\""}}))),
              HasSubstr("unknown server \"expert-9\""));
  EXPECT_THAT(ErrorOf(with_placements("experts { expert_id: 0 servers: \"expert-0\" }")),
              HasSubstr("expert 1 is not placed"));
  EXPECT_THAT(ErrorOf(with_placements("experts { expert_id: 8 servers: \"expert-0\" }")),
              HasSubstr("expert 8 is out of range [0, 8)"));
  EXPECT_THAT(ErrorOf(with_placements("experts { expert_id: 0 }")),
              HasSubstr("expert 0 has no server"));
  EXPECT_THAT(ErrorOf(with_placements(
                  "experts { expert_id: 0 servers: \"expert-0\" servers: \"expert-0\" }")),
              HasSubstr("listed twice"));
}

TEST(ModelConfigTest, DynamicNeedsALoadProfile) {
  const std::string base =
      With("strategy: PLACEMENT_STRATEGY_HYBRID", "strategy: PLACEMENT_STRATEGY_DYNAMIC LOAD");
  auto with_load = [&](absl::string_view load) {
    return absl::StrReplaceAll(base, {{"LOAD", load}});
  };
  EXPECT_THAT(ErrorOf(with_load("")),
              HasSubstr("cluster.load_profile.expert_load: expected 8 values"));
  EXPECT_THAT(ErrorOf(with_load("load_profile { expert_load: [1,1,1,1,1,1,1,-1] }")),
              HasSubstr("cluster.load_profile.expert_load[7]"));
  EXPECT_THAT(ErrorOf(with_load("load_profile { expert_load: [1,1,1,1,1,1,1,1] } "
                                "dynamic_options { slots_per_server: 3 }")),
              HasSubstr("3 slots x 2 servers cannot hold 8 experts"));
  absl::StatusOr<ServingConfig> config =
      ParseServingConfig(with_load("load_profile { expert_load: [8,1,1,1,1,1,1,1] }"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster.load_profile[0], 8.0);
}

TEST(ModelConfigTest, LoadsFilesAndNamesMissingOnes) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/serving.pbtxt");
  std::ofstream(path) << kValid;
  absl::StatusOr<ServingConfig> config = LoadServingConfig(path);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model.num_experts, 8);

  std::ofstream(path) << With("top_k: 2", "top_k: 0");
  EXPECT_THAT(LoadServingConfig(path).status().message(),
              HasSubstr(absl::StrCat("config ", path, ": model.top_k")));
  const absl::Status missing = LoadServingConfig(path + ".missing").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr(".missing"));
}

TEST(ModelConfigTest, TextRoundTrips) {
  const ServingConfig config = *ParseServingConfig(kValid);
  absl::StatusOr<ServingConfig> again = ParseServingConfig(ServingConfigToText(config));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ServingConfigToText(*again), ServingConfigToText(config));
  EXPECT_EQ(again->cluster.servers[1].name, "expert-1");
  EXPECT_EQ(again->model.top_k, 2);
}

TEST(ModelConfigTest, StrategyNamesRoundTrip) {
  for (PlacementStrategy s :
       {PlacementStrategy::kDataParallel, PlacementStrategy::kModelParallel,
        PlacementStrategy::kHybrid, PlacementStrategy::kDynamic,
        PlacementStrategy::kExplicit}) {
    EXPECT_EQ(*ParsePlacementStrategy(PlacementStrategyName(s)), s);
  }
  EXPECT_FALSE(ParsePlacementStrategy("RANDOM").ok());
}

}  // namespace
}  // namespace moe
