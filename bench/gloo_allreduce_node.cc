// One rank of Gloo's ring all-reduce (AllreduceRingChunked over its TCP
// transport) on the same generated inputs as allreduce_node, with the same
// output lines, for allreduce_bench. Ranks meet through a FileStore in
// --store_dir. Each length gets a fresh context: Gloo's TCP pairs size
// their socket buffers from their first send, so a small first message
// would slow every later large one (not a fair baseline).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/digest.h"
#include "expert_service/allreduce/allreduce_inputs.h"
#include "gloo/allreduce_ring_chunked.h"
#include "gloo/barrier_all_to_all.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/file_store.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/device.h"

ABSL_FLAG(int, rank, 0, "This rank.");
ABSL_FLAG(int, size, 2, "Ranks.");
ABSL_FLAG(std::string, store_dir, "", "Directory of the rendezvous FileStore (required).");
ABSL_FLAG(std::string, lengths, "1000", "Comma-separated buffer lengths, in floats.");
ABSL_FLAG(int, repeats, 1, "Times each length is run.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the generated inputs.");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int rank = absl::GetFlag(FLAGS_rank);
  const int size = absl::GetFlag(FLAGS_size);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (absl::GetFlag(FLAGS_store_dir).empty()) {
    std::fprintf(stderr, "--store_dir is required\n");
    return 2;
  }
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto device = gloo::transport::tcp::CreateDevice(attr);
  gloo::rendezvous::FileStore store(absl::GetFlag(FLAGS_store_dir));
  int failures = 0;
  int context_index = 0;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',', absl::SkipEmpty())) {
    int64_t length = 0;
    if (!absl::SimpleAtoi(s, &length) || length < 0) return 2;
    gloo::rendezvous::PrefixStore prefix(absl::StrCat("ctx", context_index++), store);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->connectFullMesh(prefix, device);
    std::vector<float> input(length), buffer(length);
    moe::allreduce::FillAllReduceInput(seed, rank, absl::MakeSpan(input));
    std::vector<float*> pointers = {buffer.data()};
    for (int repeat = 0; repeat < absl::GetFlag(FLAGS_repeats); ++repeat) {
      std::copy(input.begin(), input.end(), buffer.begin());
      gloo::AllreduceRingChunked<float> allreduce(context, pointers, static_cast<int>(length));
      gloo::BarrierAllToAll barrier(context);
      barrier.run();
      const absl::Time start = absl::Now();
      allreduce.run();
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      // No rank checks (heavy) while another is still being timed.
      barrier.run();
      const moe::allreduce::AllReduceCheck checked =
          moe::allreduce::CheckAllReduce(buffer, seed, size);
      moe::ArrayDigest64 digest;
      digest.AddFloats(buffer);
      std::printf(
          "allreduce step=%d length=%ld seconds=%.6f bytes_sent=0 digest=%016lx wrong=%ld "
          "max_error_ratio=%.3f\n",
          repeat, static_cast<long>(length), seconds, static_cast<unsigned long>(digest.value()),
          static_cast<long>(checked.wrong), checked.max_error_ratio);
      std::fflush(stdout);
      if (checked.wrong > 0) ++failures;
    }
    // Everyone done with this context before it goes: through the store,
    // since a rank that closes its pairs while another is still in a
    // barrier makes that one throw.
    prefix.set(absl::StrCat("done", rank), std::vector<char>{1});
    std::vector<std::string> done_keys;
    for (int r = 0; r < size; ++r) done_keys.push_back(absl::StrCat("done", r));
    prefix.wait(done_keys);
  }
  std::printf("done: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
