// Hugging Face checkpoints served as they are: tiny NLLB-MoE, Switch
// Transformers, Mixtral and Qwen2-MoE checkpoints that tests/hf_checkpoints.py
// wrote in the models' exact tensor names (sharded, F32/F16/BF16, among other tensors of the
// model), loaded with the model's checkpoint_layout into a cluster (router
// core, in-process expert servers on oneDNN kernels): its output, dL/dx,
// every gradient and one SGD step equal what PyTorch computed from the
// models' own definitions (Qwen2-MoE's with its shared expert). The directory comes from
// HF_CHECKPOINTS_DIR (tests/hf_checkpoint_test.sh runs the script first).
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/checkpoint.h"
#include "common/log.h"
#include "common/safetensors.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router_service/testing/in_process_cluster.h"

namespace moe {
namespace {

using ::moe::router::testing::Decoded;
using ::moe::router::testing::InProcessCluster;
using ::moe::router::testing::Wire;
using ::moe::testing::TensorNear;
using ::testing::HasSubstr;

constexpr int64_t kDModel = 16;

std::string Dir(const std::string& model) {
  const char* dir = std::getenv("HF_CHECKPOINTS_DIR");
  return absl::StrCat(dir == nullptr ? "" : dir, "/", model);
}

// The tensors PyTorch computed (expected.safetensors), by name.
class Expected {
 public:
  explicit Expected(const std::string& dir) {
    absl::StatusOr<SafetensorsReader> reader =
        SafetensorsReader::Open(absl::StrCat(dir, "/expected.safetensors"));
    MOE_CHECK(reader.ok(), reader.status().ToString());
    reader_.emplace(*std::move(reader));
  }
  FloatTensor Get(const std::string& name) const {
    const SafetensorsEntry* entry = reader_->Find(name);
    MOE_CHECK(entry != nullptr, name);
    FloatTensor t(entry->shape);
    MOE_CHECK(reader_->ReadFloats(*entry, t.mutable_values()).ok(), name);
    return t;
  }
  // An nn.Linear weight [out, in] in the x W layout [in, out].
  FloatTensor Transposed(const std::string& name) const {
    const FloatTensor t = Get(name);
    FloatTensor out({t.dim(1), t.dim(0)});
    for (int64_t r = 0; r < t.dim(0); ++r) {
      for (int64_t c = 0; c < t.dim(1); ++c) out.mutable_values()[c * t.dim(0) + r] = t.row(r)[c];
    }
    return out;
  }

