#include "expert_service/weight_transfer.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/deterministic_init.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::testing::HasSubstr;

const ModelConfig& Model() {
  static const ModelConfig model = [] {
    ModelConfig m;
    m.d_model = 32;
    m.d_ff = 64;
    m.num_experts = 4;
    m.top_k = 2;
    m.seed = 5;
    return m;
  }();
  return model;
}

std::vector<v1::ExpertWeightsChunk> Chunks(size_t max_chunk_bytes) {
  return ChunkExpert(ExpertKey(0, 1), {InitExpert(Model(), ExpertKey(0, 1)), std::nullopt},
                     max_chunk_bytes);
}

TEST(WeightTransferTest, ChunksGoBackTogether) {
  const std::vector<v1::ExpertWeightsChunk> chunks = Chunks(1024);
  ExpertAssembler assembler(Model());
  for (const auto& chunk : chunks) ASSERT_TRUE(assembler.Add(chunk).ok());
  absl::StatusOr<ExpertSnapshot> snapshot = assembler.Finish();
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  EXPECT_EQ(snapshot->weights.Digest(), InitExpert(Model(), ExpertKey(0, 1)).Digest());
  EXPECT_EQ(assembler.expert(), ExpertKey(0, 1));
}

// The optimizer's state travels with the weights: AdamW's exp_avg (as the
// momentum kinds) and exp_avg_sq; a transfer missing part of it is
// incomplete.
TEST(WeightTransferTest, AdamWStateGoesBackTogether) {
  const ExpertSnapshot sent{InitExpert(Model(), ExpertKey(0, 1)),
                            InitExpert(Model(), ExpertKey(0, 2)),
                            InitExpert(Model(), ExpertKey(0, 3))};
  const std::vector<v1::ExpertWeightsChunk> chunks = ChunkExpert(ExpertKey(0, 1), sent, 4096);
  ExpertAssembler assembler(Model());
  for (const auto& chunk : chunks) ASSERT_TRUE(assembler.Add(chunk).ok());
  absl::StatusOr<ExpertSnapshot> got = assembler.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->velocity && got->second_moment);
  EXPECT_EQ(got->velocity->Digest(), sent.velocity->Digest());
  EXPECT_EQ(got->second_moment->Digest(), sent.second_moment->Digest());

  ExpertAssembler partial(Model());
  for (const auto& chunk : chunks) {
    // One chunk of W2's exp_avg_sq lost on the way.
    if (chunk.kind() == v1::EXPERT_TENSOR_KIND_W2_WEIGHT_SECOND_MOMENT &&
        chunk.offset_bytes() == 0) {
      continue;
    }
    if (!partial.Add(chunk).ok()) break;
  }
  EXPECT_FALSE(partial.Finish().ok());
}

// Gated SiLU experts send W3 and its optimizer state too; ReLU experts never
// send a W3 kind, and a W3 chunk for a ReLU model is refused.
TEST(WeightTransferTest, GatedExpertsSendTheirW3) {
  ModelConfig gated = Model();
  gated.activation = ExpertActivation::kSiluGated;
  const ExpertSnapshot sent{InitExpert(gated, ExpertKey(0, 1)), InitExpert(gated, ExpertKey(0, 2)),
                            std::nullopt};
  const std::vector<v1::ExpertWeightsChunk> chunks = ChunkExpert(ExpertKey(0, 1), sent, 4096);
  int w3_chunks = 0;
  for (const auto& chunk : chunks) {
    w3_chunks += chunk.kind() == v1::EXPERT_TENSOR_KIND_W3_WEIGHT ||
                 chunk.kind() == v1::EXPERT_TENSOR_KIND_W3_WEIGHT_MOMENTUM;
  }
  EXPECT_EQ(w3_chunks, 4);  // 8 KiB each
  ExpertAssembler assembler(gated);
  for (const auto& chunk : chunks) ASSERT_TRUE(assembler.Add(chunk).ok());
  absl::StatusOr<ExpertSnapshot> got = assembler.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->weights.w3, sent.weights.w3);
  EXPECT_EQ(got->velocity->w3, sent.velocity->w3);

  for (const auto& chunk : Chunks(1024)) {
    EXPECT_NE(chunk.kind(), v1::EXPERT_TENSOR_KIND_W3_WEIGHT);
  }
  ExpertAssembler relu(Model());
  const v1::ExpertWeightsChunk& w3 = *std::find_if(chunks.begin(), chunks.end(), [](const auto& c) {
    return c.kind() == v1::EXPERT_TENSOR_KIND_W3_WEIGHT;
  });
  EXPECT_THAT(relu.Add(w3).message(), HasSubstr("EXPERT_TENSOR_KIND_W3_WEIGHT: shape [32, 64]"));
}

