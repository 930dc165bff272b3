#include "common/bfloat16.h"

#include "common/log.h"

namespace moe {

void FloatsToBf16(absl::Span<const float> in, absl::Span<uint16_t> out) {
  MOE_CHECK(in.size() == out.size());
  for (size_t i = 0; i < in.size(); ++i) out[i] = FloatToBf16(in[i]);
}

void Bf16ToFloats(absl::Span<const uint16_t> in, absl::Span<float> out) {
  MOE_CHECK(in.size() == out.size());
  for (size_t i = 0; i < in.size(); ++i) out[i] = Bf16ToFloat(in[i]);
}

}  // namespace moe
