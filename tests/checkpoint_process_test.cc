// Durable checkpoints on a real cluster: train, SaveCheckpoint while
// Forwards run, and a fresh cluster started from the checkpoint serves the
// same outputs and goes on training from the next step, equal to the
// reference.
#include <sys/stat.h>

#include <atomic>
#include <csignal>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int kDModel = 32;
constexpr int kTokens = 64;
constexpr float kLearningRate = 0.05f;

ProcessClusterOptions Cluster(const std::string& checkpoint_dir, const std::string& load,
                              const std::string& optimizer = "type: OPTIMIZER_TYPE_SGD") {
  ProcessClusterOptions options;
  options.model =
      absl::StrCat("d_model: ", kDModel, " d_ff: 64 num_experts: 4 top_k: 2 seed: 17 optimizer { ",
                   optimizer, " }");
  options.strategy = "HYBRID";
  options.num_servers = 2;
  for (auto* flags : {&options.server_flags, &options.router_flags}) {
    if (!checkpoint_dir.empty()) flags->push_back("--checkpoint_dir=" + checkpoint_dir);
    if (!load.empty()) flags->push_back("--checkpoint=" + load);
  }
  return options;
}

void TrainStep(ProcessCluster& cluster, ReferenceTraining& reference, int seed) {
  const FloatTensor x = RandomTensor({kTokens, kDModel}, seed);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, seed + 1);
  const ReferenceTraining::Step expected = reference.Train(x, dy, kLearningRate);
  v1::ForwardResponse y;
  ASSERT_TRUE(cluster.Forward(x, &y, /*training=*/true).ok());
  ASSERT_TRUE(TensorNear(Decoded(y.y(), kDModel), expected.forward.y, 1e-5)) << "seed " << seed;
  v1::BackwardResponse dx;
  ASSERT_TRUE(cluster.Backward(y.request_id(), dy, &dx).ok());
  v1::StepResponse stepped;
  const grpc::Status status = cluster.Step(kLearningRate, absl::Seconds(30), &stepped);
  ASSERT_TRUE(status.ok()) << status.error_message();
}

grpc::Status Save(ProcessCluster& cluster, v1::SaveCheckpointResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  return cluster.stub().SaveCheckpoint(&context, v1::SaveCheckpointRequest(), response);
}

// The optimizer's state is part of the checkpoint: AdamW's moments (of the
// gate and every expert) are saved beside the weights, and a fresh cluster
// from the checkpoint trains on exactly as the uninterrupted run would.
TEST(CheckpointTest, AdamWStateIsSavedAndTrainingResumesExactly) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/adamw_checkpoints");
  const std::string adamw = "type: OPTIMIZER_TYPE_ADAMW max_grad_norm: 1.0";
  ProcessCluster cluster(Cluster(dir, "", adamw));
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 40 + 10 * step));
  }
  v1::SaveCheckpointResponse saved;
  const grpc::Status status = Save(cluster, &saved);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  std::ifstream index_file(saved.directory() + "/" + kOptimizerIndexName);
  const nlohmann::json index = nlohmann::json::parse(index_file);
  EXPECT_EQ(index["metadata"]["step"], "2");
  EXPECT_EQ(index["weight_map"].size(), 2u * (1 + 4 * 4));
  EXPECT_EQ(index["weight_map"]["gate.weight.exp_avg_sq"], "optimizer-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"].count("experts.3.w2.bias.exp_avg"), 1u);

  ProcessCluster resumed(Cluster("", saved.directory(), adamw));
  EXPECT_THAT(resumed.ServerLog(0), ::testing::Not(HasSubstr("holds no optimizer state")));
  for (int step = 3; step <= 4; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(resumed, reference, 40 + 10 * step));
  }
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 999);
  v1::ForwardResponse y;
  ASSERT_TRUE(resumed.Forward(x, &y).ok());
  EXPECT_TRUE(TensorNear(Decoded(y.y(), kDModel), reference.Layer().Forward(x)->y, 1e-5));
}

