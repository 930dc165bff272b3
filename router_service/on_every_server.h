// Fans one call out to every expert server at once and waits for every
// answer: the shape of the router's two-phase state changes (steps,
// checkpoints, placement changes).
#ifndef MOE_ROUTER_SERVICE_ON_EVERY_SERVER_H_
#define MOE_ROUTER_SERVICE_ON_EVERY_SERVER_H_

#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/blocking_counter.h"

namespace moe::router {

// Calls `call(server, done)` for every server at once and waits for all;
// `done` takes an absl::StatusOr<Response>.
template <typename Response, typename Call>
std::vector<absl::StatusOr<Response>> OnEveryServer(int num_servers, Call call) {
  std::vector<absl::StatusOr<Response>> results(num_servers, absl::UnknownError("no answer"));
  absl::BlockingCounter pending(num_servers);
  for (int s = 0; s < num_servers; ++s) {
    call(s, [&results, &pending, s](absl::StatusOr<Response> r) {
      results[s] = std::move(r);
      pending.DecrementCount();
    });
  }
  pending.Wait();
  return results;
}

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ON_EVERY_SERVER_H_
