#include "common/grpc_status.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

// Keeps error messages readable and far below gRPC's 8 KiB header limit.
constexpr size_t kMaxMessageBytes = 2048;

std::string Truncated(absl::string_view message) {
  if (message.size() <= kMaxMessageBytes) return std::string(message);
  return absl::StrCat(message.substr(0, kMaxMessageBytes), "...");
}

absl::StatusCode CodeFromInt(int code) {
  if (code < 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::StatusCode::kUnknown;
  }
  return static_cast<absl::StatusCode>(code);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      Truncated(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(CodeFromInt(status.error_code()), status.error_message());
}

void ToProtoStatus(const absl::Status& status, v1::Status* out) {
  out->set_code(static_cast<int>(status.code()));
  out->set_message(Truncated(status.message()));
}

absl::Status FromProtoStatus(const v1::Status& status) {
  if (status.code() == 0) return absl::OkStatus();
  return absl::Status(CodeFromInt(status.code()), status.message());
}

}  // namespace moe
