// The index of a sharded checkpoint (model.safetensors.index.json) is
// attacker-writable input: LoadCheckpoint either loads the whole model from
// shards inside the directory or names the problem; shard names never
// leave the directory. The directory holds one valid shard of a small
// model; the fuzzer writes the index.
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"

namespace {

moe::ModelConfig Model() {
  moe::ModelConfig model;
  model.d_model = 4;
  model.d_ff = 8;
  model.num_experts = 2;
  model.top_k = 1;
  model.seed = 3;
  return model;
}

const std::string& Directory() {
  static const std::string* dir = [] {
    auto* path = new std::string(absl::StrCat("/tmp/checkpoint_index_fuzz.", getpid(), "/step-1"));
    if (!moe::MakeDirectories(*path).ok()) __builtin_trap();
    if (!moe::SaveCheckpointShard(*path + "/" + moe::ShardFileName(1, 1), Model(),
                                  moe::InitAllWeights(Model()), moe::DType::kFloat32, nullptr)
             .ok()) {
      __builtin_trap();
    }
    return path;
  }();
  return *dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = Directory();
  std::ofstream(dir + "/" + moe::kCheckpointIndexName, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  absl::StatusOr<moe::MoeWeights> weights = moe::LoadCheckpoint(dir, Model());
  if (weights.ok() && (!weights->gate || weights->experts.size() != 2)) __builtin_trap();
  (void)moe::ReadCheckpointMetadata(dir);
  (void)moe::FindLatestCheckpoint(dir.substr(0, dir.rfind('/')));
  return 0;
}
