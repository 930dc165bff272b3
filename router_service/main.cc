// router: the entry point of a moe-serve cluster. Gates token batches and
// fans them out to the expert servers of the config. SIGTERM or SIGINT
// drains and exits 0.
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/flags_usage.h"
#include "common/log.h"
#include "common/malloc_tuning.h"
#include "common/model_config.h"
#include "common/mutex_checks.h"
#include "common/server_flags.h"
#include "common/stop_signals.h"
#include "common/transport_credentials.h"
#include "router_service/router_server.h"

ABSL_FLAG(std::string, config, "", "Text-format moe.v1.ServingConfig (required).");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on.");
ABSL_FLAG(int, port, 50051, "gRPC port; 0 picks a free port and logs it.");
ABSL_FLAG(int, metrics_port, 9090, "Prometheus /metrics port; 0 picks one, -1 disables.");
ABSL_FLAG(std::string, checkpoint, "",
          "Checkpoint for the gate: a safetensors file or a sharded checkpoint directory "
          "(step-N; training resumes after its step); empty: deterministic init from the seed.");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Where SaveCheckpoint writes step-N/ (a volume every expert server mounts as its "
          "--checkpoint_dir); empty: SaveCheckpoint is refused.");
ABSL_FLAG(int, checkpoint_every_steps, 0,
          "Save a checkpoint after every committed step that is a multiple of this; 0: only "
          "when SaveCheckpoint is called.");
ABSL_FLAG(int, compute_threads, 0,
          "Threads gating and combining; 0: the cores this process may use (its CPU affinity, "
          "capped by its cgroup CPU limit).");
ABSL_FLAG(int64_t, training_state_bytes, int64_t{1} << 30,
          "Bytes of forward state kept for Backward (gate probabilities, expert outputs); a "
          "training Forward beyond it is refused (RESOURCE_EXHAUSTED).");
ABSL_FLAG(absl::Duration, stream_request_timeout, absl::Seconds(30),
          "Deadline of a ForwardStream request that sets no timeout_ms (never later than the "
          "stream's own).");
ABSL_FLAG(absl::Duration, hedge_max_delay, absl::Milliseconds(200),
          "An inference forward's expert call that a replica has not answered within three "
          "times its recent answer time (at least --hedge_min_delay, at most this) is also sent "
          "to another replica; 0 disables hedging.");
ABSL_FLAG(absl::Duration, hedge_min_delay, absl::Milliseconds(10),
          "The shortest wait before an expert call is hedged.");
ABSL_FLAG(int64_t, micro_batch_bytes, 0,
          "Inference: split each expert's rows on one server into calls of at most this many "
          "bytes of tokens, so that the server computes one while the next is on the wire "
          "(results are the same bits); 0: one call per expert and server.");
ABSL_FLAG(int64_t, inline_forward_multiply_adds, int64_t{1} << 16,
          "Forwards whose gate is at most this many multiply-adds (tokens x d_model x experts) "
          "are gated and combined on the gRPC thread that received them, not handed to the "
          "compute pool: the hand-off would cost more than their work. 0: every forward with "
          "tokens goes through the pool.");
ABSL_FLAG(int, dispatch_streams, 2,
          "Dispatch streams to each expert server, which a forward's calls take in turn (a stream "
          "writes one call at a time); >= 1.");
ABSL_FLAG(bool, round_tokens_for_bf16_servers, true,
          "Inference with fp32 tokens: send an expert's rows as bf16 when every replica of it "
          "computes in bf16 (its kernels round them the same way: the same answer from half "
          "the bytes).");
ABSL_FLAG(absl::Duration, step_timeout, absl::Seconds(60),
          "Deadline of a training Step whose client sets none.");
ABSL_FLAG(int64_t, migration_bytes_per_second, int64_t{256} << 20,
          "Pace of each expert server's weight pulls in a placement change (Rebalance), so that "
          "serving keeps its latency; 0: unpaced.");
ABSL_FLAG(absl::Duration, rebalance_drain_timeout, absl::Seconds(10),
          "How long a placement change waits for calls planned with the old placement before "
          "the servers drop the replicas it removes (later ones run again on the new one).");
ABSL_FLAG(bool, auto_rebalance, false,
          "Move to a better placement by itself when the expert servers' load (their own "
          "counters, every router's traffic) stays uneven: DYNAMIC that follows the traffic. "
          "With several routers, the one holding the lease on the first server decides.");
ABSL_FLAG(absl::Duration, auto_rebalance_interval, absl::Seconds(10),
          "How often the automatic rebalance looks at the load.");
