// The ring all-reduce alone, as real processes on loopback: N allreduce_node
// ranks (the expert servers' Collective service, links and algorithm) sum
// generated buffers; every rank checks every element against the float64
// sum, and all ranks must end with the same bits. Then a rank is stopped
// (SIGSTOP) in the middle of a collective: the others fail within the
// deadline, naming it. (That the next step works once the rank is back is
// tested on the expert servers, whose router numbers the steps.)
#include <csignal>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::PickFreePort;
using ::moe::local::RunfilePath;
using ::testing::HasSubstr;

struct Ranks {
  std::vector<std::unique_ptr<ChildProcess>> processes;
};

Ranks StartRanks(int n, const std::vector<std::string>& extra_flags) {
  std::vector<std::string> peers;
  for (int r = 0; r < n; ++r) peers.push_back(absl::StrCat("127.0.0.1:", PickFreePort()));
  Ranks ranks;
  for (int r = 0; r < n; ++r) {
    std::vector<std::string> args = {absl::StrCat("--rank=", r),
                                     "--peers=" + absl::StrJoin(peers, ",")};
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    ranks.processes.push_back(
        std::make_unique<ChildProcess>(RunfilePath("expert_service/allreduce/allreduce_node"), args));
  }
  return ranks;
}

// "key=value" fields of a result line.
std::map<std::string, std::string> Fields(const std::string& line) {
  std::map<std::string, std::string> fields;
  for (absl::string_view part : absl::StrSplit(line, ' ')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (!kv.second.empty()) fields[kv.first] = kv.second;
  }
  return fields;
}

class AllReduceProcessTest : public ::testing::TestWithParam<int> {};

TEST_P(AllReduceProcessTest, EveryLengthSumsRightAndAllRanksHoldTheSameBits) {
  const int n = GetParam();
  const std::vector<int64_t> lengths = {0, 1, n - 1, 1000003, 16 << 20};
  Ranks ranks = StartRanks(n, {"--lengths=" + absl::StrJoin(lengths, ","), "--seed=11"});
  // digest per length, from rank 0; every other rank must match it.
  std::map<std::string, std::string> digest_of;
  for (int r = 0; r < n; ++r) {
    ChildProcess& p = *ranks.processes[r];
    ASSERT_TRUE(p.WaitForLine("done:", absl::Minutes(5)).has_value()) << p.output();
    EXPECT_EQ(p.Stop(0, absl::Seconds(30)), 0) << p.output();
    int results = 0;
    for (absl::string_view line : absl::StrSplit(p.output(), '\n')) {
      if (!absl::StartsWith(line, "allreduce ")) continue;
      ASSERT_THAT(line, ::testing::Not(HasSubstr("FAILED"))) << "rank " << r;
      std::map<std::string, std::string> f = Fields(std::string(line));
      EXPECT_EQ(f["wrong"], "0") << "rank " << r << ": " << line;
      const int64_t length = std::stoll(f["length"]);
      // Each rank sends 2(N-1)/N of the buffer (chunks differ by at most
      // one element).
      const double bound = 2.0 * (n - 1) / n * length * 4;
      EXPECT_NEAR(std::stod(f["bytes_sent"]), bound, 2.0 * n * 4) << line;
      auto [it, first] = digest_of.emplace(f["length"], f["digest"]);
      EXPECT_EQ(it->second, f["digest"]) << "rank " << r << " differs at length " << f["length"];
      ++results;
    }
    EXPECT_EQ(results, static_cast<int>(lengths.size())) << p.output();
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, AllReduceProcessTest, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return absl::StrCat("n", info.param); });

TEST(AllReduceProcessFaultTest, AStoppedRankEndsTheCollectiveOnEveryOtherWithinTheDeadline) {
  const int n = 3;
  // Collectives back to back, each of many small segments, so the rank stops
  // in the middle of one; each takes well under the deadline, even under
  // the sanitizers.
  Ranks ranks = StartRanks(n, {"--lengths=1048576", "--repeats=1000", "--segment_elements=4096",
                               "--window_segments=1", "--deadline=3s", "--check=false"});
  ChildProcess& victim = *ranks.processes[1];
  ASSERT_TRUE(victim.WaitForLine("listening", absl::Seconds(60)).has_value());
  ASSERT_TRUE(ranks.processes[0]->WaitForLine("allreduce step=", absl::Seconds(60)).has_value())
      << ranks.processes[0]->output();
  ASSERT_EQ(kill(victim.pid(), SIGSTOP), 0);
  const absl::Time stopped = absl::Now();
  for (int r : {0, 2}) {
    ChildProcess& p = *ranks.processes[r];
    // "barrier step=S FAILED: ..." or "allreduce step=S length=L FAILED: ...".
    std::optional<std::string> failed = p.WaitForLine("FAILED: ", absl::Seconds(20));
    ASSERT_TRUE(failed.has_value()) << p.output();
    EXPECT_LT(absl::Now() - stopped, absl::Seconds(3 + 5)) << *failed;
    EXPECT_THAT(*failed, ::testing::Not(HasSubstr("] "))) << "a log line, not a result";
    EXPECT_THAT(*failed, ::testing::AnyOf(HasSubstr("DEADLINE_EXCEEDED"), HasSubstr("UNAVAILABLE")));
    EXPECT_THAT(*failed, HasSubstr("rank 1")) << "rank " << r << " should name the stopped rank";
  }
  kill(victim.pid(), SIGCONT);
  // The ranks that saw the failure exit with status 1 (every collective is
  // checked; none is left hanging).
  for (int r : {0, 2}) EXPECT_EQ(ranks.processes[r]->Stop(0, absl::Seconds(30)), 1);
}

}  // namespace
}  // namespace moe::testing
