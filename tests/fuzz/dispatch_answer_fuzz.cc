// Dispatch answers from the wire: ExpertAnswer's own parser (it locates the
// output's data in the slices instead of copying it) against protobuf's.
// Whatever it accepts, protobuf accepts too, with the same fields, and the
// output reads as the same rows (or fails the same check); a split into up
// to three slices changes nothing.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "proto/expert.pb.h"
#include "router_service/expert_answer.h"
#include "tests/fuzz/cut_input.h"

namespace {

// Every row of `answer`'s [rows, d] output as fp32, or the check's status.
absl::StatusOr<std::vector<float>> Rows(const moe::router::ExpertAnswer& answer, int64_t rows,
                                        int64_t d) {
  absl::StatusOr<moe::router::RowReader> reader = answer.OutputRows(rows, d);
  if (!reader.ok()) return reader.status();
  std::vector<float> out(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    moe::router::CopyRow(reader->Next(), reader->dtype(), out.data() + r * d, d);
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const std::vector<absl::string_view> pieces = moe::fuzz::CutInThree(data, size);
  const absl::string_view bytes(pieces[0].data(), size - 2);
  absl::StatusOr<moe::router::ExpertAnswer> answer =
      moe::router::ExpertAnswer::FromWire(pieces, nullptr);
  if (!answer.ok()) {
    if (answer.status().code() != absl::StatusCode::kInvalidArgument) __builtin_trap();
    return 0;
  }
  moe::v1::DispatchResponse parsed;
  if (!parsed.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) __builtin_trap();
  moe::v1::DispatchResponse header = parsed;
  if (header.has_output()) header.mutable_output()->clear_data();
  if (header.SerializeAsString() != answer->response().SerializeAsString()) __builtin_trap();
  // The output as the shape it claims (bounded: it must match the bytes).
  const moe::v1::Tensor& out = parsed.output();
  const int64_t rows = out.shape_size() == 2 ? out.shape(0) : 1;
  const int64_t d = out.shape_size() == 2 ? out.shape(1) : 1;
  if (rows < 0 || d <= 0 || rows > (1 << 20) || d > (1 << 20)) return 0;
  const moe::router::ExpertAnswer whole(parsed);
  absl::StatusOr<std::vector<float>> read = Rows(*answer, rows, d);
  absl::StatusOr<std::vector<float>> expected = Rows(whole, rows, d);
  if (read.status() != expected.status()) __builtin_trap();
  if (read.ok() && std::memcmp(read->data(), expected->data(), read->size() * sizeof(float)) != 0) {
    __builtin_trap();
  }
  return 0;
}
