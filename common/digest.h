// FNV-1a 64-bit digests: weight digests (equal digests mean bit-identical
// replicas) and stable ids of replica groups. Not cryptographic.
// Thread-compatible.
#ifndef MOE_COMMON_DIGEST_H_
#define MOE_COMMON_DIGEST_H_

#include <cstdint>
#include <cstring>

#include "absl/types/span.h"

namespace moe {

class Fnv1a64 {
 public:
  void AddBytes(const void* data, size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < size; ++i) {
      value_ = (value_ ^ bytes[i]) * 0x100000001b3ull;
    }
  }
  void AddFloats(absl::Span<const float> values) {
    AddBytes(values.data(), values.size() * sizeof(float));
  }
  void AddInts(absl::Span<const int> values) {
    for (int v : values) {
      const int64_t wide = v;  // fixed width, whatever sizeof(int) is
      AddBytes(&wide, sizeof(wide));
    }
  }
  uint64_t value() const { return value_; }

 private:
  uint64_t value_ = 0xcbf29ce484222325ull;
};

}  // namespace moe

#endif  // MOE_COMMON_DIGEST_H_
