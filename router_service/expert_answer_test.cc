// An answer read from the wire is the DispatchResponse protobuf would parse
// (its output's rows read where they lie), however the bytes are split and
// whichever valid encoding the server used; malformed answers and outputs
// of the wrong size are errors that say so.
#include "router_service/expert_answer.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/proto_wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::router {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kRows = 3;
constexpr int64_t kD = 5;

v1::DispatchResponse Answer() {
  v1::DispatchResponse response;
  response.set_sequence_id(41);
  response.set_compute_micros(1234);
  response.set_compute_dtype(v1::DTYPE_FP32);
  response.mutable_server_version()->set_placement_epoch(7);
  v1::Tensor* out = response.mutable_output();
  out->add_shape(kRows);
  out->add_shape(kD);
  out->set_dtype(v1::DTYPE_FP32);
  std::vector<float> values(kRows * kD);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * i - 1.0f;
  out->set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return response;
}

absl::StatusOr<ExpertAnswer> Read(absl::string_view bytes, size_t cut) {
  const std::vector<absl::string_view> pieces = {bytes.substr(0, cut), bytes.substr(cut)};
  return ExpertAnswer::FromWire(pieces, nullptr);
}

// The answer's output rows, as fp32.
std::vector<float> Rows(const ExpertAnswer& answer) {
  absl::StatusOr<RowReader> reader = answer.OutputRows(kRows, kD);
  EXPECT_TRUE(reader.ok()) << reader.status();
  std::vector<float> rows(kRows * kD);
  if (!reader.ok()) return rows;
  for (int64_t r = 0; r < kRows; ++r) CopyRow(reader->Next(), reader->dtype(), &rows[r * kD], kD);
  return rows;
}

std::vector<float> Floats(const std::string& data) {
  std::vector<float> values(data.size() / sizeof(float));
  std::memcpy(values.data(), data.data(), values.size() * sizeof(float));
  return values;
}

TEST(ExpertAnswerTest, FromTheWireWhereverTheBytesAreCut) {
  const v1::DispatchResponse response = Answer();
  const std::string bytes = response.SerializeAsString();
  v1::DispatchResponse without_data = response;
  without_data.mutable_output()->clear_data();
  for (size_t cut = 0; cut <= bytes.size(); ++cut) {
    SCOPED_TRACE(cut);
    absl::StatusOr<ExpertAnswer> answer = Read(bytes, cut);
    ASSERT_TRUE(answer.ok()) << answer.status();
    EXPECT_EQ(answer->sequence_id(), 41u);
    EXPECT_EQ(answer->response().SerializeAsString(), without_data.SerializeAsString());
    EXPECT_EQ(Rows(*answer), Floats(response.output().data()));
  }
}

TEST(ExpertAnswerTest, AParsedResponseReadsItsOwnOutput) {
  const v1::DispatchResponse response = Answer();
  ExpertAnswer answer(response);
  EXPECT_EQ(Rows(answer), Floats(response.output().data()));
  ExpertAnswer moved = std::move(answer);
  EXPECT_EQ(Rows(moved), Floats(response.output().data()));
}

// Encodings a server could send that protobuf reads as one response:
// outputs merged, the last data counting, an error replacing the output.
TEST(ExpertAnswerTest, ReadsEveryEncodingAsProtobufDoes) {
  const v1::DispatchResponse full = Answer();
  v1::DispatchResponse shape_only;
  *shape_only.mutable_output()->mutable_shape() = full.output().shape();
  v1::DispatchResponse data_only;
  data_only.mutable_output()->set_data(full.output().data());
  data_only.mutable_output()->set_dtype(v1::DTYPE_FP32);
  v1::DispatchResponse other_data;
  other_data.mutable_output()->set_data(std::string(full.output().data().size(), '\0'));
  v1::DispatchResponse error;
  error.mutable_error()->set_code(13);
  error.mutable_error()->set_message("kernel failed");
  v1::DispatchResponse tail;
  tail.set_sequence_id(42);
  const std::vector<std::vector<const v1::DispatchResponse*>> encodings = {
      {&shape_only, &data_only},
      {&full, &other_data},
      {&other_data, &full},
      {&full, &error},
      {&error, &full},
      {&full, &error, &shape_only},
      {&full, &tail},
  };
  for (size_t i = 0; i < encodings.size(); ++i) {
    SCOPED_TRACE(i);
    std::string bytes;
    for (const v1::DispatchResponse* part : encodings[i]) bytes += part->SerializeAsString();
    v1::DispatchResponse expected;
    ASSERT_TRUE(expected.ParseFromString(bytes));
    for (size_t cut : {size_t{0}, bytes.size() / 3, bytes.size() - 1}) {
      absl::StatusOr<ExpertAnswer> answer = Read(bytes, cut);
      ASSERT_TRUE(answer.ok()) << answer.status();
      v1::DispatchResponse without_data = expected;
      const std::string data = expected.output().data();
      if (without_data.has_output()) without_data.mutable_output()->clear_data();
      EXPECT_EQ(answer->response().SerializeAsString(), without_data.SerializeAsString());
      // As the parsed response's own output reads.
      const ExpertAnswer parsed(expected);
      ASSERT_EQ(answer->OutputRows(kRows, kD).status(), parsed.OutputRows(kRows, kD).status());
      if (parsed.OutputRows(kRows, kD).ok()) {
        EXPECT_EQ(Rows(*answer), Floats(data));
      }
    }
  }
}

TEST(ExpertAnswerTest, MalformedAnswersAreNamed) {
  const std::string bytes = Answer().SerializeAsString();
  for (size_t length : {size_t{1}, size_t{5}, bytes.size() - 1}) {
    const std::string cut = bytes.substr(0, length);
    if (v1::DispatchResponse().ParseFromString(cut)) continue;  // cut between fields
    absl::StatusOr<ExpertAnswer> answer = Read(cut, length / 2);
    ASSERT_FALSE(answer.ok()) << length;
    EXPECT_EQ(answer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(answer.status().message(), HasSubstr("malformed Dispatch answer"));
  }
  // An output whose own fields are cut short inside it.
  std::string inner;
  AppendLengthDelimited(v1::Tensor::kDataFieldNumber, 100, inner);
  inner += "short";
  std::string outer;
  AppendLengthDelimited(v1::DispatchResponse::kOutputFieldNumber, inner.size(), outer);
  outer += inner;
  absl::StatusOr<ExpertAnswer> answer = Read(outer, 2);
  ASSERT_FALSE(answer.ok());
  EXPECT_THAT(answer.status().message(), HasSubstr("output: truncated data"));
}

TEST(ExpertAnswerTest, OutputsOfTheWrongSizeOrTypeAreNamed) {
  v1::DispatchResponse response = Answer();
  response.mutable_output()->mutable_data()->pop_back();
  EXPECT_THAT(ExpertAnswer(response).OutputRows(kRows, kD).status().message(),
              HasSubstr("expert output: expected 60 bytes"));
  EXPECT_THAT(ExpertAnswer(Answer()).OutputRows(kRows + 1, kD).status().message(),
              HasSubstr("expert output: expected"));
  response = Answer();
  response.mutable_output()->set_dtype(v1::DType(99));
  EXPECT_FALSE(ExpertAnswer(response).OutputRows(kRows, kD).ok());
  EXPECT_FALSE(ExpertAnswer(v1::DispatchResponse()).OutputRows(kRows, kD).ok());
}

}  // namespace
}  // namespace moe::router
