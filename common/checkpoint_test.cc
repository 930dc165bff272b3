#include "common/checkpoint.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "common/bfloat16.h"
#include "common/deterministic_init.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using ::testing::HasSubstr;

ModelConfig SmallModel(uint64_t seed = 1) {
  ModelConfig model;
  model.d_model = 6;
  model.d_ff = 10;
  model.num_experts = 3;
  model.top_k = 2;
  model.seed = seed;
  return model;
}

std::string TempPath(absl::string_view name) {
  return absl::StrCat(::testing::TempDir(), "/", name);
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A safetensors file from a JSON header and a data section.
std::string Safetensors(const nlohmann::json& header, const std::string& data) {
  const std::string text = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return out + text + data;
}

void ExpectSameWeights(const MoeWeights& a, const MoeWeights& b) {
  ASSERT_EQ(a.gate.has_value(), b.gate.has_value());
  if (a.gate) {
    EXPECT_EQ(*a.gate, *b.gate);
  }
  ASSERT_EQ(a.experts.size(), b.experts.size());
  for (const auto& [e, weights] : a.experts) {
    for (ExpertTensor which : kAllExpertTensors) {
      EXPECT_EQ(weights.tensor(which), b.experts.at(e).tensor(which)) << e;
    }
  }
}

TEST(DeterministicInitTest, SameSeedSameWeightsEverywhere) {
  const ModelConfig model = SmallModel(42);
  const MoeWeights all = InitAllWeights(model);
  // A server holding only expert 2 derives the same expert 2.
  const MoeWeights part = InitWeights(model, {2}, /*with_gate=*/false);
  EXPECT_FALSE(part.gate.has_value());
  EXPECT_EQ(part.experts.at(2).Digest(), all.experts.at(2).Digest());
  EXPECT_EQ(InitAllWeights(model).experts.at(0).Digest(), all.experts.at(0).Digest());
  EXPECT_NE(all.experts.at(0).Digest(), all.experts.at(1).Digest());
  EXPECT_NE(InitAllWeights(SmallModel(43)).experts.at(0).Digest(),
            all.experts.at(0).Digest());
}

TEST(DeterministicInitTest, FollowsTheDocumentedScheme) {
  const ModelConfig model = SmallModel(42);
  const MoeWeights all = InitAllWeights(model);
  const double bound1 = 1 / std::sqrt(6.0), bound2 = 1 / std::sqrt(10.0);
  // w1 is stored [d_model, d_ff]; element (i, o) is checkpoint index o * d_model + i.
  const ExpertWeights& e1 = all.experts.at(1);
  EXPECT_EQ(e1.w1.values()[2 * 10 + 7], InitValue(42, 16 + 4, 7 * 6 + 2, bound1));
  EXPECT_EQ(e1.b1.values()[3], InitValue(42, 17 + 4, 3, bound1));
  EXPECT_EQ(e1.w2.values()[4 * 6 + 5], InitValue(42, 18 + 4, 5 * 10 + 4, bound2));
  EXPECT_EQ(e1.b2.values()[1], InitValue(42, 19 + 4, 1, bound2));
  EXPECT_EQ(all.gate->values()[5 * 3 + 2], InitValue(42, 0, 2 * 6 + 5, bound1));
  for (float v : e1.w2.values()) EXPECT_LE(std::abs(v), bound2);
  // Other layers: the same scheme offset by 2^32 per layer.
  const uint64_t layer2 = uint64_t{2} << 32;
  EXPECT_EQ(InitExpert(model, ExpertKey(2, 1)).b1.values()[3],
            InitValue(42, layer2 + 17 + 4, 3, bound1));
  EXPECT_EQ(InitGate(model, 2).values()[5 * 3 + 2], InitValue(42, layer2, 2 * 6 + 5, bound1));
  // Gated SiLU experts: W3 at id 2^31 + e, zero biases; W1 unchanged.
  ModelConfig gated = model;
  gated.activation = ExpertActivation::kSiluGated;
  const ExpertWeights g1 = InitExpert(gated, ExpertKey(0, 1));
  EXPECT_EQ(g1.w3.values()[2 * 10 + 7], InitValue(42, (uint64_t{1} << 31) + 1, 7 * 6 + 2, bound1));
  EXPECT_EQ(g1.w1, e1.w1);
  EXPECT_EQ(g1.b1, FloatTensor({10}));
  EXPECT_TRUE(e1.w3.values().empty());
  // The values look uniform: mean near 0, both signs.
  double sum = 0;
  for (int i = 0; i < 100000; ++i) sum += InitValue(7, 3, i, 1.0);
  EXPECT_NEAR(sum / 100000, 0.0, 0.01);
}

// A sharded checkpoint of SmallModel in `dir`: the gate in shard 3, experts
// {0, 1} in shard 1 and {2} in shard 2, as the cluster writes one (a shard
// per server, the gate by the router), at `step`.
void WriteSharded(const std::string& dir, const ModelConfig& model, uint64_t step) {
  ASSERT_TRUE(MakeDirectories(dir).ok());
  const MoeWeights all = InitAllWeights(model);
  std::map<std::string, std::string> weight_map;
  int64_t total = 0;
  const std::vector<std::vector<int>> experts_of_shard = {{0, 1}, {2}};
  for (int shard = 1; shard <= 3; ++shard) {
    MoeWeights part;
    if (shard == 3) {
      part.gate = all.gate;
    } else {
      for (int e : experts_of_shard[shard - 1]) part.experts.emplace(e, all.experts.at(e));
    }
    std::vector<std::string> names;
    absl::StatusOr<int64_t> bytes = SaveCheckpointShard(
        absl::StrCat(dir, "/", ShardFileName(shard, 3)), model, part, DType::kFloat32, &names);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    total += *bytes;
    for (const std::string& name : names) weight_map[name] = ShardFileName(shard, 3);
  }
  ASSERT_TRUE(WriteCheckpointIndex(dir, model, weight_map, total, {step, "run-a"}).ok());
}

TEST(ShardedCheckpointTest, RoundTripsInTheHuggingFaceLayout) {
  const ModelConfig model = SmallModel();
  const std::string dir = TempPath("sharded/step-7");
  WriteSharded(dir, model, 7);
  EXPECT_EQ(ShardFileName(2, 3), "model-00002-of-00003.safetensors");
  // The index is what transformers' sharded loading reads.
  const nlohmann::json index = nlohmann::json::parse(ReadFile(dir + "/" + kCheckpointIndexName));
  EXPECT_EQ(index["weight_map"]["gate.weight"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["experts.2.w1.bias"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["metadata"]["total_size"], (3 * 6 + 3 * (2 * 6 * 10 + 10 + 6)) * 4);
  // Loads from the directory or the index file, with its step and lineage.
  for (const std::string& path : {dir, dir + "/" + kCheckpointIndexName}) {
    absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path, model);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ExpectSameWeights(*loaded, InitAllWeights(model));
    absl::StatusOr<CheckpointMetadata> metadata = ReadCheckpointMetadata(path);
    ASSERT_TRUE(metadata.ok());
    EXPECT_EQ(metadata->step, 7u);
    EXPECT_EQ(metadata->lineage, "run-a");
  }
  // A single file has no step.
  const std::string single = TempPath("single.safetensors");
  ASSERT_TRUE(SaveCheckpoint(single, model, InitAllWeights(model), DType::kFloat32).ok());
  EXPECT_EQ(ReadCheckpointMetadata(single)->step, 0u);
}

// The optimizer's state beside the weights: one shard holding both AdamW
// states of experts {0, 1, 2} and the gate, its own index; loaded back for
// the tensors selected; a missing state tensor or another step is a named
// error; a checkpoint without it loads as none.
TEST(ShardedCheckpointTest, OptimizerStateRoundTrips) {
  ModelConfig model = SmallModel();
  model.optimizer.type = OptimizerType::kAdamW;
  const std::string dir = TempPath("optimizer/step-4");
  WriteSharded(dir, model, 4);
  EXPECT_EQ(*LoadOptimizerState(dir, model, {}), std::nullopt);
  const MoeWeights m = InitAllWeights(model);
  ModelConfig other_seed = model;
  other_seed.seed += 1;
  const MoeWeights v = InitAllWeights(other_seed);
  std::vector<std::string> names;
  const std::string file = OptimizerShardFileName(1, 1);
  ASSERT_TRUE(SaveCheckpointShard(dir + "/" + file, model, {{"exp_avg", &m}, {"exp_avg_sq", &v}},
                                  DType::kFloat32, &names)
                  .ok());
  std::map<std::string, std::string> weight_map;
  for (const std::string& name : names) weight_map[name] = file;
  EXPECT_EQ(weight_map.count("experts.1.w2.weight.exp_avg_sq"), 1u);
  std::map<std::string, std::string> partial = weight_map;
  partial.erase("gate.weight.exp_avg");
  EXPECT_THAT(WriteOptimizerIndex(dir, model, partial, 0, {4, "run-a"}).message(),
              HasSubstr("gate.weight.exp_avg"));
  ASSERT_TRUE(WriteOptimizerIndex(dir, model, weight_map, 0, {4, "run-a"}).ok());
  absl::StatusOr<std::optional<std::vector<MoeWeights>>> loaded =
      LoadOptimizerState(dir, model, {/*gate=*/false, std::vector<int>{2}});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_TRUE(loaded->has_value());
  ASSERT_EQ((*loaded)->size(), 2u);
  EXPECT_EQ((**loaded)[0].experts.at(2).Digest(), m.experts.at(2).Digest());
  EXPECT_EQ((**loaded)[1].experts.at(2).Digest(), v.experts.at(2).Digest());
  EXPECT_EQ((**loaded)[1].experts.count(0), 0u);  // not selected: not read
  // Of another step than the weights: refused by name.
  ASSERT_TRUE(WriteOptimizerIndex(dir, model, weight_map, 0, {3, "run-a"}).ok());
  EXPECT_THAT(LoadOptimizerState(dir, model, {}).status().message(),
              HasSubstr("optimizer state of step 3, the weights are of step 4"));
}

TEST(ShardedCheckpointTest, RequestedPathsStayInTheCheckpointDirectory) {
  EXPECT_EQ(*ResolveCheckpointPath("/ckpt", "step-3/model-00001-of-00002.safetensors"),
            "/ckpt/step-3/model-00001-of-00002.safetensors");
  for (const char* hostile : {"", "../etc/passwd", "/etc/passwd", "step-3/../../x", "a//b",
                              "step-3/./x", "a/b\\c", "step 3/x", "a/b\n"}) {
    EXPECT_EQ(ResolveCheckpointPath("/ckpt", hostile).status().code(),
              absl::StatusCode::kInvalidArgument)
        << hostile;
  }
  EXPECT_EQ(ResolveCheckpointPath("", "a").status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ShardedCheckpointTest, TheLatestCompleteCheckpointIsFound) {
  const ModelConfig model = SmallModel();
  const std::string root = TempPath("latest");
  EXPECT_FALSE(FindLatestCheckpoint(root)->has_value());  // no directory yet
  WriteSharded(root + "/step-3", model, 3);
  WriteSharded(root + "/step-12", model, 12);
  // Torn (no index), mislabelled, and unrelated directories are skipped.
  WriteSharded(root + "/step-20", model, 20);
  ASSERT_EQ(std::remove((root + "/step-20/" + kCheckpointIndexName).c_str()), 0);
  WriteSharded(root + "/step-30", model, 29);
  ASSERT_TRUE(MakeDirectories(root + "/step-x").ok());
  ASSERT_TRUE(MakeDirectories(root + "/other").ok());
  absl::StatusOr<std::optional<LatestCheckpoint>> latest = FindLatestCheckpoint(root);
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->step, 12u);
  EXPECT_EQ((*latest)->path, root + "/step-12");
  // A restarted process resumes from it unless --checkpoint is later.
  absl::StatusOr<StartingCheckpoint> start = ChooseStartingCheckpoint("", root);
  ASSERT_TRUE(start.ok());
  EXPECT_EQ(start->path, root + "/step-12");
  EXPECT_EQ(start->metadata.step, 12u);
  EXPECT_EQ(start->metadata.lineage, "run-a");
  start = ChooseStartingCheckpoint(root + "/step-30", root);
  EXPECT_EQ(start->path, root + "/step-30");
  start = ChooseStartingCheckpoint(root + "/step-3", root);
  EXPECT_EQ(start->path, root + "/step-12");
  EXPECT_EQ(ChooseStartingCheckpoint("", "")->path, "");
}

TEST(ShardedCheckpointTest, ReadsOnlyTheShardsOfTheSelectedTensors) {
  const ModelConfig model = SmallModel();
  const std::string dir = TempPath("sharded/partial");
  WriteSharded(dir, model, 1);
  // Without shard 1, expert 2 and the gate still load; expert 0 cannot.
  ASSERT_EQ(std::remove((dir + "/" + ShardFileName(1, 3)).c_str()), 0);
  absl::StatusOr<MoeWeights> part = LoadCheckpoint(dir, model, {true, std::vector<int>{2}});
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(*part->gate, *InitAllWeights(model).gate);
  EXPECT_EQ(part->experts.size(), 1u);
  EXPECT_FALSE(LoadCheckpoint(dir, model, {false, std::vector<int>{0}}).ok());
}

TEST(ShardedCheckpointTest, AnIncompleteOrHostileIndexIsANamedError) {
  const ModelConfig model = SmallModel();
  const std::string dir = TempPath("sharded/hostile");
  WriteSharded(dir, model, 3);
  const std::string index_path = dir + "/" + kCheckpointIndexName;
  const nlohmann::json good = nlohmann::json::parse(ReadFile(index_path));
  auto load_with = [&](const nlohmann::json& index) {
    WriteFile(index_path, index.dump());
    return LoadCheckpoint(dir, model).status();
  };
  nlohmann::json escape = good;
  escape["weight_map"]["gate.weight"] = "../model-00003-of-00003.safetensors";
  EXPECT_THAT(load_with(escape).message(), HasSubstr("is not a .safetensors file name"));
  nlohmann::json absolute = good;
  absolute["weight_map"]["gate.weight"] = "/etc/passwd";
  EXPECT_THAT(load_with(absolute).message(), HasSubstr("is not a .safetensors file name"));
  nlohmann::json missing = good;
  missing["weight_map"].erase("experts.1.w2.bias");
  EXPECT_THAT(load_with(missing).message(), HasSubstr("no tensor \"experts.1.w2.bias\""));
  nlohmann::json extra = good;
  extra["weight_map"]["experts.9.w1.bias"] = "model-00001-of-00003.safetensors";
  EXPECT_THAT(load_with(extra).message(), HasSubstr("unexpected tensor \"experts.9.w1.bias\""));
  nlohmann::json bad_step = good;
  bad_step["metadata"]["step"] = "-1";
  EXPECT_THAT(
      ReadCheckpointMetadata((WriteFile(index_path, bad_step.dump()), dir)).status().message(),
      HasSubstr("metadata.step"));
  EXPECT_THAT(load_with(nlohmann::json::array()).message(), HasSubstr("not a JSON object"));
  WriteFile(index_path, "{\"weight_map\": ");
  EXPECT_THAT(LoadCheckpoint(dir, model).status().message(), HasSubstr("not a JSON object"));
  // A shard whose tensors have other shapes than the model's.
  WriteFile(index_path, good.dump());
  ASSERT_TRUE(LoadCheckpoint(dir, model).ok());
  ModelConfig wider = model;
  wider.d_ff = 12;
  EXPECT_THAT(LoadCheckpoint(dir, wider).status().message(),
              HasSubstr("has shape [10, 6], the model needs [12, 6]"));
  // No index: the directory was never completely written.
  ASSERT_EQ(std::remove(index_path.c_str()), 0);
  const absl::Status torn = LoadCheckpoint(dir, model).status();
  EXPECT_EQ(torn.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(torn.message(), HasSubstr("complete only once its index is written"));
  // The writer refuses an index that is not the whole model.
  std::map<std::string, std::string> partial = {{"gate.weight", ShardFileName(3, 3)}};
  EXPECT_THAT(WriteCheckpointIndex(dir, model, partial, 0, {}).message(),
              HasSubstr("no shard holds"));
}

TEST(CheckpointTest, NamesCarryTheLayerBeyondLayerZero) {
  EXPECT_EQ(GateTensorName(0), "gate.weight");
  EXPECT_EQ(ExpertTensorName(ExpertKey(0, 3), ExpertTensor::kW1), "experts.3.w1.weight");
  EXPECT_EQ(ExpertTensorName(ExpertKey(0, 3), ExpertTensor::kB2), "experts.3.w2.bias");
  EXPECT_EQ(GateTensorName(5), "layers.5.gate.weight");
  EXPECT_EQ(ExpertTensorName(ExpertKey(5, 0), ExpertTensor::kB1), "layers.5.experts.0.w1.bias");
}

// A model of several layers: one file holds every layer's tensors (layer
// 0's under today's names), each load reads one layer, LoadGates stacks
// the gates; a file missing a layer's tensor, or a one-layer file for a
// two-layer model, is a named error.
TEST(CheckpointTest, EveryLayerRoundTripsAndLoadsOneLayerAtATime) {
  ModelConfig model = SmallModel();
  model.num_layers = 3;
  std::vector<MoeWeights> layers;
  for (int l = 0; l < 3; ++l) layers.push_back(InitAllWeights(model, l));
  const std::string path = TempPath("layers.safetensors");
  ASSERT_TRUE(
      SaveCheckpoint(path, model, {&layers[2], &layers[0], &layers[1]}, DType::kFloat32).ok());
  for (int l = 0; l < 3; ++l) {
    absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path, model, {true, std::nullopt, l});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->layer, l);
    ExpectSameWeights(*loaded, layers[l]);
  }
  absl::StatusOr<MoeWeights> some = LoadCheckpoint(path, model, {false, std::vector<int>{1}, 2});
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_FALSE(some->gate.has_value());
  ASSERT_EQ(some->experts.size(), 1u);
  EXPECT_EQ(some->experts.at(1).w2, layers[2].experts.at(1).w2);
  absl::StatusOr<FloatTensor> gates = LoadGates(path, model);
  ASSERT_TRUE(gates.ok()) << gates.status();
  EXPECT_EQ(*gates, InitGates(model));
  EXPECT_THAT(LoadCheckpoint(path, model, {true, std::nullopt, 3}).status().message(),
              HasSubstr("layer 3 is out of range [0, 3)"));
  // Saving needs every layer once.
  EXPECT_THAT(
      SaveCheckpoint(path + ".part", model, {&layers[0], &layers[1]}, DType::kFloat32).message(),
      HasSubstr("layer 2 is missing"));
  // A one-layer file does not serve a three-layer model.
  const std::string one = TempPath("one_layer.safetensors");
  ASSERT_TRUE(SaveCheckpoint(one, SmallModel(), layers[0], DType::kFloat32).ok());
  EXPECT_THAT(LoadCheckpoint(one, model).status().message(),
              HasSubstr("missing tensor \"layers.1.gate.weight\""));
}

// A Hugging Face model's MoE layers by their number in the model: the
// prefix's "{layer}" becomes layer_numbers[l].
TEST(CheckpointTest, HuggingFaceLayersAreFoundByTheirNumber) {
  ModelConfig model = SmallModel();
  model.num_layers = 2;
  model.checkpoint_layout = {
      CheckpointFamily::kNllbMoe, "model.encoder.layers.{layer}.ffn", {3, 7}};
  EXPECT_EQ(model.checkpoint_layout.LayerPrefix(1), "model.encoder.layers.7.ffn");
  // Written with the names NLLB-MoE uses (nn.Linear layout), plus a dense
  // layer's tensor that is not read.
  SafetensorsWriter writer;
  std::vector<std::vector<float>> data;
  auto add = [&](const std::string& name, Shape shape, float base) {
    std::vector<float> values(NumElements(shape));
    for (size_t i = 0; i < values.size(); ++i) values[i] = base + 0.001f * static_cast<float>(i);
    data.push_back(std::move(values));
    writer.Add(name, shape, data.back());
  };
  data.reserve(64);
  for (int number : {3, 7}) {
    const std::string p = absl::StrCat("model.encoder.layers.", number, ".ffn.");
    add(p + "router.classifier.weight", {3, 6}, number);
    for (int e = 0; e < 3; ++e) {
      const std::string m = absl::StrCat(p, "experts.expert_", e, ".");
      add(m + "fc1.weight", {10, 6}, number + e);
      add(m + "fc1.bias", {10}, number + e + 0.5f);
      add(m + "fc2.weight", {6, 10}, -number - e);
      add(m + "fc2.bias", {6}, -number - e - 0.5f);
    }
  }
  add("model.encoder.layers.4.fc1.weight", {2, 2}, 0);
  const std::string path = TempPath("nllb_layers.safetensors");
  ASSERT_TRUE(writer.Write(path, DType::kFloat32).ok());
  absl::StatusOr<MoeWeights> layer1 = LoadCheckpoint(path, model, {true, std::nullopt, 1});
  ASSERT_TRUE(layer1.ok()) << layer1.status();
  // W_g [d_model, E] from the router's [E, d_model]: element (i, e) is
  // 7 + 0.001 (e d_model + i).
  EXPECT_FLOAT_EQ(layer1->gate->values()[1 * 3 + 2], 7 + 0.001f * (2 * 6 + 1));
  EXPECT_FLOAT_EQ(layer1->experts.at(2).b1.values()[0], 9.5f);
  // Without layer 7's tensors: the missing one is named.
  model.checkpoint_layout.layer_numbers = {3, 8};
  EXPECT_THAT(LoadCheckpoint(path, model, {true, std::nullopt, 0}).status().message(),
              HasSubstr("missing tensor \"model.encoder.layers.8.ffn.router.classifier.weight\""));
}

TEST(CheckpointTest, Fp32RoundTripIsBitExact) {
  const ModelConfig model = SmallModel();
  const MoeWeights weights = InitAllWeights(model);
  const std::string path = TempPath("fp32.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, model, weights, DType::kFloat32).ok());
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path, model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameWeights(*loaded, weights);
}

// Gated SiLU experts keep W3 as experts.{e}.w3.weight; a ReLU model's file
// has none, and a gated model does not load it (W3 missing, by name).
TEST(CheckpointTest, GatedExpertsRoundTripWithTheirW3) {
  ModelConfig gated = SmallModel();
  gated.activation = ExpertActivation::kSiluGated;
  const MoeWeights weights = InitAllWeights(gated);
  ASSERT_TRUE(weights.experts.at(0).gated());
  const std::string path = TempPath("gated.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, gated, weights, DType::kFloat32).ok());
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path, gated);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameWeights(*loaded, weights);
  EXPECT_EQ(ExpertTensorName(ExpertKey(0, 2), ExpertTensor::kW3), "experts.2.w3.weight");
  // Bias-free: zero biases, stored as such.
  EXPECT_EQ(loaded->experts.at(1).b1, FloatTensor({10}));

  const std::string relu_path = TempPath("relu_for_gated.safetensors");
  ASSERT_TRUE(
      SaveCheckpoint(relu_path, SmallModel(), InitAllWeights(SmallModel()), DType::kFloat32).ok());
  EXPECT_THAT(LoadCheckpoint(relu_path, gated).status().message(),
              HasSubstr("missing tensor \"experts.0.w3.weight\" [10, 6]"));
  EXPECT_THAT(LoadCheckpoint(path, SmallModel()).status().message(),
              HasSubstr("unexpected tensor \"experts.0.w3.weight\""));
}

TEST(CheckpointTest, StoresPyTorchLayout) {
  const ModelConfig model = SmallModel();
  const MoeWeights weights = InitAllWeights(model);
  const std::string path = TempPath("layout.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, model, weights, DType::kFloat32).ok());
  absl::StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok());
  const SafetensorsEntry* w1 = reader->Find("experts.2.w1.weight");
  ASSERT_NE(w1, nullptr);
  EXPECT_EQ(w1->shape, Shape({10, 6}));  // [d_ff, d_model]
  std::vector<float> values(60);
  ASSERT_TRUE(reader->ReadFloats(*w1, absl::MakeSpan(values)).ok());
  // Stored[o, i] == memory[i, o].
  EXPECT_EQ(values[7 * 6 + 2], weights.experts.at(2).w1.values()[2 * 10 + 7]);
  EXPECT_EQ(reader->Find("gate.weight")->shape, Shape({3, 6}));
  EXPECT_EQ(reader->Find("experts.0.w2.bias")->shape, Shape({6}));
}

TEST(CheckpointTest, Bf16RoundTripRoundsEachValueOnce) {
  const ModelConfig model = SmallModel();
  const MoeWeights weights = InitAllWeights(model);
  const std::string path = TempPath("bf16.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, model, weights, DType::kBFloat16).ok());
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path, model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const auto original = weights.experts.at(1).w2.values();
  const auto rounded = loaded->experts.at(1).w2.values();
  for (size_t i = 0; i < original.size(); ++i) {
    EXPECT_EQ(rounded[i], Bf16ToFloat(FloatToBf16(original[i])));
  }
  // 426 values at 2 bytes instead of 4; headers are about the same size.
  const std::string fp32_path = TempPath("bf16_vs_fp32.safetensors");
  ASSERT_TRUE(SaveCheckpoint(fp32_path, model, weights, DType::kFloat32).ok());
  EXPECT_NEAR(static_cast<double>(ReadFile(fp32_path).size()) - ReadFile(path).size(),
              852.0, 40.0);
}

TEST(CheckpointTest, LoadsOnlyTheSelectedExperts) {
  const ModelConfig model = SmallModel();
  const std::string path = TempPath("select.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, model, InitAllWeights(model), DType::kFloat32).ok());
  absl::StatusOr<MoeWeights> part =
      LoadCheckpoint(path, model, {/*gate=*/false, std::vector<int>{0, 2}});
  ASSERT_TRUE(part.ok()) << part.status();
  ExpectSameWeights(*part, InitWeights(model, {0, 2}, false));
  EXPECT_THAT(LoadCheckpoint(path, model, {true, std::vector<int>{3}}).status().message(),
              HasSubstr("expert 3 is out of range"));
}

class MalformedCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = TempPath("good.safetensors");
    ASSERT_TRUE(SaveCheckpoint(path_, model_, InitAllWeights(model_), DType::kFloat32).ok());
    good_ = ReadFile(path_);
  }

  // The error of loading `bytes` as a checkpoint of model_.
  std::string ErrorOf(const std::string& bytes) {
    const std::string bad = TempPath("bad.safetensors");
    WriteFile(bad, bytes);
    absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(bad, model_);
    EXPECT_FALSE(loaded.ok());
    return std::string(loaded.status().message());
  }

  ModelConfig model_ = SmallModel();
  std::string path_;
  std::string good_;
};

TEST_F(MalformedCheckpointTest, EveryTruncationIsAnError) {
  for (size_t size = 0; size < good_.size(); size += 1 + size / 8) {
    EXPECT_FALSE(ErrorOf(good_.substr(0, size)).empty()) << size;
  }
  EXPECT_THAT(ErrorOf(good_.substr(0, 5)), HasSubstr("truncated"));
  EXPECT_THAT(ErrorOf(good_.substr(0, good_.size() - 4)), HasSubstr("out of range"));
}

TEST_F(MalformedCheckpointTest, BadJsonAndBadHeaders) {
  std::string bad_json = good_;
  bad_json[9] = '[';
  EXPECT_THAT(ErrorOf(bad_json), HasSubstr("not a JSON object"));
  std::string huge_length = good_;
  huge_length[7] = 0x7f;
  EXPECT_THAT(ErrorOf(huge_length), HasSubstr("exceeds the file"));
  EXPECT_THAT(ErrorOf(Safetensors({{"gate.weight", 3}}, "")), HasSubstr("not an object"));
  EXPECT_THAT(ErrorOf(Safetensors(
                  {{"gate.weight", {{"dtype", "F128"}, {"shape", {3, 6}},
                                    {"data_offsets", {0, 144}}}}},
                  std::string(144, '\0'))),
              HasSubstr("unknown dtype \"F128\""));
  EXPECT_THAT(ErrorOf(Safetensors(
                  {{"gate.weight", {{"dtype", "F32"}, {"shape", {3, -6}},
                                    {"data_offsets", {0, 72}}}}},
                  std::string(72, '\0'))),
              HasSubstr("non-negative integer"));
  EXPECT_THAT(ErrorOf(Safetensors(
                  {{"gate.weight", {{"dtype", "F32"}, {"shape", {3, 6}},
                                    {"data_offsets", {0, 10}}}}},
                  std::string(72, '\0'))),
              HasSubstr("needs 72"));
  EXPECT_THAT(ErrorOf(Safetensors(
                  {{"gate.weight", {{"dtype", "F32"}, {"shape", {3, 6}},
                                    {"data_offsets", {16, 88}}}}},
                  std::string(72, '\0'))),
              HasSubstr("out of range"));
  EXPECT_THAT(ErrorOf(Safetensors({{"gate.weight", {{"dtype", "F32"}}}}, "")),
              HasSubstr("no shape"));
}

// Real checkpoints are mostly BF16 or F16 and hold integer buffers too:
// F16 reads exactly as floats, another dtype is named when read.
TEST(SafetensorsTest, ReadsF16AndNamesTheWrongDtype) {
  // 1, -2, the smallest subnormal 2^-24, the largest finite 65504, -0.
  const uint16_t halves[] = {0x3C00, 0xC000, 0x0001, 0x7BFF, 0x8000};
  std::string data(reinterpret_cast<const char*>(halves), sizeof(halves));
  data += std::string(16, '\1');
  const std::string path = TempPath("f16.safetensors");
  WriteFile(path, Safetensors({{"a", {{"dtype", "F16"}, {"shape", {5}}, {"data_offsets", {0, 10}}}},
                               {"b", {{"dtype", "I64"}, {"shape", {2}}, {"data_offsets", {10, 26}}}}},
                              data));
  absl::StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::vector<float> a(5);
  ASSERT_TRUE(reader->ReadFloats(*reader->Find("a"), absl::MakeSpan(a)).ok());
  EXPECT_EQ(a, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24), 65504.0f, -0.0f}));
  EXPECT_TRUE(std::signbit(a[4]));
  std::vector<float> b(2);
  EXPECT_THAT(reader->ReadFloats(*reader->Find("b"), absl::MakeSpan(b)).message(),
              HasSubstr("tensor \"b\" is I64, the wrong dtype for weights"));
}

