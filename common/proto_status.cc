#include "common/proto_status.h"

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

// Keeps error messages readable and far below gRPC's 8 KiB header limit.
constexpr size_t kMaxMessageBytes = 2048;

}  // namespace

std::string BoundedStatusMessage(absl::string_view message) {
  if (message.size() <= kMaxMessageBytes) return std::string(message);
  return absl::StrCat(message.substr(0, kMaxMessageBytes), "...");
}

absl::StatusCode StatusCodeFromInt(int code) {
  if (code < 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::StatusCode::kUnknown;
  }
  return static_cast<absl::StatusCode>(code);
}

void ToProtoStatus(const absl::Status& status, v1::Status* out) {
  out->set_code(static_cast<int>(status.code()));
  out->set_message(BoundedStatusMessage(status.message()));
}

absl::Status FromProtoStatus(const v1::Status& status) {
  if (status.code() == 0) return absl::OkStatus();
  return absl::Status(StatusCodeFromInt(status.code()), status.message());
}

}  // namespace moe
