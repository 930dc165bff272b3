#include "common/bfloat16.h"

#include "common/log.h"

namespace moe {

void FloatsToBf16(absl::Span<const float> in, absl::Span<uint16_t> out) {
  MOE_CHECK(in.size() == out.size());
  const float* from = in.data();
  uint16_t* to = out.data();
  for (size_t i = 0; i < in.size(); ++i) to[i] = FloatToBf16(from[i]);
}

void Bf16ToFloats(absl::Span<const uint16_t> in, absl::Span<float> out) {
  MOE_CHECK(in.size() == out.size());
  const uint16_t* from = in.data();
  float* to = out.data();
  for (size_t i = 0; i < in.size(); ++i) to[i] = Bf16ToFloat(from[i]);
}

}  // namespace moe
