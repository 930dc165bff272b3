// For the fuzzers of parsers that read a message split into pieces (as
// gRPC's slices split it): the input's first two bytes choose where the
// rest is cut into three pieces (any of them may be empty).
#ifndef MOE_TESTS_FUZZ_CUT_INPUT_H_
#define MOE_TESTS_FUZZ_CUT_INPUT_H_

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace moe::fuzz {

// REQUIRES: size >= 2. The message is the concatenation of the pieces.
inline std::vector<absl::string_view> CutInThree(const uint8_t* data, size_t size) {
  const size_t body = size - 2;
  size_t cut1 = body == 0 ? 0 : data[0] % (body + 1);
  size_t cut2 = body == 0 ? 0 : data[1] % (body + 1);
  if (cut1 > cut2) std::swap(cut1, cut2);
  const absl::string_view bytes(reinterpret_cast<const char*>(data + 2), body);
  return {bytes.substr(0, cut1), bytes.substr(cut1, cut2 - cut1), bytes.substr(cut2)};
}

}  // namespace moe::fuzz

#endif  // MOE_TESTS_FUZZ_CUT_INPUT_H_
