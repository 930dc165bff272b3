#include "expert_service/allreduce/ring_segment.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::allreduce {
namespace {

using ::testing::HasSubstr;

v1::RingChunk Header() {
  v1::RingChunk header;
  header.mutable_id()->set_step(12);
  header.mutable_id()->set_group_id(0xfeedbeefcafeULL);
  header.set_sender_rank(3);
  header.set_phase(v1::RING_PHASE_ALL_GATHER);
  header.set_ring_step(2);
  header.set_chunk_index(1);
  header.set_offset_elements(1234567);
  header.set_buffer_elements(9999999);
  header.set_sequence_id(77);
  return header;
}

std::vector<float> Floats(int n) {
  std::vector<float> values(n);
  for (int i = 0; i < n; ++i) values[i] = 0.5f * static_cast<float>(i) - 100.25f;
  return values;
}

// `bytes` as a ByteBuffer of slices of `slice_bytes`.
grpc::ByteBuffer Cut(const std::string& bytes, size_t slice_bytes) {
  std::vector<grpc::Slice> slices;
  for (size_t i = 0; i < bytes.size(); i += slice_bytes) {
    slices.emplace_back(bytes.data() + i, std::min(slice_bytes, bytes.size() - i));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

std::string Flatten(grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes;
}

std::string SentBytes(const std::vector<float>& values) {
  RingSegment segment{Header(), values.data(), static_cast<int64_t>(values.size())};
  grpc::ByteBuffer wire;
  bool own = false;
  EXPECT_TRUE(grpc::SerializationTraits<RingSegment>::Serialize(segment, &wire, &own).ok());
  return Flatten(wire);
}

// Whatever the slice boundaries (floats split across them, one byte per
// slice), the header and every float come through.
TEST(ReceivedSegmentTest, ParsesWhatTheLinkSendsCutAnywhere) {
  const std::vector<float> values = Floats(1001);
  const std::string bytes = SentBytes(values);
  for (size_t slice_bytes : {1, 2, 3, 4, 5, 7, 64, 1021, 100000}) {
    grpc::ByteBuffer wire = Cut(bytes, slice_bytes);
    ReceivedSegment segment;
    ASSERT_TRUE(ReceivedSegment::FromByteBuffer(wire, segment).ok()) << slice_bytes;
    EXPECT_EQ(segment.wire_header().SerializeAsString(), Header().SerializeAsString())
        << slice_bytes;
    ASSERT_EQ(segment.payload_bytes(), values.size() * sizeof(float));
    std::vector<float> copied(values.size(), -1.0f);
    segment.CopyPayloadTo(copied.data());
    EXPECT_EQ(copied, values) << slice_bytes;
    std::vector<float> summed(values.size(), 1.0f);
    segment.AddPayloadTo(summed.data());
    for (size_t i = 0; i < values.size(); ++i) {
      ASSERT_EQ(summed[i], 1.0f + values[i]) << "slice_bytes " << slice_bytes << " float " << i;
    }
  }
}

// A RingChunk serialized by protobuf itself (data between other fields, and
// a second data field, which replaces the first) parses the same.
TEST(ReceivedSegmentTest, ParsesAnyProtobufEncoding) {
  const std::vector<float> first = Floats(3);
  const std::vector<float> last = Floats(5);
  v1::RingChunk with_data = Header();
  with_data.set_data(reinterpret_cast<const char*>(first.data()), first.size() * sizeof(float));
  v1::RingChunk second_data;
  second_data.set_data(reinterpret_cast<const char*>(last.data()), last.size() * sizeof(float));
  second_data.mutable_abort()->set_message("from the predecessor");
  const std::string bytes = with_data.SerializeAsString() + second_data.SerializeAsString();

  grpc::ByteBuffer wire = Cut(bytes, 6);
  ReceivedSegment segment;
  ASSERT_TRUE(ReceivedSegment::FromByteBuffer(wire, segment).ok());
  v1::RingChunk expected = Header();
  expected.mutable_abort()->set_message("from the predecessor");
  EXPECT_EQ(segment.wire_header().SerializeAsString(), expected.SerializeAsString());
  ASSERT_EQ(segment.payload_bytes(), last.size() * sizeof(float));
  std::vector<float> copied(last.size());
  segment.CopyPayloadTo(copied.data());
  EXPECT_EQ(copied, last);
}

TEST(ReceivedSegmentTest, FromChunkKeepsHeaderAndData) {
  const std::vector<float> values = Floats(9);
  v1::RingChunk chunk = Header();
  chunk.set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  const ReceivedSegment segment = ReceivedSegment::FromChunk(chunk);
  EXPECT_FALSE(segment.wire_header().has_abort());
  EXPECT_TRUE(segment.wire_header().data().empty());
  std::vector<float> copied(values.size());
  segment.CopyPayloadTo(copied.data());
  EXPECT_EQ(copied, values);
}

TEST(ReceivedSegmentTest, HeaderFieldsMapBothWays) {
  const ReceivedSegment segment = ReceivedSegment::FromChunk(Header());
  const RingHeader& header = segment.header();
  EXPECT_EQ(header.step, 12u);
  EXPECT_EQ(header.group_id, 0xfeedbeefcafeULL);
  EXPECT_EQ(header.sender_rank, 3);
  EXPECT_EQ(header.phase, RingPhase::kAllGather);
  EXPECT_EQ(header.ring_step, 2);
  EXPECT_EQ(header.chunk_index, 1);
  EXPECT_EQ(header.offset_elements, 1234567);
  EXPECT_EQ(header.buffer_elements, 9999999);
  EXPECT_TRUE(header.abort.ok());
  v1::RingChunk back;
  RingHeaderToChunk(header, &back);
  back.set_sequence_id(77);
  EXPECT_EQ(back.SerializeAsString(), Header().SerializeAsString());
}

TEST(ReceivedSegmentTest, AnAbortIsNeverOkAndAnUnknownPhaseIsKept) {
  v1::RingChunk chunk = Header();
  chunk.mutable_abort()->set_message("code 0");
  chunk.set_phase(static_cast<v1::RingPhase>(77));
  const ReceivedSegment segment = ReceivedSegment::FromChunk(chunk);
  EXPECT_EQ(segment.header().abort.code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(static_cast<int>(segment.header().phase), 77);  // the collective rejects it
}

// Every truncation of a valid message is rejected with a status, and so is
// garbage; nothing reads past the end.
TEST(ReceivedSegmentTest, RejectsTruncatedAndMalformedMessages) {
  const std::string bytes = SentBytes(Floats(17));
  int rejected = 0;
  for (size_t length = 1; length < bytes.size(); ++length) {
    grpc::ByteBuffer wire = Cut(bytes.substr(0, length), 5);
    ReceivedSegment segment;
    const grpc::Status status = ReceivedSegment::FromByteBuffer(wire, segment);
    if (!status.ok()) {
      ++rejected;
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_THAT(status.error_message(), HasSubstr("malformed ring segment"));
    }
  }
  // A prefix that ends exactly between two header fields is a valid,
  // shorter message; the data field is last, so every cut inside it fails.
  EXPECT_GE(rejected, static_cast<int>(17 * sizeof(float)));

  for (const std::string& garbage : {std::string("\x0f", 1), std::string("\x43\x01", 2),
                                     std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11)}) {
    grpc::ByteBuffer wire = Cut(garbage, 1);
    ReceivedSegment segment;
    EXPECT_EQ(ReceivedSegment::FromByteBuffer(wire, segment).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
}

}  // namespace
}  // namespace moe::allreduce