ABSL_FLAG(absl::Duration, auto_rebalance_window, absl::Seconds(60),
          "The load the automatic rebalance balances: the servers' tokens over this window.");
ABSL_FLAG(double, auto_rebalance_threshold, 1.25,
          "Servers' max/mean load over the window above which the automatic rebalance plans.");
ABSL_FLAG(double, auto_rebalance_hysteresis, 0.1,
          "The plan must predict at most threshold - hysteresis, or nothing moves.");
ABSL_FLAG(absl::Duration, auto_rebalance_cooldown, absl::Minutes(10),
          "At most one automatic change per this long.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(10),
          "On SIGTERM, how long calls in flight may take.");

int main(int argc, char** argv) {
  moe::KeepFreedMessageMemory();
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "Routes token batches to the expert servers of a moe-serve cluster.\n"
      "Usage: router --config=serving.pbtxt [--port=50051]");
  absl::ParseCommandLine(argc, argv);
  moe::BlockStopSignals();

  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (config_path.empty()) {
    MOE_LOG(ERROR, "--config is required");
    return 2;
  }
  absl::StatusOr<moe::ServingConfig> config = moe::LoadServingConfig(config_path);
  if (!config.ok()) {
    MOE_LOG(ERROR, config.status().message());
    return 2;
  }
  moe::router::RouterServer::Options options;
  options.config = *std::move(config);
  options.listen_address =
      absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port));
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  options.health_port = absl::GetFlag(FLAGS_health_port);
  options.checkpoint_path = absl::GetFlag(FLAGS_checkpoint);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  options.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  options.compute_threads = absl::GetFlag(FLAGS_compute_threads);
  options.training_state_bytes = absl::GetFlag(FLAGS_training_state_bytes);
  options.stream_request_timeout = absl::GetFlag(FLAGS_stream_request_timeout);
  options.hedge_min_delay = absl::GetFlag(FLAGS_hedge_min_delay);
  options.hedge_max_delay = absl::GetFlag(FLAGS_hedge_max_delay);
  options.micro_batch_bytes = absl::GetFlag(FLAGS_micro_batch_bytes);
  options.inline_forward_multiply_adds = absl::GetFlag(FLAGS_inline_forward_multiply_adds);
  if (options.inline_forward_multiply_adds < 0) {
    MOE_LOG(ERROR, "--inline_forward_multiply_adds must be >= 0, got ",
            options.inline_forward_multiply_adds);
    return 2;
  }
  options.dispatch_streams = absl::GetFlag(FLAGS_dispatch_streams);
  if (options.dispatch_streams < 1) {
    MOE_LOG(ERROR, "--dispatch_streams must be >= 1, got ", options.dispatch_streams);
    return 2;
  }
  options.round_tokens_for_bf16_servers = absl::GetFlag(FLAGS_round_tokens_for_bf16_servers);
  absl::StatusOr<moe::StreamBounds> streams = moe::StreamBoundsFromFlags();
  if (!streams.ok()) {
    MOE_LOG(ERROR, streams.status().message());
    return 2;
  }
  options.streams = *streams;
  options.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  options.step_timeout = absl::GetFlag(FLAGS_step_timeout);
  options.migration_bytes_per_second = absl::GetFlag(FLAGS_migration_bytes_per_second);
  options.rebalance_drain_timeout = absl::GetFlag(FLAGS_rebalance_drain_timeout);
  options.auto_rebalance = absl::GetFlag(FLAGS_auto_rebalance);
  options.auto_rebalance_interval = absl::GetFlag(FLAGS_auto_rebalance_interval);
  options.auto_rebalance_window = absl::GetFlag(FLAGS_auto_rebalance_window);
  options.auto_rebalance_threshold = absl::GetFlag(FLAGS_auto_rebalance_threshold);
  options.auto_rebalance_hysteresis = absl::GetFlag(FLAGS_auto_rebalance_hysteresis);
  options.auto_rebalance_cooldown = absl::GetFlag(FLAGS_auto_rebalance_cooldown);
  absl::StatusOr<moe::TransportCredentials> credentials = moe::TransportCredentials::FromFlags();
  if (!credentials.ok()) {
    MOE_LOG(ERROR, credentials.status().message());
    return 2;
  }
  options.credentials = *credentials;
  absl::StatusOr<std::unique_ptr<moe::router::RouterServer>> server =
      moe::router::RouterServer::Create(std::move(options));
  if (!server.ok()) {
    MOE_LOG(ERROR, server.status().ToString());
    return 1;
  }
  MOE_LOG(INFO, "received ", moe::WaitForStopSignal(), "; shutting down");
  (*server)->Shutdown();
  return 0;
}