 private:
  std::optional<SafetensorsReader> reader_;
};

struct Family {
  const char* name;
  CheckpointFamily family;
  const char* prefix;
  int top_k;
  bool renormalize;
  ExpertActivation activation;
  // The router's weight and an expert's module, after the prefix.
  const char* router;
  const char* expert_module;
  // The HF names of W1, b1, W2, b2, W3 after the expert's module (empty:
  // none).
  const char* tensors[5];
  // Qwen2-MoE's shared expert: its slices of d_ff (0: none).
  int shared_slices = 0;
};

const Family kFamilies[] = {
    {"nllb_moe",
     CheckpointFamily::kNllbMoe,
     "model.encoder.layers.3.ffn",
     2,
     true,
     ExpertActivation::kRelu,
     "router.classifier.weight",
     "experts.expert_",
     {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", ""}},
    {"switch_transformers",
     CheckpointFamily::kSwitchTransformers,
     "encoder.block.1.layer.1.mlp",
     1,
     false,
     ExpertActivation::kRelu,
     "router.classifier.weight",
     "experts.expert_",
     {"wi.weight", "", "wo.weight", "", ""}},
    {"mixtral",
     CheckpointFamily::kMixtral,
     "model.layers.1.block_sparse_moe",
     2,
     true,
     ExpertActivation::kSiluGated,
     "gate.weight",
     "experts.",
     {"w1.weight", "", "w2.weight", "", "w3.weight"}},
    {"qwen2_moe",
     CheckpointFamily::kQwen2Moe,
     "model.layers.0.mlp",
     2,
     false,
     ExpertActivation::kSiluGated,
     "gate.weight",
     "experts.",
     {"gate_proj.weight", "", "down_proj.weight", "", "up_proj.weight"},
     2},
};

bool AllZero(const FloatTensor& t) {
  return std::all_of(t.values().begin(), t.values().end(), [](float v) { return v == 0.0f; });
}

// Which of kAllExpertTensors are matrices (stored transposed).
bool IsMatrix(ExpertTensor which) {
  return which != ExpertTensor::kB1 && which != ExpertTensor::kB2;
}

ModelConfig ModelOf(const Family& f) {
  ModelConfig model;
  model.d_model = kDModel;
  model.d_ff = 24;
  model.num_experts = 4;
  model.top_k = f.top_k;
  model.gate.renormalize = f.renormalize;
  model.checkpoint_layout = {f.family, f.prefix};
  model.activation = f.activation;
  model.shared_slices = f.shared_slices;
  return model;
}

// The [rows, cols] block of `t` at (row, col).
FloatTensor Block(const FloatTensor& t, int64_t row, int64_t col, int64_t rows, int64_t cols) {
  FloatTensor out({rows, cols});
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(t.row(row + r).data() + col, cols, out.mutable_row(r).data());
  }
  return out;
}

// [rows, cols] -> [cols, rows].
FloatTensor Transpose(const FloatTensor& t) {
  FloatTensor out({t.dim(1), t.dim(0)});
  for (int64_t r = 0; r < t.dim(0); ++r) {
    for (int64_t c = 0; c < t.dim(1); ++c) out.mutable_values()[c * t.dim(0) + r] = t.row(r)[c];
  }
  return out;
}

// PyTorch's `kind` ("grad " or "stepped ") of the gate W_g in the x W
// layout [d_model, gate_width]: the router's, then the shared expert's gate.
FloatTensor ExpectedGate(const Expected& expected, const Family& f, const std::string& kind) {
  const FloatTensor router = expected.Transposed(absl::StrCat(kind, f.prefix, ".", f.router));
  if (f.shared_slices == 0) return router;
  const FloatTensor shared =
      expected.Transposed(absl::StrCat(kind, f.prefix, ".shared_expert_gate.weight"));
  FloatTensor gate({kDModel, router.dim(1) + 1});
  for (int64_t i = 0; i < kDModel; ++i) {
    std::copy_n(router.row(i).data(), router.dim(1), gate.mutable_row(i).data());
    gate.mutable_row(i)[router.dim(1)] = shared.row(i)[0];
  }
  return gate;
}

// PyTorch's `kind` of tensor `i` (kAllExpertTensors' order) of expert `e`
// in the x W layout: a routed expert's, or (e >= num_experts) that slice
// of the shared expert's; nullopt for a tensor the model does not have.
std::optional<FloatTensor> ExpectedExpertTensor(const Expected& expected, const Family& f,
                                                const ModelConfig& model, const std::string& kind,
                                                int e, int i) {
  const ExpertTensor which = kAllExpertTensors[i];
  if (e < model.num_experts) {
    if (f.tensors[i][0] == '\0') return std::nullopt;
    const std::string name =
        absl::StrCat(kind, f.prefix, ".", f.expert_module, e, ".", f.tensors[i]);
    return IsMatrix(which) ? expected.Transposed(name) : expected.Get(name);
  }
  const int64_t begin = (e - model.num_experts) * model.d_ff;
  const std::string shared = absl::StrCat(kind, f.prefix, ".shared_expert.");
  switch (which) {
    case ExpertTensor::kW1:
      return Transpose(
          Block(expected.Get(shared + "gate_proj.weight"), begin, 0, model.d_ff, model.d_model));
    case ExpertTensor::kW3:
      return Transpose(
          Block(expected.Get(shared + "up_proj.weight"), begin, 0, model.d_ff, model.d_model));
    case ExpertTensor::kW2:
      return Transpose(
          Block(expected.Get(shared + "down_proj.weight"), 0, begin, model.d_model, model.d_ff));
    default:
      return std::nullopt;
  }
}

class HfCheckpointTest : public ::testing::TestWithParam<Family> {};

TEST_P(HfCheckpointTest, TheClusterComputesWhatPyTorchDoes) {
  const Family& f = GetParam();
  const ModelConfig model = ModelOf(f);
  absl::StatusOr<MoeWeights> weights = LoadCheckpoint(Dir(f.name), model);
  ASSERT_TRUE(weights.ok()) << weights.status();
  const Expected expected(Dir(f.name));
  // HYBRID over 3 servers: experts 0-1 everywhere, 2 and 3 on one each; the
  // checkpoint's first shard holds experts 0-1, the second 2-3 (Qwen2-MoE:
  // 6 experts with the shared expert's 2 slices, 0-2 everywhere, the
  // slices from the second shard).
  InProcessCluster cluster(model, *std::move(weights), PlacementStrategy::kHybrid);

  // Inference (gated SiLU: the fused post-ops), then training.
  absl::StatusOr<router::Router::ForwardResult> served =
      cluster.Forward(Wire(expected.Get("x")), /*training=*/false);
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_TRUE(TensorNear(Decoded(served->y, kDModel), expected.Get("y"), 1e-5));
  absl::StatusOr<router::Router::ForwardResult> y =
      cluster.Forward(Wire(expected.Get("x")), /*training=*/true);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.Get("y"), 1e-5));
  absl::StatusOr<v1::Tensor> dx =
      cluster.Backward(y->request_id, Wire(expected.Get("grad_output")));
  ASSERT_TRUE(dx.ok()) << dx.status();
  EXPECT_TRUE(TensorNear(Decoded(*dx, kDModel), expected.Get("grad_input"), 1e-5));

