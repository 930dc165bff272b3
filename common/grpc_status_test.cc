#include "common/grpc_status.h"

#include <string>

#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(GrpcStatusTest, CodesMapOneToOne) {
  for (int code = 0; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), code ? "m" : "");
    const grpc::Status grpc_status = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(grpc_status.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(grpc_status), status);
  }
}

TEST(GrpcStatusTest, KeepsTheMessage) {
  const grpc::Status s = ToGrpcStatus(absl::InvalidArgumentError("x: bad"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "x: bad");
}

TEST(GrpcStatusTest, TruncatesHugeMessages) {
  const std::string huge(100000, 'a');
  EXPECT_LT(ToGrpcStatus(absl::InternalError(huge)).error_message().size(), 4096u);
}

}  // namespace
}  // namespace moe
