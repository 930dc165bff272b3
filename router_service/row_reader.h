// One expert's output rows, read in order from wherever they arrived: the
// pieces of a transport's receive buffers (a row may straddle two, and
// nothing is aligned), or one buffer in memory. Combine reads answers
// through it instead of from a copy made first. Thread-compatible.
#ifndef MOE_ROUTER_SERVICE_ROW_READER_H_
#define MOE_ROUTER_SERVICE_ROW_READER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/tensor.h"

namespace moe::router {

class RowReader {
 public:
  // `pieces` hold whole rows of `d_model` values of `dtype` (fp32 or bf16),
  // in order; the memory must outlive the reader.
  RowReader(std::vector<absl::string_view> pieces, DType dtype, int64_t d_model);

  DType dtype() const { return dtype_; }

  // The next row's bytes: a pointer into the pieces, or into a buffer of
  // the reader's when the row straddles two (valid until the next call).
  // Any alignment: read it with AddScaledRow or CopyRow. REQUIRES: a row
  // is left.
  const std::byte* Next();

 private:
  std::vector<absl::string_view> pieces_;
  DType dtype_;
  size_t row_bytes_;
  size_t piece_ = 0;
  size_t offset_ = 0;
  std::vector<std::byte> straddle_;
};

// y[m] += w * row[m] for m < d, the row being `dtype` values at `row` (any
// alignment), widened exactly as Bf16ToFloat does, with Combine's one
// expression per element (so the sums are the bits of the reference's).
// False if the row holds a NaN or an Inf.
[[nodiscard]] bool AddScaledRow(const std::byte* row, DType dtype, float w, float* y, int64_t d);

// out[m] = row[m] for m < d, widened to fp32.
void CopyRow(const std::byte* row, DType dtype, float* out, int64_t d);

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ROW_READER_H_
