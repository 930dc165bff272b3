#include "common/server_flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, metrics_host, "0.0.0.0",
          "Address /metrics and the health port listen on (plaintext both).");
ABSL_FLAG(int, health_port, -1,
          "Plaintext port serving only gRPC health, for probes without a client certificate: "
          "service \"\" is liveness, \"moe.ready\" readiness; 0 picks one, -1: health on the "
          "gRPC port only.");
ABSL_FLAG(int, max_streams, moe::StreamBounds().max_streams,
          "Streams open at once; more are refused (RESOURCE_EXHAUSTED).");
ABSL_FLAG(int64_t, max_stream_bytes, moe::StreamBounds().max_stream_bytes,
          "Request bytes one stream holds (accepted, not yet answered) before it reads no more.");
ABSL_FLAG(int64_t, max_buffered_bytes, moe::StreamBounds().max_buffered_bytes,
          "Request bytes all streams together hold before new requests are refused "
          "(RESOURCE_EXHAUSTED).");

namespace moe {

absl::StatusOr<StreamBounds> StreamBoundsFromFlags() {
  StreamBounds bounds;
  bounds.max_streams = absl::GetFlag(FLAGS_max_streams);
  bounds.max_stream_bytes = absl::GetFlag(FLAGS_max_stream_bytes);
  bounds.max_buffered_bytes = absl::GetFlag(FLAGS_max_buffered_bytes);
  for (const auto& [flag, value] :
       {std::pair<const char*, int64_t>{"max_streams", bounds.max_streams},
        {"max_stream_bytes", bounds.max_stream_bytes},
        {"max_buffered_bytes", bounds.max_buffered_bytes}}) {
    if (value < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be >= 1, got ", value));
    }
  }
  return bounds;
}

}  // namespace moe
