// Servers the cluster config lists that are not running and host nothing:
// a StatefulSet scaled below the config's list, or a drained server that
// stopped. The protocols that need every server (placement changes, steps,
// the automatic Rebalance's counters) go on without them, and plans give
// them no experts; one that starts later adopts the cluster's placement and
// step from its peers and joins through a Rebalance. A server that hosts
// something is never absent: its trouble stops those protocols as before.
#ifndef MOE_ROUTER_SERVICE_ABSENT_SERVERS_H_
#define MOE_ROUTER_SERVICE_ABSENT_SERVERS_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/placement.h"
#include "proto/expert.pb.h"
#include "router_service/expert_client.h"

namespace moe::router {

struct ServerInfos {
  // Per server: its Info, or why there is none.
  std::vector<absl::StatusOr<v1::InfoResponse>> infos;
  // Per server: hosts nothing and did not answer its probe.
  std::vector<bool> absent;

  bool any_absent() const;
  // Indexes of the absent servers.
  std::vector<int> absent_servers() const;
};

// Every server's Info at once. A server for which `hosts_nothing(s)` is
// only probed (ExpertClient::Probe: no waiting for a connection), and is
// absent when the probe fails; the others are asked with Info, which waits
// up to `deadline` for them to be reachable.
ServerInfos AskEveryServer(ExpertClient& client, int num_servers,
                           const std::function<bool(int server)>& hosts_nothing,
                           absl::Time deadline);
// The same for the servers of `placement`, probing those that host nothing
// in it (but `keep`, always asked with Info).
ServerInfos AskEveryServer(ExpertClient& client, const Placement& placement, absl::Time deadline,
                           int keep = -1);

// "e2, e3" from the absent servers' names in `names` (indexed by server).
std::string AbsentNames(const ServerInfos& infos, const std::function<std::string(int)>& name);

}  // namespace moe::router

#endif  // MOE_ROUTER_SERVICE_ABSENT_SERVERS_H_
