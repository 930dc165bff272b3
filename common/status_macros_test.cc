#include "common/status_macros.h"

#include <memory>

#include "gtest/gtest.h"

namespace moe {
namespace {

absl::StatusOr<std::unique_ptr<int>> MakeInt(bool ok) {
  if (!ok) return absl::NotFoundError("no int");
  return std::make_unique<int>(7);
}

absl::Status UseInt(bool ok, int* out) {
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<int> value, MakeInt(ok));
  *out = *value;
  return absl::OkStatus();
}

absl::Status Chain(bool ok) {
  int unused = 0;
  MOE_RETURN_IF_ERROR(UseInt(ok, &unused));
  return absl::InternalError("reached the end");
}

TEST(StatusMacrosTest, AssignOrReturnMovesTheValue) {
  int out = 0;
  EXPECT_TRUE(UseInt(true, &out).ok());
  EXPECT_EQ(out, 7);
}

TEST(StatusMacrosTest, AssignOrReturnPropagatesTheError) {
  int out = 0;
  const absl::Status status = UseInt(false, &out);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "no int");
  EXPECT_EQ(out, 0);
}

TEST(StatusMacrosTest, ReturnIfErrorStopsOnlyOnError) {
  EXPECT_EQ(Chain(false).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Chain(true).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace moe
