// allreduce_node: one rank of a ring all-reduce over gRPC, on its own: the
// same Collective service, links and algorithm the expert servers use, on
// generated data. N of them (one per address in --peers) sum buffers of the
// given lengths; each rank checks every element of every result against the
// float64 sum (it can generate every rank's input) and prints one line per
// collective. For the multi-process tests and the all-reduce benchmark, and
// to check a network before training on it.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/digest.h"
#include "common/flags_usage.h"
#include "common/grpc_server.h"
#include "common/log.h"
#include "common/malloc_tuning.h"
#include "common/mutex_checks.h"
#include "common/transport_credentials.h"
#include "expert_service/allreduce/allreduce_inputs.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/collective_service.h"
#include "expert_service/allreduce/grpc_ring_link.h"
#include "expert_service/allreduce/ring_allreduce.h"

ABSL_FLAG(int, rank, 0, "This node's rank: its index in --peers.");
ABSL_FLAG(std::string, peers, "", "Comma-separated host:port of every rank, in ring order.");
ABSL_FLAG(std::string, lengths, "1000", "Comma-separated buffer lengths, in floats.");
ABSL_FLAG(int, repeats, 1, "Times each length is run.");
ABSL_FLAG(int64_t, segment_elements, int64_t{1} << 18, "Pipeline segment, in floats.");
ABSL_FLAG(int, window_segments, 4, "Segments in flight per link.");
ABSL_FLAG(absl::Duration, deadline, absl::Seconds(60), "Deadline of each collective.");
ABSL_FLAG(absl::Duration, connect_timeout, absl::Seconds(30),
          "How long to wait for the successor to listen.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the generated inputs.");
ABSL_FLAG(bool, check, true, "Check every element against the float64 sum.");

namespace moe::allreduce {
namespace {

constexpr uint64_t kGroup = 1;

int Run() {
  const int rank = absl::GetFlag(FLAGS_rank);
  const std::vector<std::string> peers =
      absl::StrSplit(absl::GetFlag(FLAGS_peers), ',', absl::SkipEmpty());
  const int n = static_cast<int>(peers.size());
  if (n == 0 || rank < 0 || rank >= n) {
    std::fprintf(stderr, "--peers must list every rank and --rank index it\n");
    return 2;
  }
  std::vector<int64_t> lengths;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(s, &v) || v < 0) {
      std::fprintf(stderr, "--lengths: bad length '%s'\n", std::string(s).c_str());
      return 2;
    }
    lengths.push_back(v);
  }
  const RingOptions options{absl::GetFlag(FLAGS_segment_elements),
                            absl::GetFlag(FLAGS_window_segments)};
  if (options.segment_elements <= 0 || options.window_segments <= 0) {
    std::fprintf(stderr, "--segment_elements and --window_segments must be > 0\n");
    return 2;
  }

