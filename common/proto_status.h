// absl::Status carried inside messages (v1::Status: per-request errors in
// stream answers, ring aborts and acks), without gRPC: domain code uses
// this; only the adapters map whole calls to grpc::Status
// (common/grpc_status.h). The canonical codes are the same numbers in
// absl, gRPC and v1::Status; messages are truncated to stay well under
// gRPC's metadata limits.
#ifndef MOE_COMMON_PROTO_STATUS_H_
#define MOE_COMMON_PROTO_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "proto/status.pb.h"

namespace moe {

void ToProtoStatus(const absl::Status& status, v1::Status* out);
absl::Status FromProtoStatus(const v1::Status& status);

// A code received as a number; one outside the canonical range is UNKNOWN.
absl::StatusCode StatusCodeFromInt(int code);
// `message`, cut to at most 2 KiB (plus "...").
std::string BoundedStatusMessage(absl::string_view message);

}  // namespace moe

#endif  // MOE_COMMON_PROTO_STATUS_H_
