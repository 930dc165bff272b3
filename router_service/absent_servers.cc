#include "router_service/absent_servers.h"

#include <algorithm>

#include "absl/strings/str_join.h"
#include "router_service/on_every_server.h"

namespace moe::router {

bool ServerInfos::any_absent() const {
  return std::find(absent.begin(), absent.end(), true) != absent.end();
}

std::vector<int> ServerInfos::absent_servers() const {
  std::vector<int> servers;
  for (size_t s = 0; s < absent.size(); ++s) {
    if (absent[s]) servers.push_back(static_cast<int>(s));
  }
  return servers;
}

ServerInfos AskEveryServer(ExpertClient& client, int num_servers,
                           const std::function<bool(int server)>& hosts_nothing,
                           absl::Time deadline) {
  std::vector<bool> probed(num_servers);
  for (int s = 0; s < num_servers; ++s) probed[s] = hosts_nothing(s);
  ServerInfos result;
  result.infos = OnEveryServer<v1::InfoResponse>(num_servers, [&](int s, auto done) {
    if (probed[s]) {
      client.Probe(s, deadline, std::move(done));
    } else {
      client.Info(s, deadline, std::move(done));
    }
  });
  result.absent.assign(num_servers, false);
  for (int s = 0; s < num_servers; ++s) result.absent[s] = probed[s] && !result.infos[s].ok();
  return result;
}

ServerInfos AskEveryServer(ExpertClient& client, const Placement& placement, absl::Time deadline,
                           int keep) {
  return AskEveryServer(
      client, placement.num_servers(),
      [&](int s) { return s != keep && placement.ExpertsOn(s).empty(); }, deadline);
}

std::string AbsentNames(const ServerInfos& infos, const std::function<std::string(int)>& name) {
  std::vector<std::string> names;
  for (int s : infos.absent_servers()) names.push_back(name(s));
  return absl::StrJoin(names, ", ");
}

}  // namespace moe::router