TEST_F(MalformedCheckpointTest, AWeightOfAnotherDtypeIsNamed) {
  // The good checkpoint with expert 1's w2.bias stored as I32 (same bytes).
  absl::StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path_);
  ASSERT_TRUE(reader.ok());
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const SafetensorsEntry& entry : reader->entries()) {
    std::vector<float> values(NumElements(entry.shape));
    ASSERT_TRUE(reader->ReadFloats(entry, absl::MakeSpan(values)).ok());
    header[entry.name] = {{"dtype", entry.name == "experts.1.w2.bias" ? "I32" : "F32"},
                          {"shape", entry.shape},
                          {"data_offsets", {data.size(), data.size() + values.size() * 4}}};
    data.append(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  }
  const std::string path = TempPath("int_bias.safetensors");
  WriteFile(path, Safetensors(header, data));
  EXPECT_THAT(LoadCheckpoint(path, model_).status().message(),
              HasSubstr("tensor \"experts.1.w2.bias\" is I32, the wrong dtype"));
}

TEST_F(MalformedCheckpointTest, WrongModelShapesAndNames) {
  ModelConfig wider = model_;
  wider.d_ff = 11;
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(path_, wider);
  EXPECT_THAT(loaded.status().message(),
              HasSubstr("\"experts.0.w1.weight\" has shape [10, 6], the model needs [11, 6]"));
  ModelConfig more = model_;
  more.num_experts = 4;
  EXPECT_THAT(LoadCheckpoint(path_, more).status().message(),
              HasSubstr("\"gate.weight\" has shape [3, 6], the model needs [4, 6]"));
  ModelConfig fewer = model_;
  fewer.num_experts = 2;
  EXPECT_THAT(LoadCheckpoint(path_, fewer).status().message(),
              HasSubstr("shape"));

  // Missing and unexpected tensors.
  MoeWeights weights = InitAllWeights(model_);
  SafetensorsWriter writer;
  writer.Add("gate.weight", {3, 6}, weights.gate->values());
  const std::string partial = TempPath("partial.safetensors");
  ASSERT_TRUE(writer.Write(partial, DType::kFloat32).ok());
  EXPECT_THAT(LoadCheckpoint(partial, model_).status().message(),
              HasSubstr("missing tensor \"experts.0.w1.weight\" [10, 6]"));
  EXPECT_EQ(LoadCheckpoint(TempPath("absent.safetensors"), model_).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(MalformedCheckpointTest, UnexpectedTensorIsNamed) {
  const MoeWeights weights = InitAllWeights(model_);
  ModelConfig bigger = model_;
  bigger.num_experts = 4;
  MoeWeights four = InitAllWeights(bigger);
  const std::string path = TempPath("four.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, bigger, four, DType::kFloat32).ok());
  // The 4-expert gate does not fit; make the gate right and keep expert 3.
  absl::StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok());
  SafetensorsWriter writer;
  std::vector<std::vector<float>> keep;
  for (const SafetensorsEntry& entry : reader->entries()) {
    keep.emplace_back(NumElements(entry.shape));
    ASSERT_TRUE(reader->ReadFloats(entry, absl::MakeSpan(keep.back())).ok());
    if (entry.name == "gate.weight") {
      writer.Add(entry.name, {3, 6}, absl::MakeSpan(keep.back()).subspan(0, 18));
    } else {
      writer.Add(entry.name, entry.shape, keep.back());
    }
  }
  const std::string extra = TempPath("extra.safetensors");
  ASSERT_TRUE(writer.Write(extra, DType::kFloat32).ok());
  EXPECT_THAT(LoadCheckpoint(extra, model_).status().message(),
              HasSubstr("unexpected tensor \"experts.3."));
}

}  // namespace
}  // namespace moe
