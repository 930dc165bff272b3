#include "router_service/expert_answer.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/proto_wire.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "common/wire_reader.h"

namespace moe::router {
namespace {

absl::Status Malformed(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed Dispatch answer: ", what));
}

// The fields of one occurrence of `output` (a v1::Tensor), re-encoded into
// `header` but for `data`, whose bytes become `data` (the last occurrence
// counts, as protobuf's parse keeps the last).
absl::Status ReadTensor(WireReader& reader, std::string& header,
                        std::vector<absl::string_view>& data) {
  while (!reader.AtEnd()) {
    uint64_t field;
    int wire_type;
    if (!reader.ReadTag(field, wire_type)) return Malformed("output: bad tag");
    if (field == v1::Tensor::kDataFieldNumber && wire_type == kLengthDelimited) {
      uint64_t length;
      if (!reader.ReadLength(length)) return Malformed("output: bad data length");
      data.clear();
      if (!reader.Take(length, data)) return Malformed("output: truncated data");
      continue;
    }
    if (!reader.CopyField(field, wire_type, header)) return Malformed("output: truncated field");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExpertAnswer> ExpertAnswer::FromWire(absl::Span<const absl::string_view> pieces,
                                                    std::shared_ptr<const void> owner) {
  ExpertAnswer answer;
  answer.from_wire_ = true;
  answer.owner_ = std::move(owner);
  std::string header;
  WireReader reader(pieces);
  while (!reader.AtEnd()) {
    uint64_t field;
    int wire_type;
    if (!reader.ReadTag(field, wire_type)) return Malformed("bad tag");
    if (wire_type == kLengthDelimited && field == v1::DispatchResponse::kOutputFieldNumber) {
      uint64_t length;
      if (!reader.ReadLength(length)) return Malformed("bad output length");
      std::vector<absl::string_view> tensor;
      if (!reader.Take(length, tensor)) return Malformed("truncated output");
      WireReader inner(tensor);
      std::string tensor_header;
      MOE_RETURN_IF_ERROR(ReadTensor(inner, tensor_header, answer.data_));
      AppendLengthDelimited(v1::DispatchResponse::kOutputFieldNumber, tensor_header.size(), header);
      header += tensor_header;
      continue;
    }
    // The oneof's other member: the output read so far is gone.
    if (wire_type == kLengthDelimited && field == v1::DispatchResponse::kErrorFieldNumber) {
      answer.data_.clear();
    }
    if (!reader.CopyField(field, wire_type, header)) return Malformed("truncated field");
  }
  if (!answer.response_.ParseFromString(header)) return Malformed("bad fields");
  return answer;
}

absl::StatusOr<RowReader> ExpertAnswer::OutputRows(int64_t rows, int64_t d_model) const {
  TensorSpec spec = TokenBatchSpec("expert output", d_model, 0);
  spec.dims[0] = rows;
  std::vector<absl::string_view> pieces =
      from_wire_ ? data_ : std::vector<absl::string_view>{response_.output().data()};
  size_t bytes = 0;
  for (absl::string_view piece : pieces) bytes += piece.size();
  MOE_ASSIGN_OR_RETURN(const DType dtype, CheckTensorHeader(response_.output(), spec, bytes));
  return RowReader(std::move(pieces), dtype, d_model);
}

void ExpertAnswer::Clear() {
  response_.Clear();
  from_wire_ = false;
  data_.clear();
  owner_.reset();
}

}  // namespace moe::router
