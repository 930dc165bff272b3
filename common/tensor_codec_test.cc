#include "common/tensor_codec.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/bfloat16.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

v1::Tensor Fp32Batch(int64_t rows, int64_t cols, std::vector<float> values) {
  v1::Tensor t;
  EncodeFloats(values, {rows, cols}, DType::kFloat32, &t);
  return t;
}

TEST(Bfloat16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between odd 0x3f81 and even 0x3f82: up.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000)), 0x3f82);
  // Just above halfway rounds up, just below rounds down.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f807fff)), 0x3f80);
  // Sign and overflow: the largest float rounds to infinity.
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
}

TEST(Bfloat16Test, NanStaysNan) {
  // A NaN whose payload is only in the low bits must not round to Inf.
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0x7f800001)))));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(Bfloat16Test, RoundTripIsExactForBf16Values) {
  for (uint32_t hi = 0; hi < 0x10000; hi += 7) {
    const float f = FromBits(hi << 16);
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToBf16(f), hi);
  }
}

TEST(Bfloat16Test, BulkConversionsMatchOneAtATime) {
  // Spread over every sign, exponent and rounding case, NaNs included.
  std::vector<float> floats;
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 65521) floats.push_back(FromBits(b));
  floats.push_back(FromBits(0x3f808000));  // a tie
  floats.push_back(FromBits(0x7f800001));  // NaN with a low payload
  std::vector<uint16_t> rounded(floats.size());
  FloatsToBf16(floats, absl::MakeSpan(rounded));
  for (size_t i = 0; i < floats.size(); ++i) {
    ASSERT_EQ(rounded[i], FloatToBf16(floats[i])) << "bits " << Bits(floats[i]);
  }
  std::vector<uint16_t> every(0x10000);
  for (uint32_t b = 0; b < 0x10000; ++b) every[b] = static_cast<uint16_t>(b);
  std::vector<float> widened(every.size());
  Bf16ToFloats(every, absl::MakeSpan(widened));
  for (uint32_t b = 0; b < 0x10000; ++b) ASSERT_EQ(Bits(widened[b]), b << 16);
}

TEST(TensorCodecTest, Fp32RoundTripIsExactAndZeroCopy) {
  const v1::Tensor wire = Fp32Batch(2, 3, {1, -2, 3.5f, 0, 1e-30f, -7});
  absl::StatusOr<ConstTensorView> view = DecodeTensor(wire, TokenBatchSpec("x", 3, 0));
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->shape, Shape({2, 3}));
  EXPECT_EQ(static_cast<const void*>(view->data),
            static_cast<const void*>(wire.data().data()));
  const FloatTensor decoded = ToFloatTensor(*view);
  EXPECT_EQ(decoded, FloatTensor({2, 3}, {1, -2, 3.5f, 0, 1e-30f, -7}));

  v1::Tensor again;
  EncodeTensor(*view, &again);
  EXPECT_EQ(again.SerializeAsString(), wire.SerializeAsString());
}

TEST(TensorCodecTest, Bf16EncodeRoundsAndDecodeWidens) {
  v1::Tensor wire;
  const std::vector<float> values = {1.0f, FromBits(0x3f818000), -3.0f, 0.5f};
  EncodeFloats(values, {1, 4}, DType::kBFloat16, &wire);
  EXPECT_EQ(wire.dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(wire.data().size(), 8u);
  absl::StatusOr<ConstTensorView> view = DecodeTensor(wire, TokenBatchSpec("x", 4, 0));
  ASSERT_TRUE(view.ok()) << view.status();
  const FloatTensor decoded = ToFloatTensor(*view);
  EXPECT_EQ(decoded.values()[0], 1.0f);
  EXPECT_EQ(Bits(decoded.values()[1]), 0x3f820000u);
  EXPECT_EQ(decoded.values()[2], -3.0f);
  EXPECT_EQ(decoded.values()[3], 0.5f);
}

TEST(TensorCodecTest, EmptyBatchIsValid) {
  const v1::Tensor wire = Fp32Batch(0, 8, {});
  absl::StatusOr<ConstTensorView> view = DecodeTensor(wire, TokenBatchSpec("x", 8, 0));
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->num_elements(), 0);
}