// Every chunk names one expert, layer included; a layer the model does not
// have is refused by name.
TEST(WeightTransferTest, ChunksOfAnotherExpertOrLayerAreRefused) {
  const std::vector<v1::ExpertWeightsChunk> chunks = Chunks(1024);
  EXPECT_EQ(chunks[0].layer(), 0);
  EXPECT_EQ(chunks[0].expert_id(), 1);
  ExpertAssembler assembler(Model());
  ASSERT_TRUE(assembler.Add(chunks[0]).ok());
  v1::ExpertWeightsChunk other = chunks[1];
  other.set_layer(1);
  EXPECT_THAT(assembler.Add(other).message(),
              HasSubstr("weights chunk for layer 1 expert 1 in a transfer of expert 1"));
  ExpertAssembler fresh(Model());
  v1::ExpertWeightsChunk far = chunks[0];
  far.set_layer(3);
  EXPECT_THAT(fresh.Add(far).message(), HasSubstr("layer 3 is out of range [0, 1)"));
  EXPECT_THAT(fresh.Finish().status().message(), HasSubstr("no chunk received"));
}

// One byte per chunk would be a message per byte: chunks stay >= 1 KiB.
TEST(WeightTransferTest, TinyChunksAreRaisedToTheMinimum) {
  const std::vector<v1::ExpertWeightsChunk> chunks = Chunks(1);
  // w1 and w2 are 8 KiB each (8 chunks), the biases one chunk each.
  EXPECT_EQ(chunks.size(), 18u);
  for (const auto& chunk : chunks) EXPECT_LE(chunk.data().size(), kMinChunkBytes);
  EXPECT_EQ(chunks[0].data().size(), kMinChunkBytes);
}

// Hostile offsets and lengths: out of range without overflow, never
// written; chunks out of order or repeated are refused.
TEST(WeightTransferTest, HostileOffsetsAreRefusedWithoutOverflow) {
  const std::vector<v1::ExpertWeightsChunk> chunks = Chunks(1024);
  for (int64_t offset : {std::numeric_limits<int64_t>::max() - 10, int64_t{1} << 62,
                         int64_t{-1}, std::numeric_limits<int64_t>::min(), int64_t{8192}}) {
    ExpertAssembler assembler(Model());
    v1::ExpertWeightsChunk chunk = chunks[0];
    chunk.set_offset_bytes(offset);
    const absl::Status status = assembler.Add(chunk);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << offset;
    EXPECT_THAT(status.message(), HasSubstr("outside the tensor's 8192")) << offset;
  }
  ExpertAssembler assembler(Model());
  ASSERT_TRUE(assembler.Add(chunks[0]).ok());
  const absl::Status repeated = assembler.Add(chunks[0]);
  EXPECT_EQ(repeated.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(repeated.message(), HasSubstr("bytes at offset 0, expected the next at 1024"));
  const absl::Status skipped = assembler.Add(chunks[2]);
  EXPECT_THAT(skipped.message(), HasSubstr("bytes at offset 2048, expected the next at 1024"));
}

}  // namespace
}  // namespace moe::expert
