// WireReader reads what protobuf wrote however the bytes are split, and
// refuses (never reads past) what protobuf would refuse.
#include "common/wire_reader.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "proto/tensor.pb.h"

namespace moe {
namespace {

std::vector<absl::string_view> SplitAt(absl::string_view bytes, std::vector<size_t> cuts) {
  std::vector<absl::string_view> pieces;
  size_t from = 0;
  for (size_t cut : cuts) {
    pieces.push_back(bytes.substr(from, cut - from));
    from = cut;
  }
  pieces.push_back(bytes.substr(from));
  return pieces;
}

// Reads a v1::Tensor field by field: shape and dtype re-encoded into a
// header, data located. False where the reader refuses.
bool ReadTensor(absl::Span<const absl::string_view> pieces, v1::Tensor& header, std::string& data) {
  WireReader reader(pieces);
  std::string encoded;
  std::vector<absl::string_view> runs;
  while (!reader.AtEnd()) {
    uint64_t field;
    int wire_type;
    if (!reader.ReadTag(field, wire_type)) return false;
    if (field == v1::Tensor::kDataFieldNumber && wire_type == kLengthDelimited) {
      uint64_t length;
      runs.clear();
      if (!reader.ReadLength(length) || !reader.Take(length, runs)) return false;
      continue;
    }
    if (!reader.CopyField(field, wire_type, encoded)) return false;
  }
  data.clear();
  for (absl::string_view run : runs) data.append(run.data(), run.size());
  return header.ParseFromString(encoded);
}

v1::Tensor Sample() {
  v1::Tensor tensor;
  tensor.add_shape(3);
  tensor.add_shape(70);
  tensor.set_dtype(v1::DTYPE_BF16);
  std::string data(420, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 13);
  tensor.set_data(data);
  return tensor;
}

TEST(WireReaderTest, ReadsEveryFieldWhereverTheBytesAreCut) {
  const v1::Tensor tensor = Sample();
  const std::string bytes = tensor.SerializeAsString();
  for (size_t cut = 0; cut <= bytes.size(); ++cut) {
    for (size_t second : {cut, (cut + bytes.size()) / 2, bytes.size()}) {
      SCOPED_TRACE(cut);
      v1::Tensor header;
      std::string data;
      ASSERT_TRUE(ReadTensor(SplitAt(bytes, {cut, std::max(cut, second)}), header, data));
      EXPECT_EQ(data, tensor.data());
      EXPECT_EQ(header.dtype(), tensor.dtype());
      ASSERT_EQ(header.shape_size(), 2);
      EXPECT_EQ(header.shape(1), 70);
    }
  }
  // One byte per piece.
  std::vector<size_t> every;
  for (size_t i = 1; i < bytes.size(); ++i) every.push_back(i);
  v1::Tensor header;
  std::string data;
  ASSERT_TRUE(ReadTensor(SplitAt(bytes, every), header, data));
  EXPECT_EQ(data, tensor.data());
}

TEST(WireReaderTest, RefusesTruncatedAndMalformedMessages) {
  const std::string bytes = Sample().SerializeAsString();
  for (size_t length = 1; length < bytes.size(); ++length) {
    v1::Tensor header;
    std::string data;
    const std::string cut = bytes.substr(0, length);
    // Cut inside a field: refused. (Cut between fields is a valid message.)
    const bool read = ReadTensor({cut}, header, data);
    EXPECT_EQ(read, v1::Tensor().ParseFromString(cut)) << "length " << length;
  }
  std::string zero_field;
  AppendVarint(0 << 3, zero_field);  // field 0
  AppendVarint(1, zero_field);
  v1::Tensor header;
  std::string data;
  EXPECT_FALSE(ReadTensor({zero_field}, header, data));
  // A length above 2^31 - 1 (protobuf's limit), with no bytes behind it.
  std::string huge;
  AppendVarint((v1::Tensor::kDataFieldNumber << 3) | kLengthDelimited, huge);
  AppendVarint(uint64_t{1} << 31, huge);
  EXPECT_FALSE(ReadTensor({huge}, header, data));
  // A varint of 11 bytes.
  std::string overlong;
  AppendVarint((2 << 3) | 0, overlong);
  overlong.append(10, '\x80');
  overlong.push_back('\x01');
  EXPECT_FALSE(ReadTensor({overlong}, header, data));
  // An unknown wire type.
  std::string wire_type_7 = {static_cast<char>((2 << 3) | 7), '\x01'};
  EXPECT_FALSE(ReadTensor({wire_type_7}, header, data));
}

}  // namespace
}  // namespace moe
