// An expert server's answer to one Dispatch as the router reads it: every
// field of the DispatchResponse, and the output's bytes left where the
// transport received them, so Combine reads the rows from there instead of
// from a copy a protobuf parse would make first (as the ring all-reduce does
// with its segments). Movable; thread-compatible.
#ifndef MOE_ROUTER_SERVICE_EXPERT_ANSWER_H_
#define MOE_ROUTER_SERVICE_EXPERT_ANSWER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/expert.pb.h"
#include "router_service/row_reader.h"

namespace moe::router {

class ExpertAnswer {
 public:
  ExpertAnswer() = default;
  // A parsed response (the in-process client, tests): its output is read
  // from the message.
  explicit ExpertAnswer(v1::DispatchResponse response) : response_(std::move(response)) {}

  // An encoded DispatchResponse split into `pieces` that `owner` keeps
  // alive (a transport's receive buffers): every field parsed by protobuf
  // but output.data, which is only located. Any valid encoding is read as
  // protobuf reads it (repeated fields merged, the last `data` counting, an
  // error clearing the output); a malformed one is INVALID_ARGUMENT.
  static absl::StatusOr<ExpertAnswer> FromWire(absl::Span<const absl::string_view> pieces,
                                               std::shared_ptr<const void> owner);

  // The response; without output.data when read FromWire.
  const v1::DispatchResponse& response() const { return response_; }
  v1::DispatchResponse& response() { return response_; }
  uint64_t sequence_id() const { return response_.sequence_id(); }

  // The output's rows, checked to be [rows, d_model] of fp32 or bf16 with
  // the bytes that makes (INVALID_ARGUMENT naming what differs). Values are
  // checked as they are read (AddScaledRow).
  absl::StatusOr<RowReader> OutputRows(int64_t rows, int64_t d_model) const;

  void Clear();

 private:
  v1::DispatchResponse response_;
  // Read FromWire: output.data's bytes, in memory `owner_` keeps.
  bool from_wire_ = false;
  std::vector<absl::string_view> data_;
  std::shared_ptr<const void> owner_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_EXPERT_ANSWER_H_
