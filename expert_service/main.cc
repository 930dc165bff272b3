// expert_server: hosts the experts that the placement gives --name and runs
// them for routers over gRPC. SIGTERM or SIGINT drains and exits 0.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "common/malloc_tuning.h"
#include "common/model_config.h"
#include "common/mutex_checks.h"
#include "common/server_flags.h"
#include "common/stop_signals.h"
#include "common/transport_credentials.h"
#include "expert_service/expert_server.h"

ABSL_FLAG(std::string, config, "", "Text-format moe.v1.ServingConfig (required).");
ABSL_FLAG(std::string, name, "", "This server's name in the config (required).");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on.");
ABSL_FLAG(int, port, 50061, "gRPC port; 0 picks a free port and logs it.");
ABSL_FLAG(int, metrics_port, 9091, "Prometheus /metrics port; 0 picks a free port, -1 disables.");
ABSL_FLAG(std::string, checkpoint, "",
          "Checkpoint: a safetensors file or a sharded checkpoint directory (step-N, with "
          "model.safetensors.index.json); empty: deterministic init from the config's seed.");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Directory the router's SaveCheckpoint writes this server's shards under (the same "
          "shared volume as the router's --checkpoint_dir); empty: saving refused.");
ABSL_FLAG(std::string, dtype, "fp32", "Kernel dtype: fp32 or bf16.");
ABSL_FLAG(int, onednn_threads, 0,
          "oneDNN threads per compute thread; 0: the cores this process may use (its CPU "
          "affinity, capped by its cgroup CPU limit).");
ABSL_FLAG(int, compute_threads, 1, "Threads running expert kernels.");
ABSL_FLAG(int64_t, max_queued_requests, 4096,
          "Requests waiting for compute beyond which new ones get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, training_state_bytes, int64_t{2} << 30,
          "Budget for forward state kept for backward; beyond it, RESOURCE_EXHAUSTED.");
ABSL_FLAG(absl::Duration, training_state_ttl, absl::Seconds(60),
          "How long forward state waits for its backward.");
ABSL_FLAG(bool, merge_requests, true,
          "Merge inference requests for the same expert that queue up while the compute "
          "threads are busy into one kernel call (an idle server runs a request at once).");
ABSL_FLAG(absl::Duration, batch_window, absl::ZeroDuration(),
          "With --merge_requests: also hold a request this long for others for the same "
          "expert; 0: never wait.");
ABSL_FLAG(int64_t, inline_call_multiply_adds, int64_t{1} << 17,
          "Inference calls of at most this many multiply-adds (rows x the expert's parameters) "
          "run on the gRPC thread that read them, not queued or merged: the hand-off would cost "
          "more than their work. 0: every call goes through the compute queue.");
ABSL_FLAG(int64_t, max_batch_rows, 4096, "Largest merged batch, in rows.");
ABSL_FLAG(int64_t, ring_segment_elements, int64_t{1} << 18,
          "Gradient all-reduce pipeline segment, in floats (1 MiB by default).");
ABSL_FLAG(int, ring_window_segments, 4, "All-reduce segments in flight to the successor.");
ABSL_FLAG(absl::Duration, step_prepared_timeout, absl::Seconds(60),
          "A prepared training step with no commit or abort within this after its deadline "
          "asks the peers whether it was committed (and again every this long while in doubt).");
ABSL_FLAG(bool, sync_on_start, true,
          "Before serving, pull the hosted experts that are behind the committed step its "
          "peers report (rejoin by sync); false: serve what was loaded.");
ABSL_FLAG(absl::Duration, sync_timeout, absl::Minutes(10),
          "Longest the start-up sync may take (each peer's Info gets 3s).");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(10),
          "On SIGTERM, how long open streams may take to answer what they accepted.");

namespace {

absl::StatusOr<moe::expert::ExpertServer::Options> OptionsFromFlags() {
  moe::expert::ExpertServer::Options options;
  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (config_path.empty()) return absl::InvalidArgumentError("--config is required");
  options.name = absl::GetFlag(FLAGS_name);
  if (options.name.empty()) return absl::InvalidArgumentError("--name is required");
  absl::StatusOr<moe::ServingConfig> config = moe::LoadServingConfig(config_path);
  if (!config.ok()) return config.status();
  options.config = *std::move(config);
  options.listen_address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port));
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  options.health_port = absl::GetFlag(FLAGS_health_port);
  options.checkpoint_path = absl::GetFlag(FLAGS_checkpoint);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  absl::StatusOr<moe::TransportCredentials> credentials = moe::TransportCredentials::FromFlags();
  if (!credentials.ok()) return credentials.status();
  options.credentials = *credentials;
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "fp32") {
    options.compute_dtype = moe::DType::kFloat32;
  } else if (dtype == "bf16") {
    options.compute_dtype = moe::DType::kBFloat16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be fp32 or bf16, got \"", dtype, "\""));
  }
  options.onednn_threads = absl::GetFlag(FLAGS_onednn_threads);
  options.compute_threads = absl::GetFlag(FLAGS_compute_threads);
  if (absl::GetFlag(FLAGS_max_queued_requests) < 1) {
    return absl::InvalidArgumentError("--max_queued_requests must be >= 1");
  }
  options.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  options.training.max_bytes = absl::GetFlag(FLAGS_training_state_bytes);
  options.training.ttl = absl::GetFlag(FLAGS_training_state_ttl);
  options.merge_requests = absl::GetFlag(FLAGS_merge_requests);
  options.batch_window = absl::GetFlag(FLAGS_batch_window);
  options.inline_call_multiply_adds = absl::GetFlag(FLAGS_inline_call_multiply_adds);
  options.max_batch_rows = absl::GetFlag(FLAGS_max_batch_rows);
  absl::StatusOr<moe::StreamBounds> streams = moe::StreamBoundsFromFlags();
  if (!streams.ok()) return streams.status();
  options.streams = *streams;
  options.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  options.ring = {absl::GetFlag(FLAGS_ring_segment_elements),
                  absl::GetFlag(FLAGS_ring_window_segments)};
  if (options.ring.segment_elements < 1 || options.ring.window_segments < 1) {
    return absl::InvalidArgumentError(
        "--ring_segment_elements and --ring_window_segments must be >= 1");
  }
  options.step_prepared_timeout = absl::GetFlag(FLAGS_step_prepared_timeout);
  options.sync_on_start = absl::GetFlag(FLAGS_sync_on_start);
  options.sync_timeout = absl::GetFlag(FLAGS_sync_timeout);
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  moe::KeepFreedMessageMemory();
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "Serves the experts of a moe-serve cluster.\n"
      "Usage: expert_server --config=serving.pbtxt --name=expert-0 [--port=50061]");
  absl::ParseCommandLine(argc, argv);
  // Stop signals are blocked in every thread; main waits for them below.
  moe::BlockStopSignals();

  absl::StatusOr<moe::expert::ExpertServer::Options> options = OptionsFromFlags();
  if (!options.ok()) {
    MOE_LOG(ERROR, options.status().message());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<moe::expert::ExpertServer>> server =
      moe::expert::ExpertServer::Create(*std::move(options));
  if (!server.ok()) {
    MOE_LOG(ERROR, server.status().ToString());
    return 1;
  }
  MOE_LOG(INFO, "received ", moe::WaitForStopSignal(), "; shutting down");
  (*server)->Shutdown();
  return 0;
}