TEST(CheckpointTest, AFreshClusterFromACheckpointServesAndTrainsOnWhereTheOldOneWas) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/checkpoints");
  ProcessCluster cluster(Cluster(dir, ""));
  const ModelConfig& model = cluster.config().model;
  ReferenceTraining reference(model, InitAllWeights(model));
  for (int step = 1; step <= 2; ++step) {
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10 * step));
  }

  // Save while a client keeps sending Forwards: none fails.
  std::atomic<bool> saving{true};
  std::atomic<int> forwards{0}, failures{0};
  std::thread load([&] {
    while (saving.load()) {
      v1::ForwardResponse y;
      if (!cluster.Forward(RandomTensor({kTokens, kDModel}, 3), &y).ok()) ++failures;
      ++forwards;
    }
  });
  v1::SaveCheckpointResponse saved;
  const grpc::Status status = Save(cluster, &saved);
  saving = false;
  load.join();
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
  EXPECT_EQ(failures.load(), 0) << "of " << forwards.load();
  EXPECT_EQ(saved.step(), 2u);
  EXPECT_EQ(saved.directory(), dir + "/step-2");
  // A shard per server (each expert once), then the gate's.
  EXPECT_THAT(saved.files(),
              ElementsAre("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                          "model-00003-of-00003.safetensors"));
  EXPECT_EQ(saved.bytes(), (kDModel * 4 + 4 * (2 * kDModel * 64 + 64 + kDModel)) * 4);
  EXPECT_EQ(saved.lineage().size(), 32u);
  std::ifstream index_file(saved.directory() + "/" + kCheckpointIndexName);
  const nlohmann::json index = nlohmann::json::parse(index_file);
  EXPECT_EQ(index["metadata"]["step"], "2");
  EXPECT_EQ(index["metadata"]["lineage"], saved.lineage());
  EXPECT_EQ(index["weight_map"]["gate.weight"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"].size(), 1u + 4 * 4);

  // The checkpoint holds the reference's weights at step 2.
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(saved.directory(), model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(TensorNear(*loaded->gate, *reference.weights().gate, 1e-5));
  for (int e = 0; e < 4; ++e) {
    EXPECT_TRUE(TensorNear(loaded->experts.at(e).w1, reference.weights().experts.at(e).w1, 1e-5));
  }

  // A fresh cluster from it: the same outputs as the running one, at step 2.
  ProcessCluster resumed(Cluster("", saved.directory()));
  v1::InfoResponse info;
  ASSERT_TRUE(resumed.Info(1, &info).ok());
  EXPECT_EQ(info.step(), 2u);
  for (int i = 0; i < 3; ++i) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 700 + i);
    v1::ForwardResponse before, after;
    ASSERT_TRUE(cluster.Forward(x, &before).ok());
    const grpc::Status served = resumed.Forward(x, &after);
    ASSERT_TRUE(served.ok()) << served.error_message() << "\n" << resumed.RouterLog();
    EXPECT_TRUE(TensorNear(Decoded(after.y(), kDModel), Decoded(before.y(), kDModel), 1e-6));
  }
  // Training goes on at step 3, equal to the reference.
  ASSERT_NO_FATAL_FAILURE(TrainStep(resumed, reference, 30));
  ASSERT_TRUE(resumed.Info(0, &info).ok());
  EXPECT_EQ(info.step(), 3u);
  // This cluster has no --checkpoint_dir: saving is refused by name.
  v1::SaveCheckpointResponse refused;
  const grpc::Status no_dir = Save(resumed, &refused);
  EXPECT_EQ(no_dir.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(no_dir.error_message(), HasSubstr("--checkpoint_dir"));

  // The command line asks for one too (the first cluster is still at step
  // 2: the same checkpoint again).
  local::ChildProcess save(local::RunfilePath("clients/cpp/moe_client"),
                           {"--router=" + cluster.router_address(), "--save_checkpoint"});
  EXPECT_TRUE(save.WaitForLine("checkpoint of step 2 (lineage " + saved.lineage() + ") in " +
                                   saved.directory() + ": 3 file(s)",
                               absl::Seconds(60)))
      << save.output();
  save.WaitForLine("no such line", absl::Seconds(30));  // returns at its exit
  EXPECT_EQ(save.Stop(SIGTERM, absl::Seconds(10)), 0) << save.output();
}

// A save killed mid-write (the router SIGKILLed while one server has
// written its shard and the other is stopped) leaves a directory without an
// index: it never replaces the previous checkpoint. A fresh cluster resumes
// from the last complete one, and saving that step again completes it.
TEST(CheckpointTest, ASaveKilledMidWriteNeverReplacesThePreviousCheckpoint) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/torn_checkpoints");
  const FloatTensor probe = RandomTensor({kTokens, kDModel}, 800);
  v1::ForwardResponse at_step_1;
  {
    ProcessCluster cluster(Cluster(dir, ""));
    const ModelConfig& model = cluster.config().model;
    ReferenceTraining reference(model, InitAllWeights(model));
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 10));
    v1::SaveCheckpointResponse saved;
    const grpc::Status status = Save(cluster, &saved);
    ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << cluster.RouterLog();
    ASSERT_EQ(saved.directory(), dir + "/step-1");
    ASSERT_TRUE(cluster.Forward(probe, &at_step_1).ok());
    ASSERT_NO_FATAL_FAILURE(TrainStep(cluster, reference, 20));

    // Server 1 stopped: server 0 writes its shard of step 2, then the
    // router dies before it can write the gate and the index.
    cluster.PauseServer(1);
    std::thread save([&] {
      v1::SaveCheckpointResponse ignored;
      EXPECT_FALSE(Save(cluster, &ignored).ok());
    });
    const std::string first_shard = dir + "/step-2/model-00001-of-00003.safetensors";
    struct stat file;
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (stat(first_shard.c_str(), &file) != 0 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(10));  // polling for the shard to appear
    }
    const bool shard_written = stat(first_shard.c_str(), &file) == 0;
    cluster.KillRouter();
    save.join();
    cluster.ContinueServer(1);
    ASSERT_TRUE(shard_written) << cluster.ServerLog(0);
  }
  struct stat index;
  EXPECT_NE(stat((dir + "/step-2/" + kCheckpointIndexName).c_str(), &index), 0);
  absl::StatusOr<std::optional<LatestCheckpoint>> latest = FindLatestCheckpoint(dir);
  ASSERT_TRUE(latest.ok() && latest->has_value()) << latest.status();
  EXPECT_EQ((*latest)->step, 1u);

  // A fresh cluster on the same directory starts from step 1, answers as
  // the old one did there, trains step 2 again and saves it whole.
  ProcessCluster resumed(Cluster(dir, ""));
  const ModelConfig& model = resumed.config().model;
  const absl::Status torn = LoadCheckpoint(dir + "/step-2", model).status();
  EXPECT_EQ(torn.code(), absl::StatusCode::kNotFound) << torn;
  v1::InfoResponse info;
  ASSERT_TRUE(resumed.Info(0, &info).ok());
  EXPECT_EQ(info.step(), 1u);
  v1::ForwardResponse again;
  ASSERT_TRUE(resumed.Forward(probe, &again).ok());
  EXPECT_TRUE(TensorNear(Decoded(again.y(), kDModel), Decoded(at_step_1.y(), kDModel), 1e-6));
  ReferenceTraining reference(model, InitAllWeights(model));
  reference.Train(RandomTensor({kTokens, kDModel}, 10), RandomTensor({kTokens, kDModel}, 11),
                  kLearningRate);
  ASSERT_NO_FATAL_FAILURE(TrainStep(resumed, reference, 20));
  v1::SaveCheckpointResponse saved;
  const grpc::Status status = Save(resumed, &saved);
  ASSERT_TRUE(status.ok()) << status.error_message() << "\n" << resumed.RouterLog();
  EXPECT_EQ(saved.directory(), dir + "/step-2");
  absl::StatusOr<MoeWeights> loaded = LoadCheckpoint(saved.directory(), model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(TensorNear(*loaded->gate, *reference.weights().gate, 1e-5));
  for (int e = 0; e < 4; ++e) {
    EXPECT_TRUE(TensorNear(loaded->experts.at(e).w2, reference.weights().experts.at(e).w2, 1e-5));
  }
}

}  // namespace
}  // namespace moe::testing
