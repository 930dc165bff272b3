// The Python client (clients/python) against a real local cluster serving a
// checkpoint: runs clients/python/client_test.py with Debian's python3, which
// checks outputs and gradients against a numpy layer built from the same
// checkpoint.
#include <sys/stat.h>

#include <cstdlib>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/model_config.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::RunfilePath;

// Starts a local cluster of `config` on `checkpoint`, runs the Python
// `script` against its router (then the checkpoint and `args`) with
// Debian's python3, expects it to exit 0, and returns (and prints) what it
// wrote.
std::string RunAgainstCluster(const ServingConfig& config, const std::string& checkpoint,
                              const std::string& dir, const std::string& checkpoint_dir,
                              const std::string& script, const std::vector<std::string>& args) {
  local::LocalClusterOptions options;
  options.config = config;
  options.checkpoint_path = checkpoint;
  options.work_dir = dir;
  options.checkpoint_dir = checkpoint_dir;
  options.onednn_threads = 1;
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  EXPECT_TRUE(cluster.ok()) << cluster.status();
  if (!cluster.ok()) return "";
  const std::string root = RunfilePath("");
  setenv("PYTHONPATH", absl::StrCat(root, ":", root, "clients/python").c_str(), 1);
  std::vector<std::string> argv = {RunfilePath(script), (*cluster)->router_address(), checkpoint};
  argv.insert(argv.end(), args.begin(), args.end());
  ChildProcess python("/usr/bin/python3", argv);
  EXPECT_EQ(python.Stop(0, absl::Seconds(120)), 0) << python.output();
  std::cout << python.output();
  return python.output();
}

TEST(PythonClientTest, AgreesWithANumpyLayerOnTheSameCheckpoint) {
  const std::string dir = ::testing::TempDir();
  const ServingConfig config = *ParseServingConfig(R"pb(
    model { d_model: 40 d_ff: 72 num_experts: 6 top_k: 2 seed: 8 }
    cluster {
      servers { name: "a" address: "127.0.0.1:1" }
      servers { name: "b" address: "127.0.0.1:2" }
      strategy: PLACEMENT_STRATEGY_HYBRID
    }
  )pb");
  const std::string checkpoint = dir + "/model.safetensors";
  ASSERT_TRUE(
      SaveCheckpoint(checkpoint, config.model, InitAllWeights(config.model), DType::kFloat32).ok());
  const std::string output = RunAgainstCluster(config, checkpoint, dir, dir + "/saved",
                                               "clients/python/client_test.py", {"2", "save"});
  EXPECT_THAT(output, ::testing::HasSubstr("python client: all checks passed"));
  EXPECT_THAT(output, ::testing::HasSubstr("checkpoint of step 1: " + dir + "/saved/step-1"));
  // A stream of four batches, the third refused on its own.
  EXPECT_THAT(output, ::testing::HasSubstr("stream batch 3 (1 tokens)"));
  EXPECT_THAT(output, ::testing::HasSubstr("stream batch 2: (<StatusCode.INVALID_ARGUMENT"));
  EXPECT_THAT(output, ::testing::HasSubstr("placement epoch 1, step 0"));
}

// A cluster of three MoE layers on three servers: the client's layer
// argument, example.py's layer-by-layer pass and a stream mixing layers
// (clients/python/layers_test.py) against numpy on the same checkpoint.
TEST(PythonClientTest, RunsAModelOfSeveralLayersLayerByLayer) {
  const std::string dir = ::testing::TempDir() + "/layers";
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  const ServingConfig config = *ParseServingConfig(R"pb(
    model { d_model: 24 d_ff: 40 num_experts: 4 top_k: 2 seed: 5 num_layers: 3 }
    cluster {
      servers { name: "a" address: "127.0.0.1:1" }
      servers { name: "b" address: "127.0.0.1:2" }
      servers { name: "c" address: "127.0.0.1:3" }
      strategy: PLACEMENT_STRATEGY_MODEL_PARALLEL
    }
  )pb");
  std::vector<MoeWeights> layers;
  for (int l = 0; l < 3; ++l) layers.push_back(InitAllWeights(config.model, l));
  const std::string checkpoint = dir + "/model.safetensors";
  ASSERT_TRUE(SaveCheckpoint(checkpoint, config.model, {&layers[0], &layers[1], &layers[2]},
                             DType::kFloat32)
                  .ok());
  const std::string output =
      RunAgainstCluster(config, checkpoint, dir, "", "clients/python/layers_test.py", {"2"});
  EXPECT_THAT(output, ::testing::HasSubstr("python client, layers: all checks passed"));
  EXPECT_THAT(output, ::testing::HasSubstr("stream batch 5 (layer 2)"));
}

}  // namespace
}  // namespace moe::testing
