// The ring all-reduce against its bound and against Gloo, in one run: for
// each N, N allreduce_node processes (our gRPC ring, as the expert servers
// run it) and then N Gloo processes (AllreduceRingChunked over TCP) sum the
// same generated buffers on loopback. Every element of every result is
// checked by its rank against the float64 sum. Prints, per size: the median
// time (the slowest rank's, per repeat), algorithm bandwidth S/t, bus
// bandwidth S/t x 2(N-1)/N, the bytes a rank sent over the 2(N-1)/N x S
// bound, and the ratio to Gloo; and the raw TCP loopback ceiling (one
// stream, measured here).
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "deploy/local/child_process.h"

ABSL_FLAG(std::string, ranks, "2,4,8", "Comma-separated rank counts N.");
ABSL_FLAG(std::string, sizes, "4096,262144,4194304,67108864",
          "Comma-separated buffer sizes in bytes (multiples of 4).");
ABSL_FLAG(bool, gloo, true, "Also run Gloo's ring on the same sizes.");

namespace moe::bench {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::PickFreePort;
using ::moe::local::RunfilePath;

struct Timing {
  double median_seconds = 0;
  int64_t bytes_sent = 0;  // by rank 0, per collective
  int64_t wrong = 0;
  bool digests_agree = true;
  bool ok = false;
};

int Repeats(int64_t bytes) {
  if (bytes <= 4096) return 200;
  if (bytes <= (256 << 10)) return 50;
  if (bytes <= (4 << 20)) return 10;
  return 7;  // 64 MiB: enough for a median that repeats within ~10%
}

std::map<std::string, std::string> Fields(absl::string_view line) {
  std::map<std::string, std::string> fields;
  for (absl::string_view part : absl::StrSplit(line, ' ')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (!kv.second.empty()) fields[kv.first] = kv.second;
  }
  return fields;
}

// Runs N ranks to completion; per repeat, the slowest rank's time.
Timing Collect(std::vector<std::unique_ptr<ChildProcess>>& ranks, int repeats) {
  Timing timing;
  std::vector<double> slowest(repeats, 0.0);
  std::vector<std::string> digests(repeats);
  for (size_t r = 0; r < ranks.size(); ++r) {
    ChildProcess& p = *ranks[r];
    if (!p.WaitForLine("done:", absl::Minutes(10)).has_value() ||
        p.Stop(0, absl::Seconds(30)) != 0) {
      std::fprintf(stderr, "rank %zu failed:\n%s\n", r, p.output().c_str());
      return timing;
    }
    int i = 0;
    for (absl::string_view line : absl::StrSplit(p.output(), '\n')) {
      if (!absl::StartsWith(line, "allreduce ") || i >= repeats) continue;
      std::map<std::string, std::string> f = Fields(line);
      slowest[i] = std::max(slowest[i], std::stod(f["seconds"]));
      timing.wrong += std::stoll(f["wrong"]);
      if (r == 0) {
        timing.bytes_sent = std::stoll(f["bytes_sent"]);
        digests[i] = f["digest"];
      } else if (digests[i] != f["digest"]) {
        timing.digests_agree = false;
      }
      ++i;
    }
    if (i != repeats) {
      std::fprintf(stderr, "rank %zu printed %d results, expected %d\n", r, i, repeats);
      return timing;
    }
  }
  std::sort(slowest.begin(), slowest.end());
  timing.median_seconds = slowest[repeats / 2];
  timing.ok = true;
  return timing;
}

Timing RunOurs(int n, int64_t floats, int repeats) {
  std::vector<std::string> peers;
  for (int r = 0; r < n; ++r) peers.push_back(absl::StrCat("127.0.0.1:", PickFreePort()));
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.push_back(std::make_unique<ChildProcess>(
        RunfilePath("expert_service/allreduce/allreduce_node"),
        std::vector<std::string>{absl::StrCat("--rank=", r), "--peers=" + absl::StrJoin(peers, ","),
                                 absl::StrCat("--lengths=", floats),
                                 absl::StrCat("--repeats=", repeats), "--seed=3"}));
  }
  return Collect(ranks, repeats);
}

