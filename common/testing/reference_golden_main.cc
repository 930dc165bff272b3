// Writes a deterministic checkpoint, inputs, and the reference layer's
// forward and backward results as safetensors files, for comparison with an
// independent implementation (common/testing/reference_moe_torch.py).
//   <out>/model.safetensors  the checkpoint (gate.weight, experts.{e}...)
//   <out>/io.safetensors     x, grad_output, y, grad_input, expert_ids,
//                            weights, dropped (routing as fp32 numbers)
//   <out>/grads.safetensors  the parameter gradients, checkpoint names
//   <out>/adamw.safetensors  with --adamw_steps=N: the weights after N steps
//                            of the shared optimizer (AdamW, lr 0.01,
//                            gradients clipped to global norm 1) with those
//                            gradients each step
//   <out>/gate.json          the gate variant (--renormalize, --num_groups,
//                            --top_groups, --scaling_factor) and the
//                            losses' weights (--aux_loss_coef, --z_loss_coef);
//                            io.safetensors then has "losses" (aux, z)
#include <cstdint>
#include <fstream>
#include <map>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/checkpoint.h"
#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/optimizer.h"
#include "common/reference_moe.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "common/testing/random_tensor.h"

ABSL_FLAG(std::string, out_dir, "", "Directory to write the three files to.");
ABSL_FLAG(int, d_model, 16, "Model width.");
ABSL_FLAG(int, d_ff, 24, "Expert hidden width.");
ABSL_FLAG(int, num_experts, 4, "Experts.");
ABSL_FLAG(int, top_k, 2, "Experts per token.");
ABSL_FLAG(int, tokens, 37, "Tokens in the batch.");
ABSL_FLAG(double, capacity_factor, 0, "With > 0, OVERFLOW_POLICY_DROP at this factor.");
ABSL_FLAG(uint64_t, seed, 1, "Seed for weights and inputs.");
ABSL_FLAG(bool, bf16_checkpoint, false, "Store the checkpoint in BF16.");
ABSL_FLAG(int, adamw_steps, 0, "Steps of AdamW with clipping to write (adamw.safetensors).");
ABSL_FLAG(bool, renormalize, true, "Gate: renormalise the chosen probabilities.");
ABSL_FLAG(int, num_groups, 0, "Gate: expert groups (group-limited choice); 0: off.");
ABSL_FLAG(int, top_groups, 0, "Gate: groups a token chooses among.");
ABSL_FLAG(double, scaling_factor, 1.0, "Gate: every weight times this.");
ABSL_FLAG(double, aux_loss_coef, 0.0, "Gate: weight of the load-balancing loss.");
ABSL_FLAG(double, z_loss_coef, 0.0, "Gate: weight of the router z-loss.");

