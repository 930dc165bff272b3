// moe_reference: runs the in-process reference MoE layer of a serving config
// on random tokens and prints a summary. See reference_demo.h.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "deploy/local/reference_demo.h"

ABSL_FLAG(std::string, config, "deploy/config/local.pbtxt",
          "Text-format moe.v1.ServingConfig.");
ABSL_FLAG(std::string, checkpoint, "",
          "Safetensors checkpoint to serve; empty: deterministic init from the "
          "config's seed.");
ABSL_FLAG(std::string, save_checkpoint, "",
          "Write the served weights here (safetensors), e.g. to start a cluster "
          "from them later.");
ABSL_FLAG(bool, save_bf16, false, "Save the checkpoint in BF16 instead of F32.");
ABSL_FLAG(int64_t, tokens, 1024, "Tokens per batch.");
ABSL_FLAG(int, batches, 4, "Batches to run.");
ABSL_FLAG(uint64_t, input_seed, 1, "Seed of the random tokens.");
ABSL_FLAG(bool, backward, true, "Also run backward with a random dL/dy.");

int main(int argc, char** argv) {
  moe::SetFlagsUsage(
      "Runs the reference MoE layer of a serving config on random tokens and "
      "prints the routing, load and speed.\nUsage: moe_reference "
      "[--config=deploy/config/local.pbtxt] [--checkpoint=model.safetensors]");
  absl::ParseCommandLine(argc, argv);
  moe::ReferenceDemoOptions options;
  options.config_path = absl::GetFlag(FLAGS_config);
  options.checkpoint_path = absl::GetFlag(FLAGS_checkpoint);
  options.save_checkpoint_path = absl::GetFlag(FLAGS_save_checkpoint);
  options.save_dtype =
      absl::GetFlag(FLAGS_save_bf16) ? moe::DType::kBFloat16 : moe::DType::kFloat32;
  options.tokens_per_batch = absl::GetFlag(FLAGS_tokens);
  options.batches = absl::GetFlag(FLAGS_batches);
  options.input_seed = absl::GetFlag(FLAGS_input_seed);
  options.backward = absl::GetFlag(FLAGS_backward);

  MOE_LOG(INFO, "config ", options.config_path, ", ", options.batches, " x ",
          options.tokens_per_batch, " tokens");
  absl::StatusOr<moe::ReferenceDemoReport> report = moe::RunReferenceDemo(options);
  if (!report.ok()) {
    MOE_LOG(ERROR, report.status().ToString());
    return 1;
  }
  std::fputs(moe::FormatReferenceDemoReport(*report).c_str(), stdout);
  if (!options.save_checkpoint_path.empty()) {
    std::printf("\ncheckpoint  saved to %s\n", options.save_checkpoint_path.c_str());
  }
  return 0;
}
