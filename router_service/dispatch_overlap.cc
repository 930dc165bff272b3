#include "router_service/dispatch_overlap.h"

#include <algorithm>
#include <map>

namespace moe::router {

DispatchOverlap MeasureOverlap(absl::Span<const CallTiming> calls) {
  struct Server {
    absl::Time first = absl::InfiniteFuture();
    absl::Time last = absl::InfinitePast();
    absl::Duration compute;
    absl::Duration wait;
  };
  std::map<int, Server> servers;
  for (const CallTiming& call : calls) {
    Server& s = servers[call.server];
    s.first = std::min(s.first, call.sent);
    s.last = std::max(s.last, call.answered);
    s.compute += call.compute;
    // A clock step or a server that over-reports its kernel time: no
    // negative waits.
    s.wait += std::max(absl::ZeroDuration(), call.answered - call.sent - call.compute);
  }
  DispatchOverlap total;
  for (const auto& [id, s] : servers) {
    const absl::Duration exposed = std::max(absl::ZeroDuration(), s.last - s.first - s.compute);
    total.wait += s.wait;
    total.hidden += std::clamp(s.wait - exposed, absl::ZeroDuration(), s.wait);
  }
  return total;
}

}  // namespace moe::router
