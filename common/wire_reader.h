// Protobuf's wire format read by hand from a message split into pieces (the
// slices a transport received it in), for the messages whose large bytes
// field is read where it arrived instead of copied out by a protobuf parse
// (ring segments, Dispatch answers). Every read is bounds-checked: a
// truncated or overlong field is `false`, never a read past the pieces.
#ifndef MOE_COMMON_WIRE_READER_H_
#define MOE_COMMON_WIRE_READER_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/proto_wire.h"

namespace moe {

// Protobuf's field numbers are 1 .. 2^29 - 1; its parser stops at any other
// tag and drops the fields after it (found by fuzzing).
inline constexpr uint64_t kMaxFieldNumber = (uint64_t{1} << 29) - 1;

class WireReader {
 public:
  // The pieces must outlive the reader and whatever Take() returns.
  explicit WireReader(absl::Span<const absl::string_view> pieces) : pieces_(pieces) {}

  bool AtEnd() {
    SkipEmpty();
    return piece_ == pieces_.size();
  }

  // At most `max_bytes` bytes (protobuf: 5 for a tag, 10 otherwise).
  bool ReadVarint(uint64_t& value, int max_bytes = 10) {
    value = 0;
    for (int shift = 0; shift < 7 * max_bytes && shift < 64; shift += 7) {
      uint8_t byte;
      if (!ReadByte(byte)) return false;
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  // A field's tag, split: false on a truncated tag or a field number
  // protobuf does not allow.
  bool ReadTag(uint64_t& field, int& wire_type) {
    uint64_t tag;
    if (!ReadVarint(tag, /*max_bytes=*/5)) return false;
    field = tag >> 3;
    wire_type = static_cast<int>(tag & 7);
    return field != 0 && field <= kMaxFieldNumber;
  }

  // A length-delimited field's length, as protobuf reads one: at most 5
  // bytes and at most 2^31 - 1 (a longer encoding of 0 is refused there
  // too; found by fuzzing).
  bool ReadLength(uint64_t& length) {
    return ReadVarint(length, /*max_bytes=*/5) && length <= 0x7fffffff;
  }

  // The next `n` bytes as views into the pieces (nothing copied).
  bool Take(size_t n, std::vector<absl::string_view>& out) {
    return ForEachRun(n, [&](absl::string_view run) { out.push_back(run); });
  }

  // The next `n` bytes appended to `out`.
  bool Copy(size_t n, std::string& out) {
    return ForEachRun(n, [&](absl::string_view run) { out.append(run.data(), run.size()); });
  }

  // The field whose tag was just read (ReadTag), appended to `out` whole:
  // its tag, then its value as encoded, for a protobuf parse of `out`. False
  // if truncated or of an unknown wire type.
  bool CopyField(uint64_t field, int wire_type, std::string& out) {
    AppendVarint((field << 3) | static_cast<uint64_t>(wire_type), out);
    uint64_t value;
    switch (wire_type) {
      case 0:
        if (!ReadVarint(value)) return false;
        AppendVarint(value, out);
        return true;
      case 1:
        return Copy(8, out);
      case kLengthDelimited:
        if (!ReadLength(value)) return false;
        AppendVarint(value, out);
        return Copy(value, out);
      case 5:
        return Copy(4, out);
      default:
        return false;
    }
  }

 private:
  bool ReadByte(uint8_t& byte) {
    SkipEmpty();
    if (piece_ == pieces_.size()) return false;
    byte = static_cast<uint8_t>(pieces_[piece_][offset_++]);
    return true;
  }

  // Consumes the next `n` bytes, calling visit(run) for each stretch within
  // one piece; false if the message ends first.
  template <typename Visit>
  bool ForEachRun(size_t n, Visit visit) {
    while (n > 0) {
      SkipEmpty();
      if (piece_ == pieces_.size()) return false;
      const size_t run = std::min(n, pieces_[piece_].size() - offset_);
      visit(pieces_[piece_].substr(offset_, run));
      offset_ += run;
      n -= run;
    }
    return true;
  }

  void SkipEmpty() {
    while (piece_ < pieces_.size() && offset_ == pieces_[piece_].size()) {
      ++piece_;
      offset_ = 0;
    }
  }

  absl::Span<const absl::string_view> pieces_;
  size_t piece_ = 0;
  size_t offset_ = 0;
};

}  // namespace moe

#endif  // MOE_COMMON_WIRE_READER_H_
