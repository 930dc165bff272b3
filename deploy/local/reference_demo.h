// The README's first command, until the router and expert servers exist:
// loads a serving config and a checkpoint (or the deterministic init), runs
// the in-process reference MoE layer forward and backward on seeded random
// tokens, and reports what a cluster serving that config would see: the
// placement, per-expert load, imbalance under each strategy, dropped pairs,
// and the layer's speed. Thread-compatible.
#ifndef MOE_DEPLOY_LOCAL_REFERENCE_DEMO_H_
#define MOE_DEPLOY_LOCAL_REFERENCE_DEMO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/tensor.h"

namespace moe {

struct ReferenceDemoOptions {
  // A text-format moe.v1.ServingConfig. Required.
  std::string config_path;
  // A safetensors checkpoint to serve; empty: deterministic init from the
  // config's seed.
  std::string checkpoint_path;
  // Where to write the weights that were served (empty: nowhere).
  std::string save_checkpoint_path;
  DType save_dtype = DType::kFloat32;
  // Batches of random tokens (uniform in [-1, 1), from `input_seed`).
  int64_t tokens_per_batch = 1024;
  int batches = 4;
  uint64_t input_seed = 1;
  // Also run backward with a random dL/dy.
  bool backward = true;
};

struct ReferenceDemoReport {
  ServingConfig config;
  std::string weights_source;
  int64_t parameters = 0;
  int64_t tokens = 0;
  // Pairs served by each expert over all batches.
  std::vector<int64_t> expert_tokens;
  int64_t dropped_pairs = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  // Root mean square of every output and of every input gradient.
  double output_rms = 0;
  double grad_input_rms = 0;
  // First values of the first output row, for eyeballing determinism.
  std::vector<float> first_outputs;
};

absl::StatusOr<ReferenceDemoReport> RunReferenceDemo(
    const ReferenceDemoOptions& options);

// A summary a person can read.
std::string FormatReferenceDemoReport(const ReferenceDemoReport& report);

}  // namespace moe

#endif  // MOE_DEPLOY_LOCAL_REFERENCE_DEMO_H_
