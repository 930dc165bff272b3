// fp32 <-> bfloat16. bf16 keeps fp32's sign, exponent and the top 7 mantissa
// bits; rounding to it is round-to-nearest-even, NaNs stay (quiet) NaNs.
// Thread-safe (pure functions).
#ifndef MOE_COMMON_BFLOAT16_H_
#define MOE_COMMON_BFLOAT16_H_

#include <cstdint>
#include <cstring>

#include "absl/types/span.h"

namespace moe {

inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry into
  // the exponent is exactly the right rounding (up to Inf at the top).
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  const uint32_t rounded = (bits + rounding_bias) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  // A select, not a branch, so loops over it vectorise.
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float Bf16ToFloat(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// 1 if fp32 bits (bf16 bits shifted up by 16) have an all-ones exponent,
// NaN or Inf, else 0: ORed over a loop without a branch, which vectorises.
inline uint32_t NonFiniteBits(uint32_t fp32_bits) {
  return static_cast<uint32_t>((fp32_bits & 0x7f800000u) == 0x7f800000u);
}

// REQUIRES: out.size() == in.size(). Vectorised (Debian's abseil checks
// every Span index, which keeps indexed loops scalar: these use pointers).
void FloatsToBf16(absl::Span<const float> in, absl::Span<uint16_t> out);
void Bf16ToFloats(absl::Span<const uint16_t> in, absl::Span<float> out);

}  // namespace moe

#endif  // MOE_COMMON_BFLOAT16_H_