TEST(TensorCodecTest, WrongByteLengthNamesTheSizes) {
  v1::Tensor wire = Fp32Batch(4, 256, std::vector<float>(1024, 1.0f));
  wire.mutable_data()->resize(4092);
  const absl::Status status = DecodeTensor(wire, TokenBatchSpec("x", 256, 0)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "x: expected 4096 bytes (4 tokens x 256 d_model x fp32), got 4092");
}

TEST(TensorCodecTest, RejectsBadShapes) {
  v1::Tensor wire = Fp32Batch(2, 3, std::vector<float>(6, 1.0f));
  EXPECT_THAT(DecodeTensor(wire, TokenBatchSpec("x", 4, 0)).status().message(),
              HasSubstr("expected d_model = 4, got 3"));
  EXPECT_THAT(DecodeTensor(wire, TokenBatchSpec("x", 3, 1)).status().message(),
              HasSubstr("tokens = 2 exceeds the limit of 1"));
  wire.add_shape(1);
  EXPECT_THAT(DecodeTensor(wire, TokenBatchSpec("x", 3, 0)).status().message(),
              HasSubstr("expected rank 2"));
  wire.clear_shape();
  wire.add_shape(-2);
  wire.add_shape(-3);
  EXPECT_THAT(DecodeTensor(wire, TokenBatchSpec("x", -1, 0)).status().message(),
              HasSubstr("negative"));
  wire.clear_shape();
  wire.add_shape(int64_t{1} << 40);
  wire.add_shape(int64_t{1} << 40);
  EXPECT_THAT(DecodeTensor(wire, TokenBatchSpec("x", -1, 0)).status().message(),
              HasSubstr("too large"));
}

TEST(TensorCodecTest, RejectsUnknownDtype) {
  v1::Tensor wire = Fp32Batch(1, 1, {1.0f});
  wire.set_dtype(v1::DTYPE_UNSPECIFIED);
  const absl::Status status = DecodeTensor(wire, TokenBatchSpec("x", 1, 0)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("DTYPE_UNSPECIFIED is not supported"));
}

TEST(TensorCodecTest, RejectsNanAndInfWithTheirPosition) {
  const v1::Tensor nan = Fp32Batch(2, 2, {1, 2, 3, std::nanf("")});
  EXPECT_EQ(DecodeTensor(nan, TokenBatchSpec("x", 2, 0)).status().message(),
            "x: NaN at row 1, column 1");
  const v1::Tensor inf =
      Fp32Batch(2, 2, {1, -std::numeric_limits<float>::infinity(), 3, 4});
  EXPECT_EQ(DecodeTensor(inf, TokenBatchSpec("x", 2, 0)).status().message(),
            "x: Inf at row 0, column 1");
  v1::Tensor bf16;
  EncodeFloats({1.0f, std::numeric_limits<float>::infinity()}, {1, 2},
               DType::kBFloat16, &bf16);
  EXPECT_EQ(DecodeTensor(bf16, TokenBatchSpec("g", 2, 0)).status().message(),
            "g: Inf at row 0, column 1");
  // Past the first block the check scans (4096 values), and the largest
  // finite values are finite.
  std::vector<float> wide(3 * 3000, std::numeric_limits<float>::max());
  wide[1] = -std::numeric_limits<float>::max();
  EXPECT_TRUE(DecodeTensor(Fp32Batch(3, 3000, wide), TokenBatchSpec("x", 3000, 0)).ok());
  wide[2 * 3000 + 2999] = std::nanf("");
  EXPECT_EQ(DecodeTensor(Fp32Batch(3, 3000, wide), TokenBatchSpec("x", 3000, 0)).status().message(),
            "x: NaN at row 2, column 2999");
  std::vector<float> wide_bf16(3 * 3000, 1.0f);
  wide_bf16[1 * 3000 + 1500] = -std::numeric_limits<float>::infinity();
  EncodeFloats(wide_bf16, {3, 3000}, DType::kBFloat16, &bf16);
  EXPECT_EQ(DecodeTensor(bf16, TokenBatchSpec("g", 3000, 0)).status().message(),
            "g: Inf at row 1, column 1500");
  TensorSpec lenient = TokenBatchSpec("x", 2, 0);
  lenient.require_finite = false;
  EXPECT_TRUE(DecodeTensor(nan, lenient).ok());
}

}  // namespace
}  // namespace moe