namespace moe {
namespace {

absl::Status Run() {
  const std::string dir = absl::GetFlag(FLAGS_out_dir);
  ModelConfig model;
  model.d_model = absl::GetFlag(FLAGS_d_model);
  model.d_ff = absl::GetFlag(FLAGS_d_ff);
  model.num_experts = absl::GetFlag(FLAGS_num_experts);
  model.top_k = absl::GetFlag(FLAGS_top_k);
  model.seed = absl::GetFlag(FLAGS_seed);
  if (absl::GetFlag(FLAGS_capacity_factor) > 0) {
    model.overflow = OverflowPolicy::kDrop;
    model.capacity_factor = absl::GetFlag(FLAGS_capacity_factor);
  }
  model.gate = {absl::GetFlag(FLAGS_renormalize),   absl::GetFlag(FLAGS_num_groups),
                absl::GetFlag(FLAGS_top_groups),    absl::GetFlag(FLAGS_scaling_factor),
                absl::GetFlag(FLAGS_aux_loss_coef), absl::GetFlag(FLAGS_z_loss_coef)};
  // The gate variant, for the PyTorch side.
  {
    std::ofstream gate(absl::StrCat(dir, "/gate.json"));
    gate << "{\"renormalize\": " << (model.gate.renormalize ? "true" : "false")
         << ", \"num_groups\": " << model.gate.num_groups
         << ", \"top_groups\": " << model.gate.top_groups
         << ", \"scaling_factor\": " << model.gate.scaling_factor
         << ", \"aux_loss_coef\": " << model.gate.aux_loss_coef
         << ", \"z_loss_coef\": " << model.gate.z_loss_coef << "}\n";
    if (!gate) return absl::InternalError(absl::StrCat("cannot write ", dir, "/gate.json"));
  }
  const std::string checkpoint = absl::StrCat(dir, "/model.safetensors");
  MOE_RETURN_IF_ERROR(SaveCheckpoint(
      checkpoint, model, InitAllWeights(model),
      absl::GetFlag(FLAGS_bf16_checkpoint) ? DType::kBFloat16 : DType::kFloat32));
  // Serve what was saved (BF16 rounding included), as a server would.
  MOE_ASSIGN_OR_RETURN(MoeWeights weights, LoadCheckpoint(checkpoint, model));
  MOE_ASSIGN_OR_RETURN(ReferenceMoe moe, ReferenceMoe::Create(model, std::move(weights)));

  const int64_t tokens = absl::GetFlag(FLAGS_tokens);
  const FloatTensor x = testing::RandomTensor({tokens, model.d_model}, model.seed + 1, 2.0f);
  const FloatTensor dy = testing::RandomTensor({tokens, model.d_model}, model.seed + 2);
  MOE_ASSIGN_OR_RETURN(ReferenceForward forward, moe.Forward(x));
  MOE_ASSIGN_OR_RETURN(ReferenceGradients grads, moe.Backward(x, forward, dy));

  const Routing& routing = forward.routing;
  std::vector<float> expert_ids(routing.expert_ids.begin(), routing.expert_ids.end());
  std::vector<float> dropped(routing.dropped.begin(), routing.dropped.end());
  SafetensorsWriter io;
  io.Add("x", x.shape(), x.values());
  io.Add("grad_output", dy.shape(), dy.values());
  io.Add("y", forward.y.shape(), forward.y.values());
  io.Add("grad_input", grads.dx.shape(), grads.dx.values());
  io.Add("expert_ids", {tokens, routing.per_token()}, expert_ids);
  io.Add("weights", {tokens, routing.per_token()}, routing.weights);
  io.Add("dropped", {tokens, routing.per_token()}, dropped);
  const std::vector<float> losses = {static_cast<float>(routing.aux_loss),
                                     static_cast<float>(routing.z_loss)};
  io.Add("losses", {2}, losses);  // kept by reference until Write
  MOE_RETURN_IF_ERROR(io.Write(absl::StrCat(dir, "/io.safetensors"), DType::kFloat32));
  MOE_RETURN_IF_ERROR(SaveCheckpoint(absl::StrCat(dir, "/grads.safetensors"), model,
                                     grads.params, DType::kFloat32));
  if (const int steps = absl::GetFlag(FLAGS_adamw_steps); steps > 0) {
    // The optimizer as the cluster runs it: the norm over the gate's and
    // every expert's gradients, each step the same gradients.
    OptimizerOptions adamw;
    adamw.type = OptimizerType::kAdamW;
    adamw.max_grad_norm = 1.0f;
    MOE_ASSIGN_OR_RETURN(MoeWeights stepped, LoadCheckpoint(checkpoint, model));
    double squared = SquaredNorm(grads.params.gate->values());
    for (const auto& [e, g] : grads.params.experts) {
      for (ExpertTensor which : kAllExpertTensors) squared += SquaredNorm(g.tensor(which).values());
    }
    FloatTensor gate_m(stepped.gate->shape()), gate_v(stepped.gate->shape());
    std::map<int, ExpertWeights> m, v;
    for (uint64_t t = 1; t <= static_cast<uint64_t>(steps); ++t) {
      const UpdateStep update{0.01f, t, ClipScale(adamw, squared)};
      ApplyOptimizer(adamw, update, *grads.params.gate, *stepped.gate, &gate_m, &gate_v);
      for (auto& [e, w] : stepped.experts) {
        m.try_emplace(e, ExpertWeights::Zeros(model));
        v.try_emplace(e, ExpertWeights::Zeros(model));
        ApplyOptimizer(adamw, update, grads.params.experts.at(e), w, &m.at(e), &v.at(e));
      }
    }
    MOE_RETURN_IF_ERROR(
        SaveCheckpoint(absl::StrCat(dir, "/adamw.safetensors"), model, stepped, DType::kFloat32));
  }
  MOE_LOG(INFO, "wrote ", dir, ": ", tokens, " tokens, ", routing.dropped_pairs,
          " dropped pairs");
  return absl::OkStatus();
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = moe::Run();
  if (!status.ok()) {
    MOE_LOG(ERROR, status.ToString());
    return 1;
  }
  return 0;
}
