#include "deploy/local/reference_demo.h"

#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

ReferenceDemoOptions SmallRun() {
  ReferenceDemoOptions options;
  options.config_path = "deploy/config/local.pbtxt";
  options.tokens_per_batch = 64;
  options.batches = 2;
  return options;
}

TEST(ReferenceDemoTest, ServesTheLocalConfigAndAccountsForEveryPair) {
  absl::StatusOr<ReferenceDemoReport> report = RunReferenceDemo(SmallRun());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->tokens, 128);
  const int64_t served = std::accumulate(report->expert_tokens.begin(),
                                         report->expert_tokens.end(), int64_t{0});
  EXPECT_EQ(served + report->dropped_pairs, 128 * report->config.model.top_k);
  EXPECT_GT(report->output_rms, 0.0);
  EXPECT_GT(report->grad_input_rms, 0.0);

  const std::string text = FormatReferenceDemoReport(*report);
  EXPECT_THAT(text, HasSubstr("HYBRID over 4 servers"));
  EXPECT_THAT(text, HasSubstr("expert-3"));
  EXPECT_THAT(text, HasSubstr("replica group: servers 0-3 share experts 0-3"));
  EXPECT_THAT(text, HasSubstr("expert imbalance"));
  EXPECT_THAT(text, HasSubstr("DYNAMIC"));
}

TEST(ReferenceDemoTest, SavedCheckpointServesTheSameOutputs) {
  ReferenceDemoOptions options = SmallRun();
  options.save_checkpoint_path = absl::StrCat(::testing::TempDir(), "/demo.safetensors");
  absl::StatusOr<ReferenceDemoReport> first = RunReferenceDemo(options);
  ASSERT_TRUE(first.ok()) << first.status();

  ReferenceDemoOptions again = SmallRun();
  again.checkpoint_path = options.save_checkpoint_path;
  absl::StatusOr<ReferenceDemoReport> second = RunReferenceDemo(again);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->first_outputs, first->first_outputs);
  EXPECT_EQ(second->expert_tokens, first->expert_tokens);
  EXPECT_THAT(second->weights_source, HasSubstr("checkpoint"));
}

TEST(ReferenceDemoTest, BadConfigPathIsReported) {
  ReferenceDemoOptions options = SmallRun();
  options.config_path = "no/such/config.pbtxt";
  EXPECT_EQ(RunReferenceDemo(options).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moe
