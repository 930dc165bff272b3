// What goes on the wire parses as the DispatchRequest it stands for: every
// field of the request, and the rows as tokens.data, whatever their size.
#include "router_service/dispatch_wire.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moe::router {
namespace {

v1::DispatchRequest Parsed(const DispatchWire& wire) {
  grpc::ByteBuffer buffer;
  bool own = false;
  EXPECT_TRUE(grpc::SerializationTraits<DispatchWire>::Serialize(wire, &buffer, &own).ok());
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  v1::DispatchRequest parsed;
  EXPECT_TRUE(parsed.ParseFromString(bytes));
  return parsed;
}

TEST(DispatchWireTest, ParsesAsTheRequestWithItsRows) {
  v1::DispatchRequest request;
  request.set_sequence_id(77);
  request.set_expert_id(5);
  request.set_layer(2);
  request.set_request_id(1234);
  request.set_deadline_unix_micros(99);
  request.set_tokens_rounded_to_bf16(true);
  request.mutable_version()->set_placement_epoch(3);
  request.mutable_version()->set_weights_step(4);
  request.mutable_tokens()->add_shape(2);
  request.mutable_tokens()->add_shape(300);
  request.mutable_tokens()->set_dtype(v1::DTYPE_BF16);
  for (size_t size :
       {size_t{0}, size_t{1}, size_t{127}, size_t{128}, size_t{1200}, size_t{1} << 20}) {
    SCOPED_TRACE(size);
    std::string rows(size, '\0');
    for (size_t i = 0; i < size; ++i) rows[i] = static_cast<char>(i * 7);
    v1::DispatchRequest expected = request;
    expected.mutable_tokens()->set_data(rows);
    const v1::DispatchRequest parsed = Parsed({&request, rows});
    EXPECT_EQ(parsed.SerializeAsString(), expected.SerializeAsString());
  }
}

}  // namespace
}  // namespace moe::router
