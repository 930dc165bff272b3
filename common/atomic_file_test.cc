#include "common/atomic_file.h"

#include <sys/stat.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

std::string Read(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

bool Exists(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0;
}

TEST(AtomicFileTest, TheTargetIsTheOldFileUntilCommit) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/atomic/a/b");
  ASSERT_TRUE(MakeDirectories(dir).ok());
  ASSERT_TRUE(MakeDirectories(dir).ok());  // already there: fine
  const std::string path = dir + "/file";
  std::ofstream(path) << "old";
  {
    absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Create(path);
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE(writer->Append("new contents", 12).ok());
    EXPECT_EQ(Read(path), "old");
    // Dropped without Commit: the old file stays, no temporary is left.
  }
  EXPECT_EQ(Read(path), "old");
  EXPECT_FALSE(Exists(absl::StrCat(path, ".tmp.", getpid())));
  absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Create(path);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE(writer->Append("new", 3).ok());
  ASSERT_TRUE(writer->Append(" contents", 9).ok());
  EXPECT_EQ(writer->bytes(), 12);
  ASSERT_TRUE(writer->Commit().ok());
  EXPECT_EQ(Read(path), "new contents");
}

TEST(AtomicFileTest, ErrorsNameThePath) {
  const absl::StatusOr<AtomicFileWriter> writer =
      AtomicFileWriter::Create("/nonexistent-dir/for/sure/file");
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(writer.status().message(), ::testing::HasSubstr("/nonexistent-dir/for/sure/file"));
  const std::string file = absl::StrCat(::testing::TempDir(), "/plain");
  std::ofstream(file) << "x";
  EXPECT_FALSE(MakeDirectories(file + "/sub").ok());
}

}  // namespace
}  // namespace moe
