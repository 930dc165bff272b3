// 64-bit digests, not cryptographic. Thread-compatible.
//   Fnv1a64: FNV-1a, byte by byte; stable ids (replica groups).
//   ArrayDigest64: for large arrays (weights of replicas, all-reduce
//   results), where equal digests mean bit-identical data; ~8x faster than
//   byte-wise FNV-1a, which took ~40 ms per d_model 1024 expert.
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

// Four independent lanes over 8-byte words (so the multiplies overlap),
// each word multiplied, rotated and multiplied again so that every input bit
// reaches every digest bit; the lanes and the length are mixed at the end
// (splitmix64's finalizer). The value depends on the data and on how it was
// split into Add calls.
class ArrayDigest64 {
 public:
  void AddBytes(const void* data, size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 32 <= size; i += 32) {
      for (int lane = 0; lane < 4; ++lane) Mix(lane_[lane], Load(bytes + i + 8 * lane));
    }
    for (; i + 8 <= size; i += 8) Mix(lane_[0], Load(bytes + i));
    uint64_t tail = 0;
    if (size > i) std::memcpy(&tail, bytes + i, size - i);  // `data` may be null if size is 0
    Mix(lane_[1], tail ^ (static_cast<uint64_t>(size - i) << 56));
    length_ += size;
  }
  void AddFloats(absl::Span<const float> values) {
    AddBytes(values.data(), values.size() * sizeof(float));
  }
  uint64_t value() const {
    uint64_t h = length_;
    for (uint64_t lane : lane_) h = Finalize(h ^ lane) + 0x9e3779b97f4a7c15ull;
    return Finalize(h);
  }

 private:
  static uint64_t Load(const unsigned char* p) {
    uint64_t word;
    std::memcpy(&word, p, sizeof(word));
    return word;
  }
  static void Mix(uint64_t& lane, uint64_t word) {
    lane ^= word * 0x9e3779b97f4a7c15ull;
    lane = ((lane << 29) | (lane >> 35)) * 0xbf58476d1ce4e5b9ull;
  }
  static uint64_t Finalize(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }

  uint64_t lane_[4] = {0x243f6a8885a308d3ull, 0x13198a2e03707344ull, 0xa4093822299f31d0ull,
                       0x082efa98ec4e6c89ull};
  uint64_t length_ = 0;
};

}  // namespace moe

#endif  // MOE_COMMON_DIGEST_H_
