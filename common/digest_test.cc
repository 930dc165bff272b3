#include "common/digest.h"

#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace moe {
namespace {

uint64_t DigestOf(const std::vector<float>& values) {
  ArrayDigest64 digest;
  digest.AddFloats(values);
  return digest.value();
}

std::vector<float> RandomFloats(size_t n) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

TEST(ArrayDigest64Test, SameDataSameDigest) {
  EXPECT_EQ(DigestOf(RandomFloats(1000)), DigestOf(RandomFloats(1000)));
}

// Every single-bit flip changes the digest: every bit of a float (sign and
// exponent bits included), in every lane position and in the tail.
TEST(ArrayDigest64Test, EveryBitFlipChangesIt) {
  const std::vector<float> base = RandomFloats(37);  // 4 blocks of 8 floats, a 5-float tail
  const uint64_t reference = DigestOf(base);
  std::set<uint64_t> seen = {reference};
  for (size_t i = 0; i < base.size(); ++i) {
    for (int bit = 0; bit < 32; ++bit) {
      std::vector<float> flipped = base;
      uint32_t word;
      std::memcpy(&word, &flipped[i], sizeof(word));
      word ^= uint32_t{1} << bit;
      std::memcpy(&flipped[i], &word, sizeof(word));
      EXPECT_TRUE(seen.insert(DigestOf(flipped)).second) << "float " << i << " bit " << bit;
    }
  }
}

// Flips that would cancel in a digest whose high bits never reach the low
// ones (the sign bits of two floats, of every pair) do not cancel here.
TEST(ArrayDigest64Test, SignFlipsDoNotCancel) {
  const std::vector<float> base = RandomFloats(24);
  const uint64_t reference = DigestOf(base);
  for (size_t i = 0; i < base.size(); ++i) {
    for (size_t j = i + 1; j < base.size(); ++j) {
      std::vector<float> flipped = base;
      flipped[i] = -flipped[i];
      flipped[j] = -flipped[j];
      EXPECT_NE(DigestOf(flipped), reference) << i << ", " << j;
    }
  }
}

TEST(ArrayDigest64Test, LengthMatters) {
  std::set<uint64_t> seen;
  const std::vector<unsigned char> zeros(100, 0);
  for (size_t n = 0; n <= zeros.size(); ++n) {
    ArrayDigest64 digest;
    digest.AddBytes(zeros.data(), n);
    EXPECT_TRUE(seen.insert(digest.value()).second) << n << " zero bytes";
  }
}

}  // namespace
}  // namespace moe
