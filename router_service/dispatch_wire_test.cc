// What goes on the wire parses as the DispatchRequest it stands for: every
// field of the request, and the rows as tokens.data, whatever their size.
// An answer comes back as an ExpertAnswer read from gRPC's own slices.
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

TEST(DispatchWireTest, AnswersAreReadFromTheSlicesTheyArrivedIn) {
  v1::DispatchResponse response;
  response.set_sequence_id(9);
  response.set_compute_dtype(v1::DTYPE_FP32);
  v1::Tensor* out = response.mutable_output();
  out->add_shape(2);
  out->add_shape(300);
  out->set_dtype(v1::DTYPE_FP32);
  std::vector<float> values(600);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * i;
  out->set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  const std::string bytes = response.SerializeAsString();
  // Three slices, cut inside the header and inside a row.
  std::vector<grpc::Slice> slices = {grpc::Slice(bytes.substr(0, 3)),
                                     grpc::Slice(bytes.substr(3, 1001)),
                                     grpc::Slice(bytes.substr(1004))};
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  ExpertAnswer answer;
  ASSERT_TRUE(grpc::SerializationTraits<ExpertAnswer>::Deserialize(&buffer, &answer).ok());
  EXPECT_EQ(answer.sequence_id(), 9u);
  absl::StatusOr<RowReader> rows = answer.OutputRows(2, 300);
  ASSERT_TRUE(rows.ok()) << rows.status();
  std::vector<float> read(600);
  for (int r = 0; r < 2; ++r) CopyRow(rows->Next(), rows->dtype(), &read[r * 300], 300);
  EXPECT_EQ(read, values);

  grpc::Slice garbage(std::string("\x0a\xff\xff"));
  grpc::ByteBuffer bad(&garbage, 1);
  EXPECT_EQ(grpc::SerializationTraits<ExpertAnswer>::Deserialize(&bad, &answer).error_code(),
            grpc::StatusCode::INTERNAL);
}

}  // namespace
}  // namespace moe::router