  const absl::StatusOr<TransportCredentials> credentials = TransportCredentials::FromFlags();
  if (!credentials.ok()) {
    std::fprintf(stderr, "%s\n", credentials.status().ToString().c_str());
    return 2;
  }
  CollectiveRegistry registry;
  registry.AddGroup(kGroup);
  CollectiveService service(&registry);
  int port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartGrpcServer(peers[rank], *credentials, 1 << 30, {&service}, &port);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  const int successor = (rank + 1) % n;
  const int predecessor = (rank + n - 1) % n;
  auto name = [&](int r) { return absl::StrCat("rank ", r, " (", peers[r], ")"); };
  GrpcRingLink link(name(successor), peers[successor], *credentials, 1 << 30);
  std::printf("rank %d of %d listening on %s\n", rank, n, peers[rank].c_str());
  std::fflush(stdout);

  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  uint64_t step = 0;
  int failures = 0;
  // Sums `buffer` in place (it travels with the collective and comes back).
  auto run_one = [&](std::vector<float>& buffer) {
    auto collective =
        RingAllReduce::Create({++step, kGroup, rank, n, name(predecessor), name(successor),
                               std::move(buffer)},
                              options, &link);
    registry.Register(collective);
    collective->Start();
    absl::Status status = collective->Wait(absl::Now() + absl::GetFlag(FLAGS_deadline));
    registry.Unregister(*collective);
    if (status.ok()) buffer = collective->TakeBuffer();
    return std::make_pair(status, collective->bytes_sent());
  };
  // Waits until the successor listens (the first collective would fail
  // otherwise), then a small collective as a barrier, so every timed one
  // starts with all ranks ready.
  if (n > 1) {
    auto channel = KeepaliveChannel(peers[successor], *credentials, 1 << 20,
                                    absl::Milliseconds(50),
                                    absl::Milliseconds(200));
    if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() +
                                                      absl::GetFlag(FLAGS_connect_timeout)))) {
      std::fprintf(stderr, "successor %s not reachable\n", name(successor).c_str());
      return 1;
    }
  }
  std::vector<float> barrier(n);
  std::vector<float> input, buffer;
  // Stops at the first failure: without a coordinator (the router, for the
  // expert servers), ranks that failed at different points would no longer
  // agree on step numbers.
  for (int64_t length : lengths) {
    if (failures > 0) break;
    for (int repeat = 0; repeat < absl::GetFlag(FLAGS_repeats) && failures == 0; ++repeat) {
      // Inputs first (generated once per length, copied per repeat), then
      // the barrier: the timed collective starts with every rank ready, and
      // no rank generates while others are still summing.
      if (static_cast<int64_t>(input.size()) != length) {
        input.resize(length);
        FillAllReduceInput(seed, rank, absl::MakeSpan(input));
      }
      buffer = input;
      if (absl::Status s = run_one(barrier).first; !s.ok()) {
        std::printf("barrier step=%lu FAILED: %s\n", static_cast<unsigned long>(step),
                    s.ToString().c_str());
        std::fflush(stdout);
        ++failures;
        break;
      }
      const absl::Time start = absl::Now();
      auto [status, bytes_sent] = run_one(buffer);
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      if (!status.ok()) {
        std::printf("allreduce step=%lu length=%ld FAILED: %s\n", static_cast<unsigned long>(step),
                    static_cast<long>(length), status.ToString().c_str());
        std::fflush(stdout);
        ++failures;
        break;
      }
      const uint64_t timed_step = step;
      // And a barrier after: no rank digests or checks (heavy) while another
      // is still being timed.
      if (absl::Status s = run_one(barrier).first; !s.ok()) {
        std::printf("barrier step=%lu FAILED: %s\n", static_cast<unsigned long>(step),
                    s.ToString().c_str());
        std::fflush(stdout);
        ++failures;
        break;
      }
      ArrayDigest64 digest;
      digest.AddFloats(buffer);
      AllReduceCheck checked;
      if (absl::GetFlag(FLAGS_check)) checked = CheckAllReduce(buffer, seed, n);
      std::printf(
          "allreduce step=%lu length=%ld seconds=%.6f bytes_sent=%ld digest=%016lx wrong=%ld "
          "max_error_ratio=%.3f\n",
          static_cast<unsigned long>(timed_step), static_cast<long>(length), seconds,
          static_cast<long>(bytes_sent), static_cast<unsigned long>(digest.value()),
          static_cast<long>(checked.wrong), checked.max_error_ratio);
      std::fflush(stdout);
      if (checked.wrong > 0) ++failures;
    }
  }
  // A finished rank has had every segment it sent acknowledged: leaving now
  // takes nothing from the others.
  registry.Shutdown();
  (*server)->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  std::printf("done: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moe::allreduce

int main(int argc, char** argv) {
  moe::KeepFreedMessageMemory();
  moe::SkipMutexDeadlockDetection();
  moe::SetFlagsUsage(
      "One rank of a gRPC ring all-reduce on generated data, checked element by element.\n"
      "Usage: allreduce_node --rank=R --peers=host:port,host:port,... [--lengths=...]");
  absl::ParseCommandLine(argc, argv);
  return moe::allreduce::Run();
}
