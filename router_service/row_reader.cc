#include "router_service/row_reader.h"

#include <algorithm>
#include <cstring>

#include "common/bfloat16.h"
#include "common/log.h"

namespace moe::router {
namespace {

// The value at `src` as fp32 bits (loads by memcpy: `src` has any
// alignment, and the compiler turns them into plain vector loads).
template <DType kDType>
inline uint32_t LoadBits(const std::byte* src, int64_t m) {
  if constexpr (kDType == DType::kFloat32) {
    uint32_t bits;
    std::memcpy(&bits, src + m * sizeof(float), sizeof(bits));
    return bits;
  } else {
    uint16_t half;
    std::memcpy(&half, src + m * sizeof(uint16_t), sizeof(half));
    return static_cast<uint32_t>(half) << 16;
  }
}

inline float FromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <DType kDType>
bool AddScaled(const std::byte* src, float w, float* __restrict y, int64_t d) {
  uint32_t bad = 0;
  for (int64_t m = 0; m < d; ++m) {
    const uint32_t bits = LoadBits<kDType>(src, m);
    bad |= NonFiniteBits(bits);
    y[m] += w * FromBits(bits);
  }
  return bad == 0;
}

template <DType kDType>
void Copy(const std::byte* src, float* __restrict out, int64_t d) {
  for (int64_t m = 0; m < d; ++m) out[m] = FromBits(LoadBits<kDType>(src, m));
}

}  // namespace

RowReader::RowReader(std::vector<absl::string_view> pieces, DType dtype, int64_t d_model)
    : pieces_(std::move(pieces)),
      dtype_(dtype),
      row_bytes_(static_cast<size_t>(d_model) * DTypeSize(dtype)) {}

const std::byte* RowReader::Next() {
  while (piece_ < pieces_.size() && offset_ == pieces_[piece_].size()) {
    ++piece_;
    offset_ = 0;
  }
  if (row_bytes_ == 0) return straddle_.data();
  MOE_CHECK(piece_ < pieces_.size(), "RowReader: no row left");
  const absl::string_view piece = pieces_[piece_];
  if (piece.size() - offset_ >= row_bytes_) {
    // The common case: the row lies within one piece.
    const auto* row = reinterpret_cast<const std::byte*>(piece.data() + offset_);
    offset_ += row_bytes_;
    return row;
  }
  // Only then a buffer: most readers never need one.
  straddle_.resize(row_bytes_);
  size_t filled = 0;
  while (filled < row_bytes_) {
    MOE_CHECK(piece_ < pieces_.size(), "RowReader: the last row is cut short");
    const absl::string_view p = pieces_[piece_];
    const size_t take = std::min(row_bytes_ - filled, p.size() - offset_);
    std::memcpy(straddle_.data() + filled, p.data() + offset_, take);
    filled += take;
    offset_ += take;
    if (offset_ == p.size()) {
      ++piece_;
      offset_ = 0;
    }
  }
  return straddle_.data();
}

bool AddScaledRow(const std::byte* row, DType dtype, float w, float* y, int64_t d) {
  return dtype == DType::kFloat32 ? AddScaled<DType::kFloat32>(row, w, y, d)
                                  : AddScaled<DType::kBFloat16>(row, w, y, d);
}

void CopyRow(const std::byte* row, DType dtype, float* out, int64_t d) {
  if (dtype == DType::kFloat32) {
    Copy<DType::kFloat32>(row, out, d);
  } else {
    Copy<DType::kBFloat16>(row, out, d);
  }
}

}  // namespace moe::router
