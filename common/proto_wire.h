// Protobuf's wire format by hand, for the messages whose large bytes field
// goes out as a slice of its own (ring segments, Dispatch rows): the key
// and length a serialized message needs in front of such a field.
#ifndef MOE_COMMON_PROTO_WIRE_H_
#define MOE_COMMON_PROTO_WIRE_H_

#include <cstdint>
#include <string>

namespace moe {

inline constexpr int kLengthDelimited = 2;

inline void AppendVarint(uint64_t value, std::string& out) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

// The key of length-delimited field `field`, then `length`: what comes
// before the field's `length` bytes.
inline void AppendLengthDelimited(int field, uint64_t length, std::string& out) {
  AppendVarint((static_cast<uint64_t>(field) << 3) | kLengthDelimited, out);
  AppendVarint(length, out);
}

}  // namespace moe

#endif  // MOE_COMMON_PROTO_WIRE_H_
