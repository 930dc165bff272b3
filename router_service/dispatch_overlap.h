// How much of a Forward's expert calls' time outside the kernels (the wire,
// codecs, queues) ran while the same server computed another call of the
// same request: what splitting calls (micro-batches, one call per expert)
// hides. Transport-free arithmetic on what the router saw. Thread-safe
// (pure function).
#ifndef MOE_ROUTER_SERVICE_DISPATCH_OVERLAP_H_
#define MOE_ROUTER_SERVICE_DISPATCH_OVERLAP_H_

#include "absl/time/time.h"
#include "absl/types/span.h"

namespace moe::router {

// One answered expert call.
struct CallTiming {
  int server = 0;
  absl::Time sent;
  absl::Time answered;
  // The server's kernel time for it (DispatchResponse.compute_micros).
  absl::Duration compute;
};

struct DispatchOverlap {
  // Sum over calls of (answered - sent - compute).
  absl::Duration wait;
  // The part of `wait` that ran under another call's compute: per server,
  // wait minus what its calls left exposed, (last answer - first send) -
  // sum of compute, clamped to [0, wait].
  absl::Duration hidden;
};

// Calls that did not run one after another on their server hide the
// difference; one call per server hides nothing.
DispatchOverlap MeasureOverlap(absl::Span<const CallTiming> calls);

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_DISPATCH_OVERLAP_H_