  const FloatTensor gate_grad = cluster.KeptGateGradient();
  ASSERT_EQ(gate_grad.values().size(), size_t{kDModel} * model.gate_width());
  EXPECT_TRUE(TensorNear(gate_grad, ExpectedGate(expected, f, "grad "), 1e-5));
  // Each expert's gradient (the shared expert's slices too), summed over
  // its replicas.
  for (int e = 0; e < model.experts_per_layer(); ++e) {
    const ExpertWeights sum = cluster.SummedGradients(ExpertKey(0, e));
    for (int i = 0; i < 5; ++i) {
      const ExpertTensor which = kAllExpertTensors[i];
      const std::optional<FloatTensor> want =
          ExpectedExpertTensor(expected, f, model, "grad ", e, i);
      if (!want) {
        // Bias-free: no gradient is kept (a ReLU expert has no W3).
        EXPECT_TRUE(AllZero(sum.tensor(which))) << e;
      } else {
        EXPECT_TRUE(TensorNear(sum.tensor(which), *want, 1e-5))
            << "expert " << e << " tensor " << i;
      }
    }
  }

  // One SGD step: every replica holds torch.optim.SGD's weights (biases
  // of a bias-free model stay zero), the router the stepped gate.
  absl::StatusOr<router::StepCoordinator::Result> stepped = cluster.Step(0.1f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_TRUE(
      TensorNear(cluster.router.gate()->value, ExpectedGate(expected, f, "stepped "), 1e-5));
  for (int s = 0; s < cluster.placement.num_servers(); ++s) {
    for (ExpertKey key : cluster.placement.ExpertsOn(s)) {
      const expert::ExpertSnapshot now = *cluster.client.store(s).Snapshot(key);
      for (int i = 0; i < 5; ++i) {
        const ExpertTensor which = kAllExpertTensors[i];
        const FloatTensor& served = now.weights.tensor(which);
        const std::optional<FloatTensor> want =
            ExpectedExpertTensor(expected, f, model, "stepped ", key.expert, i);
        if (!want) {
          EXPECT_TRUE(AllZero(served)) << key << " tensor " << i;
        } else {
          EXPECT_TRUE(TensorNear(served, *want, 1e-5))
              << key << " tensor " << i << " on server " << s;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, HfCheckpointTest, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return std::string(info.param.name); });

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// A malformed Hugging Face checkpoint is an error naming the tensor or file.
TEST(HfCheckpointErrorsTest, EveryMalformedIndexIsANamedError) {
  const Family& nllb = kFamilies[0];
  const ModelConfig model = ModelOf(nllb);
  const std::string index = ReadFile(Dir(nllb.name) + "/model.safetensors.index.json");
  // A copy of the checkpoint whose index is `text`.
  int copies = 0;
  auto load_with_index = [&](const std::string& text, const ModelConfig& m) {
    const std::string dir = absl::StrCat(::testing::TempDir(), "/nllb_", ++copies);
    std::filesystem::copy(Dir(nllb.name), dir, std::filesystem::copy_options::recursive);
    std::ofstream(dir + "/model.safetensors.index.json", std::ios::trunc) << text;
    return LoadCheckpoint(dir, m).status();
  };
  const std::string bias = "model.encoder.layers.3.ffn.experts.expert_3.fc2.bias";
  // A tensor the index does not name.
  EXPECT_THAT(load_with_index(absl::StrReplaceAll(index, {{bias, "renamed"}}), model).message(),
              HasSubstr(absl::StrCat("the index has no tensor \"", bias, "\" [16]")));
  // A shard that is not there.
  const absl::Status missing = load_with_index(
      absl::StrReplaceAll(index, {{"model-00002-of-00002", "model-00003-of-00003"}}), model);
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr("model-00003-of-00003.safetensors: cannot open"));
  // The wrong shape, and the wrong module.
  ModelConfig wider = model;
  wider.d_ff = 25;
  EXPECT_THAT(LoadCheckpoint(Dir(nllb.name), wider).status().message(),
              HasSubstr("\"model.encoder.layers.3.ffn.experts.expert_0.fc1.weight\" has shape "
                        "[24, 16], the model needs [25, 16]"));
  ModelConfig elsewhere = model;
  elsewhere.checkpoint_layout.prefix = "model.decoder.layers.3.ffn";
  EXPECT_THAT(LoadCheckpoint(Dir(nllb.name), elsewhere).status().message(),
              HasSubstr("the index has no tensor \"model.decoder.layers.3.ffn.router.classifier"));
  // Its own names are not the model's.
  EXPECT_THAT(
      LoadCheckpoint(
          Dir(nllb.name),
          ModelOf(
              {"", CheckpointFamily::kMoeServe, "", 2, true, ExpertActivation::kRelu, "", "", {}}))
          .status()
          .message(),
      HasSubstr("the index has no tensor \"gate.weight\""));
}

}  // namespace
}  // namespace moe
