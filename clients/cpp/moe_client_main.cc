// moe_client: sends one batch to a router and prints what came back: the
// output's summary and, per token, the experts and weights that served it.
// The batch is random tokens, or a safetensors file's tensor "x".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/cpp/moe_client.h"
#include "common/expert_key.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "common/mutex_checks.h"
#include "common/pair_index.h"
#include "common/safetensors.h"

ABSL_FLAG(std::string, router, "127.0.0.1:50051", "The router's host:port.");
ABSL_FLAG(std::string, input, "",
          "A safetensors file with a tensor \"x\" [tokens, d_model]; empty: random tokens.");
ABSL_FLAG(int64_t, tokens, 4, "Random tokens to send (without --input).");
ABSL_FLAG(int64_t, d_model, 256, "Width of the random tokens (without --input).");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the random tokens.");
ABSL_FLAG(std::string, dtype, "fp32", "Wire dtype: fp32 or bf16.");
ABSL_FLAG(int, layer, 0, "The MoE layer to run (0 to the model's num_layers - 1).");
ABSL_FLAG(int64_t, show, 8, "Tokens whose routing is printed.");
ABSL_FLAG(bool, rebalance_plan, false,
          "Instead of a forward, print the placement the router would rebalance to for the load "
          "it measured (Rebalance with dry_run), and what it would move.");
ABSL_FLAG(bool, save_checkpoint, false,
          "Instead of a forward, ask the router for a checkpoint of the last committed training "
          "step (SaveCheckpoint; the router needs --checkpoint_dir) and print where it went.");
ABSL_FLAG(std::vector<std::string>, drain, {},
          "With --rebalance: expert servers (by name) to empty, so that they can be stopped.");
ABSL_FLAG(bool, rebalance, false,
          "Instead of a forward, move the cluster to the placement the router plans for the "
          "load it measured, while it serves (Rebalance; an admin call), and print what moved.");

