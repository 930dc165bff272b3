// RowReader gives every row however the bytes were split (unaligned, rows
// straddling pieces), and AddScaledRow adds them with the bits of the plain
// fp32 expression, finding any NaN or Inf.
#include "router_service/row_reader.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/bfloat16.h"
#include "gtest/gtest.h"

namespace moe::router {
namespace {

constexpr int64_t kRows = 5;
constexpr int64_t kD = 37;

// kRows x kD values, as fp32 or bf16 bytes, after `skew` bytes of padding
// (so nothing is aligned).
std::string RowBytes(DType dtype, size_t skew, std::vector<float>& values) {
  std::string bytes(skew, 'x');
  values.clear();
  for (int64_t i = 0; i < kRows * kD; ++i) {
    float v = std::sin(0.37f * i) * 3.0f;
    if (dtype == DType::kFloat32) {
      bytes.append(reinterpret_cast<const char*>(&v), sizeof(v));
    } else {
      uint16_t half;
      FloatsToBf16({&v, 1}, {&half, 1});
      v = Bf16ToFloat(half);
      bytes.append(reinterpret_cast<const char*>(&half), sizeof(half));
    }
    values.push_back(v);
  }
  return bytes;
}

std::vector<absl::string_view> Pieces(absl::string_view bytes, size_t piece) {
  std::vector<absl::string_view> pieces;
  for (size_t at = 0; at < bytes.size(); at += piece) pieces.push_back(bytes.substr(at, piece));
  return pieces;
}

TEST(RowReaderTest, EveryRowWhateverThePiecesAndAlignment) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (size_t skew : {0, 1, 3}) {
      std::vector<float> values;
      const std::string padded = RowBytes(dtype, skew, values);
      const absl::string_view bytes = absl::string_view(padded).substr(skew);
      for (size_t piece : {bytes.size(), size_t{1}, size_t{7}, size_t{64}, size_t{150}}) {
        SCOPED_TRACE(testing::Message()
                     << DTypeName(dtype) << " skew " << skew << " piece " << piece);
        RowReader copy(Pieces(bytes, piece), dtype, kD);
        RowReader add(Pieces(bytes, piece), dtype, kD);
        const float w = 0.3f;
        for (int64_t r = 0; r < kRows; ++r) {
          std::vector<float> out(kD);
          CopyRow(copy.Next(), dtype, out.data(), kD);
          std::vector<float> y(kD, 1.5f);
          ASSERT_TRUE(AddScaledRow(add.Next(), dtype, w, y.data(), kD));
          // The same bits as the row's values added from aligned fp32.
          std::vector<float> expected(kD, 1.5f);
          ASSERT_TRUE(AddScaledRow(reinterpret_cast<const std::byte*>(&values[r * kD]),
                                   DType::kFloat32, w, expected.data(), kD));
          for (int64_t m = 0; m < kD; ++m) {
            const float v = values[r * kD + m];
            ASSERT_EQ(out[m], v);
            ASSERT_EQ(y[m], expected[m]) << "row " << r << " column " << m;
            ASSERT_FLOAT_EQ(y[m], 1.5f + w * v);
          }
        }
      }
    }
  }
}

TEST(RowReaderTest, FindsNaNAndInf) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      std::vector<float> row(kD, 1.0f);
      row[kD - 2] = bad;
      std::string bytes;
      for (float v : row) {
        if (dtype == DType::kFloat32) {
          bytes.append(reinterpret_cast<const char*>(&v), sizeof(v));
        } else {
          uint16_t half;
          FloatsToBf16({&v, 1}, {&half, 1});
          bytes.append(reinterpret_cast<const char*>(&half), sizeof(half));
        }
      }
      RowReader reader({bytes}, dtype, kD);
      std::vector<float> y(kD, 0.0f);
      EXPECT_FALSE(AddScaledRow(reader.Next(), dtype, 1.0f, y.data(), kD));
    }
  }
  // The largest finite values are finite.
  std::vector<float> row(kD, std::numeric_limits<float>::max());
  std::vector<float> y(kD, 0.0f);
  EXPECT_TRUE(AddScaledRow(reinterpret_cast<const std::byte*>(row.data()), DType::kFloat32, 0.5f,
                           y.data(), kD));
}

}  // namespace
}  // namespace moe::router