Timing RunGloo(int n, int64_t floats, int repeats) {
  char dir_template[] = "/tmp/gloo_store.XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.push_back(std::make_unique<ChildProcess>(
        RunfilePath("bench/gloo_allreduce_node"),
        std::vector<std::string>{absl::StrCat("--rank=", r), absl::StrCat("--size=", n),
                                 "--store_dir=" + dir, absl::StrCat("--lengths=", floats),
                                 absl::StrCat("--repeats=", repeats), "--seed=3"}));
  }
  Timing timing = Collect(ranks, repeats);
  std::filesystem::remove_all(dir);
  return timing;
}

// One TCP stream over loopback, 1 MiB writes, for `seconds`: bytes/s.
double TcpLoopbackCeiling(double seconds) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  listen(listener, 1);
  int64_t received = 0;
  std::thread reader([&] {
    const int fd = accept(listener, nullptr, nullptr);
    std::vector<char> buffer(1 << 20);
    ssize_t n;
    while ((n = read(fd, buffer.data(), buffer.size())) > 0) received += n;
    close(fd);
  });
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  std::vector<char> buffer(1 << 20, 1);
  const absl::Time start = absl::Now();
  while (absl::ToDoubleSeconds(absl::Now() - start) < seconds) {
    if (write(fd, buffer.data(), buffer.size()) <= 0) break;
  }
  close(fd);
  reader.join();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
  close(listener);
  return received / elapsed;
}

std::string Size(int64_t bytes) {
  if (bytes >= (1 << 20)) return absl::StrCat(bytes >> 20, " MiB");
  return absl::StrCat(bytes >> 10, " KiB");
}

int Main() {
  std::vector<int> ns;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_ranks), ',')) {
    int n;
    if (!absl::SimpleAtoi(s, &n) || n < 1) return 2;
    ns.push_back(n);
  }
  std::vector<int64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    int64_t b;
    if (!absl::SimpleAtoi(s, &b) || b < 4 || b % 4 != 0) return 2;
    sizes.push_back(b);
  }
  const double tcp = TcpLoopbackCeiling(1.0);
  std::printf("raw TCP loopback, one stream: %.2f GB/s\n\n", tcp / 1e9);
  std::printf("%3s %8s | %10s %8s %8s %7s | %10s %8s | %12s %s\n", "N", "size", "ours ms",
              "algbw", "busbw", "sent/bd", "gloo ms", "busbw", "busbw ratio", "checked");
  int failures = 0;
  for (int n : ns) {
    for (int64_t bytes : sizes) {
      const int64_t floats = bytes / 4;
      const int repeats = Repeats(bytes);
      const Timing ours = RunOurs(n, floats, repeats);
      const Timing gloo = absl::GetFlag(FLAGS_gloo) ? RunGloo(n, floats, repeats) : Timing{};
      const double factor = n > 1 ? 2.0 * (n - 1) / n : 0.0;
      auto busbw = [&](const Timing& t) {
        return t.ok && t.median_seconds > 0 ? bytes / t.median_seconds * factor / 1e9 : 0.0;
      };
      const double bound = factor * bytes;
      const bool checked = ours.ok && ours.wrong == 0 && ours.digests_agree &&
                           (!absl::GetFlag(FLAGS_gloo) || (gloo.ok && gloo.wrong == 0));
      if (!checked) ++failures;
      std::printf("%3d %8s | %10.3f %8.3f %8.3f %7.3f | %10.3f %8.3f | %12.2f %s\n", n,
                  Size(bytes).c_str(), ours.median_seconds * 1e3,
                  ours.median_seconds > 0 ? bytes / ours.median_seconds / 1e9 : 0.0, busbw(ours),
                  bound > 0 ? ours.bytes_sent / bound : 0.0, gloo.median_seconds * 1e3,
                  busbw(gloo), busbw(gloo) > 0 ? busbw(ours) / busbw(gloo) : 0.0,
                  checked ? "all elements right, ranks equal" : "WRONG OR FAILED");
      std::fflush(stdout);
    }
  }
  std::printf("\nbandwidths in GB/s; time: median over repeats of the slowest rank\n");
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moe::bench::Main();
}
