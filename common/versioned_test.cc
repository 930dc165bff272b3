#include "common/versioned.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(VersionedTest, ASnapshotStaysWhatItWasAfterAnInstall) {
  Versioned<std::string> state("a", 1);
  const auto before = state.Get();
  const auto after = state.Install("b");
  EXPECT_EQ(before->version, 1u);
  EXPECT_EQ(before->value, "a");
  EXPECT_EQ(after->version, 2u);
  EXPECT_EQ(state.Get()->value, "b");
}

TEST(VersionedTest, InstallIfIsACompareAndSet) {
  Versioned<int> state(10, 5);
  EXPECT_TRUE(state.InstallIf(5, 11, 6).ok());
  absl::StatusOr<Versioned<int>::Snapshot> lost = state.InstallIf(5, 12, 7);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(lost.status().message().find("current version is 6"), std::string::npos);
  EXPECT_FALSE(state.InstallIf(6, 12, 6).ok());  // not higher
  EXPECT_EQ(state.Get()->value, 11);
}

// Readers racing writers always see a whole value: both halves written by
// the same install.
TEST(VersionedTest, ReadersNeverSeeHalfAnInstall) {
  Versioned<std::pair<uint64_t, uint64_t>> state({0, 0}, 0);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> torn{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&] {
      while (!stop) {
        const auto snapshot = state.Get();
        if (snapshot->value.first != snapshot->value.second ||
            snapshot->value.first != snapshot->version) {
          ++torn;
        }
      }
    });
  }
  for (uint64_t v = 1; v <= 20000; ++v) state.Install({v, v});
  stop = true;
  for (auto& t : readers) t.join();
  EXPECT_EQ(torn.load(), 0);
}

}  // namespace
}  // namespace moe
