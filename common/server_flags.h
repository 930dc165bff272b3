// Flags every moe-serve server binary takes beside its own (the router and
// the expert server): where /metrics and the plaintext health port listen,
// and the bounds of its streams (stream_set.h).
#ifndef MOE_COMMON_SERVER_FLAGS_H_
#define MOE_COMMON_SERVER_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "common/stream_set.h"

ABSL_DECLARE_FLAG(std::string, metrics_host);
ABSL_DECLARE_FLAG(int, health_port);
ABSL_DECLARE_FLAG(int, max_streams);
ABSL_DECLARE_FLAG(int64_t, max_stream_bytes);
ABSL_DECLARE_FLAG(int64_t, max_buffered_bytes);

namespace moe {

// --max_streams, --max_stream_bytes and --max_buffered_bytes;
// INVALID_ARGUMENT naming the flag that is below 1.
absl::StatusOr<StreamBounds> StreamBoundsFromFlags();

}  // namespace moe

#endif  // MOE_COMMON_SERVER_FLAGS_H_