namespace moe::client {
namespace {

absl::StatusOr<FloatTensor> Input() {
  const std::string path = absl::GetFlag(FLAGS_input);
  if (path.empty()) {
    FloatTensor x({absl::GetFlag(FLAGS_tokens), absl::GetFlag(FLAGS_d_model)});
    std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& v : x.mutable_values()) v = dist(rng);
    return x;
  }
  absl::StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  if (!reader.ok()) return reader.status();
  const SafetensorsEntry* entry = reader->Find("x");
  if (entry == nullptr || entry->shape.size() != 2) {
    return absl::InvalidArgumentError(path + ": no 2-d tensor \"x\"");
  }
  FloatTensor x(entry->shape);
  if (absl::Status s = reader->ReadFloats(*entry, x.mutable_values()); !s.ok()) return s;
  return x;
}

int PrintRebalance(MoeClient& client, bool dry_run) {
  absl::StatusOr<v1::RebalanceResponse> plan =
      dry_run ? client.PlanRebalance() : client.Rebalance(absl::GetFlag(FLAGS_drain));
  if (!plan.ok()) {
    MOE_LOG(ERROR, plan.status().ToString());
    return 1;
  }
  std::printf("rebalance plan from placement epoch %lu, load over the last %.0f s\n",
              static_cast<unsigned long>(plan->placement_epoch()), plan->window_seconds());
  for (const v1::ExpertAssignment& expert : plan->placement().experts()) {
    std::printf("  %-20s on %s\n", ExpertKeyOf(expert).ToString().c_str(),
                absl::StrJoin(expert.servers(), ", ").c_str());
  }
  std::printf("server load (tokens) before: %s\n",
              absl::StrJoin(plan->server_load_before(), " ", [](std::string* out, double v) {
                absl::StrAppend(out, std::lround(v));
              }).c_str());
  std::printf("server load (tokens) after:  %s\n",
              absl::StrJoin(plan->server_load_after(), " ", [](std::string* out, double v) {
                absl::StrAppend(out, std::lround(v));
              }).c_str());
  std::printf(
      "imbalance (max/mean) %.3f -> %.3f; %d replicas copied (%.1f MiB), %d dropped; "
      "servers per token %.2f -> %.2f\n",
      plan->imbalance_before(), plan->imbalance_after(), plan->experts_moved(),
      plan->bytes_moved() / 1048576.0, plan->replicas_removed(), plan->servers_per_token_before(),
      plan->servers_per_token_after());
  if (!dry_run) {
    std::printf("moved: placement epoch %lu in force; pulls %.3f s, drain %.3f s, %.3f s in all\n",
                static_cast<unsigned long>(plan->placement_epoch()), plan->pull_seconds(),
                plan->drain_seconds(), plan->seconds());
  }
  return 0;
}

int SaveCheckpoint(MoeClient& client) {
  absl::StatusOr<SavedCheckpoint> saved = client.SaveCheckpoint(
      absl::GetFlag(FLAGS_dtype) == "bf16" ? DType::kBFloat16 : DType::kFloat32);
  if (!saved.ok()) {
    MOE_LOG(ERROR, saved.status().ToString());
    return 1;
  }
  std::printf("checkpoint of step %lu (lineage %s) in %s: %zu file(s), %.1f MiB in %.3f s\n",
              static_cast<unsigned long>(saved->step), saved->lineage.c_str(),
              saved->directory.c_str(), saved->files.size(), saved->bytes / 1048576.0,
              absl::ToDoubleSeconds(saved->time));
  for (const std::string& file : saved->files) std::printf("  %s\n", file.c_str());
  return 0;
}

int Run() {
  absl::StatusOr<FloatTensor> x = Input();
  if (!x.ok()) {
    MOE_LOG(ERROR, x.status().message());
    return 2;
  }
  ForwardOptions options;
  options.return_routing = true;
  options.layer = absl::GetFlag(FLAGS_layer);
  options.wire_dtype = absl::GetFlag(FLAGS_dtype) == "bf16" ? DType::kBFloat16 : DType::kFloat32;
  absl::StatusOr<TransportCredentials> credentials = TransportCredentials::FromFlags();
  if (!credentials.ok()) {
    MOE_LOG(ERROR, credentials.status().message());
    return 2;
  }
  auto client = MoeClient::Connect(absl::GetFlag(FLAGS_router), *credentials);
  if (absl::GetFlag(FLAGS_save_checkpoint)) return SaveCheckpoint(*client);
  if (absl::GetFlag(FLAGS_rebalance_plan)) return PrintRebalance(*client, /*dry_run=*/true);
  if (absl::GetFlag(FLAGS_rebalance)) return PrintRebalance(*client, /*dry_run=*/false);
  absl::StatusOr<ForwardOutput> out = client->Forward(*x, options);
  if (!out.ok()) {
    MOE_LOG(ERROR, out.status().ToString());
    return 1;
  }
  double squares = 0;
  for (float v : out->y.values()) squares += static_cast<double>(v) * v;
  std::printf("y: [%ld, %ld], rms %.6f, dropped pairs %ld\n", static_cast<long>(out->y.dim(0)),
              static_cast<long>(out->y.dim(1)),
              out->y.num_elements() ? std::sqrt(squares / out->y.num_elements()) : 0.0,
              static_cast<long>(out->dropped_pairs));
  const int64_t show = std::min(absl::GetFlag(FLAGS_show), out->y.dim(0));
  for (int64_t t = 0; t < show; ++t) {
    std::printf("token %ld:", static_cast<long>(t));
    for (int j = 0; j < out->top_k; ++j) {
      const int64_t p = PairIndex(out->top_k).Pair(t, j);
      std::printf("  expert %d (%.3f)%s", out->expert_ids[p], out->weights[p],
                  out->dropped[p] ? " dropped" : "");
    }
    std::printf("   y[0:3] = %.5f %.5f %.5f\n", out->y.row(t)[0], out->y.row(t)[1],
                out->y.row(t)[2]);
  }
  return 0;
}

}  // namespace
}  // namespace moe::client

int main(int argc, char** argv) {
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "Sends one batch of tokens to a moe-serve router and prints the output and routing.\n"
      "Usage: moe_client --router=host:port [--tokens=4 --d_model=256 | --input=x.safetensors]");
  absl::ParseCommandLine(argc, argv);
  return moe::client::Run();
}
