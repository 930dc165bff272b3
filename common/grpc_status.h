// The one mapping between absl::Status (used everywhere inside) and
// grpc::Status (at service boundaries). The canonical codes are the same
// numbers in both; messages are truncated to stay well under gRPC's
// metadata limits.
#ifndef MOE_COMMON_GRPC_STATUS_H_
#define MOE_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "proto/status.pb.h"

namespace moe {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// For statuses carried inside stream messages (v1::Status).
void ToProtoStatus(const absl::Status& status, v1::Status* out);
absl::Status FromProtoStatus(const v1::Status& status);

}  // namespace moe

#endif  // MOE_COMMON_GRPC_STATUS_H_
