#include "common/proto_status.h"

#include <string>

#include "gtest/gtest.h"

namespace moe {
namespace {

TEST(ProtoStatusTest, ProtoStatusRoundTrips) {
  v1::Status proto;
  ToProtoStatus(absl::NotFoundError("request 42: unknown"), &proto);
  EXPECT_EQ(proto.code(), 5);
  EXPECT_EQ(FromProtoStatus(proto), absl::NotFoundError("request 42: unknown"));
  proto.set_code(999);
  EXPECT_EQ(FromProtoStatus(proto).code(), absl::StatusCode::kUnknown);
}

TEST(ProtoStatusTest, TruncatesHugeMessages) {
  v1::Status proto;
  ToProtoStatus(absl::InternalError(std::string(100000, 'a')), &proto);
  EXPECT_LT(proto.message().size(), 4096u);
}

}  // namespace
}  // namespace moe
