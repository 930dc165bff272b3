#include "deploy/local/local_cluster.h"

#include <sys/stat.h>

#include <csignal>
#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace moe::local {
namespace {

constexpr absl::Duration kStartTimeout = absl::Seconds(120);

std::string Ended(const std::string& name, std::optional<int> code) {
  if (!code.has_value()) return absl::StrCat(name, ": did not stop in time (killed)");
  if (*code < 0) return absl::StrCat(name, ": killed by signal ", -*code);
  return absl::StrCat(name, ": exit ", *code);
}

// Where `child` may run, as the kernel has it (not as asked): a line for
// the log.
void LogCpus(const std::string& name, const ChildProcess& child) {
  MOE_LOG(INFO, name, " (pid ", child.pid(), ") pinned to CPUs ",
          CpuList(AffinityCpus(child.pid())));
}

}  // namespace

absl::Status CheckExtraFlags(const std::vector<std::string>& flags) {
  static constexpr const char* kSetHere[] = {"config",         "host",
                                             "port",           "name",
                                             "metrics_port",   "dtype",
                                             "onednn_threads", "checkpoint",
                                             "checkpoint_dir", "transport_security",
                                             "tls_cert",       "tls_key",
                                             "tls_ca",         "require_client_cert"};
  for (const std::string& flag : flags) {
    const bool dashes = flag.rfind("--", 0) == 0;
    const size_t equals = flag.find('=');
    const std::string name =
        dashes ? flag.substr(2, equals == std::string::npos ? equals : equals - 2) : "";
    bool ours = false;
    for (const char* set : kSetHere) ours |= name == set;
    if (name.empty() || ours) {
      return absl::InvalidArgumentError(
          absl::StrCat("extra flag \"", flag,
                       "\": must be --name or --name=value, and not a flag the local "
                       "cluster sets itself (--",
                       name, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(LocalClusterOptions options) {
  MOE_RETURN_IF_ERROR(CheckExtraFlags(options.server_flags));
  MOE_RETURN_IF_ERROR(CheckExtraFlags(options.router_flags));
  auto cluster = std::unique_ptr<LocalCluster>(new LocalCluster());
  cluster->config_ = std::move(options.config);
  const size_t num_servers = cluster->config_.cluster.servers.size();
  if (options.pinning.has_value()) {
    if (options.pinning->servers.size() != num_servers) {
      return absl::InvalidArgumentError(
          absl::StrCat("CPU pinning for ", options.pinning->servers.size(),
                       " expert servers, the config has ", num_servers));
    }
    cluster->server_cpus_ = options.pinning->servers;
  } else {
    cluster->server_cpus_.resize(num_servers);
  }
  for (ServerSpec& server : cluster->config_.cluster.servers) {
    server.address = absl::StrCat("127.0.0.1:", PickFreePort());
  }
  cluster->config_path_ = absl::StrCat(options.work_dir, "/serving.pbtxt");
  std::ofstream(cluster->config_path_) << ServingConfigToText(cluster->config_);
  std::vector<std::string> common = {"--config=" + cluster->config_path_, "--host=127.0.0.1",
                                     "--metrics_port=0"};
  if (!options.checkpoint_path.empty()) common.push_back("--checkpoint=" + options.checkpoint_path);
  if (!options.checkpoint_dir.empty()) {
    common.push_back("--checkpoint_dir=" + options.checkpoint_dir);
  }
  for (std::string& flag : options.credentials.AsFlags()) common.push_back(std::move(flag));

  // Start every server, then wait for each: they load in parallel.
  for (size_t s = 0; s < num_servers; ++s) {
    const ServerSpec& server = cluster->config_.cluster.servers[s];
    std::vector<std::string> args = common;
    args.push_back("--name=" + server.name);
    args.push_back("--port=" + server.address.substr(server.address.rfind(':') + 1));
    args.push_back("--dtype=" + options.dtype);
    args.push_back(absl::StrCat("--onednn_threads=", options.onednn_threads));
    args.insert(args.end(), options.server_flags.begin(), options.server_flags.end());
    cluster->servers_.push_back(std::make_unique<ChildProcess>(
        RunfilePath("expert_service/expert_server"), args, cluster->server_cpus_[s]));
    if (!cluster->server_cpus_[s].empty()) LogCpus(server.name, *cluster->servers_[s]);
    cluster->server_args_.push_back(std::move(args));
  }
  for (size_t s = 0; s < cluster->servers_.size(); ++s) {
    const auto line = cluster->servers_[s]->WaitForLine("serving gRPC on port", kStartTimeout);
    if (!line.has_value()) {
      return absl::UnavailableError(absl::StrCat(
          "expert server ", cluster->config_.cluster.servers[s].name,
          " did not start:\n", cluster->servers_[s]->output()));
    }
    cluster->server_metrics_ports_.push_back(NumberAfter(*line, "/metrics on port "));
  }
  std::vector<std::string> router_args = common;
  router_args.push_back("--port=0");
  router_args.insert(router_args.end(), options.router_flags.begin(), options.router_flags.end());
  cluster->router_ = std::make_unique<ChildProcess>(
      RunfilePath("router_service/router"), router_args,
      options.pinning.has_value() ? options.pinning->router : std::vector<int>{});
  if (options.pinning.has_value()) LogCpus("router", *cluster->router_);
  const auto line = cluster->router_->WaitForLine("router serving gRPC on port", kStartTimeout);
  if (!line.has_value()) {
    return absl::UnavailableError(
        absl::StrCat("the router did not start:\n", cluster->router_->output()));
  }
  cluster->router_port_ = NumberAfter(*line, "on port ");
  cluster->router_metrics_port_ = NumberAfter(*line, "/metrics on port ");
  return cluster;
}

std::string LocalCluster::router_address() const {
  return absl::StrCat("127.0.0.1:", router_port_);
}

absl::StatusOr<std::string> LocalCluster::RestartServer(int s) {
  if (s < 0 || s >= static_cast<int>(servers_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("no server ", s));
  }
  if (servers_[s] != nullptr) (void)servers_[s]->Stop(SIGKILL, absl::Seconds(10));
  servers_[s] = std::make_unique<ChildProcess>(RunfilePath("expert_service/expert_server"),
                                               server_args_[s], server_cpus_[s]);
  if (!server_cpus_[s].empty()) LogCpus(config_.cluster.servers[s].name, *servers_[s]);
  const auto line = servers_[s]->WaitForLine("serving gRPC on port", kStartTimeout);
  if (!line.has_value()) {
    return absl::UnavailableError(absl::StrCat("expert server ", config_.cluster.servers[s].name,
                                               " did not start again:\n", servers_[s]->output()));
  }
  server_metrics_ports_[s] = NumberAfter(*line, "/metrics on port ");
  return servers_[s]->output();
}

std::vector<std::string> LocalCluster::Stop() {
  std::vector<std::string> lines;
  if (router_ != nullptr) {
    lines.push_back(Ended("router", router_->Stop(SIGTERM, absl::Seconds(30))));
    router_.reset();
  }
  for (size_t s = 0; s < servers_.size(); ++s) {
    if (servers_[s] == nullptr) continue;
    lines.push_back(Ended(config_.cluster.servers[s].name,
                          servers_[s]->Stop(SIGTERM, absl::Seconds(30))));
    servers_[s].reset();
  }
  return lines;
}

absl::Status LocalCluster::WritePrometheusTargets(const std::string& path) const {
  std::string json = absl::StrCat(R"([{"targets": ["127.0.0.1:)", router_metrics_port_,
                                  R"("], "labels": {"job": "moe-router"}})");
  for (size_t s = 0; s < server_metrics_ports_.size(); ++s) {
    absl::StrAppend(&json, R"(,
 {"targets": ["127.0.0.1:)", server_metrics_ports_[s],
                    R"("], "labels": {"job": "moe-expert", "server": ")",
                    config_.cluster.servers[s].name, R"("}})");
  }
  json += "]\n";
  if (const size_t slash = path.rfind('/'); slash != std::string::npos && slash > 0) {
    mkdir(path.substr(0, slash).c_str(), 0755);  // Most often there already.
  }
  // Prometheus may read the file at any moment: write aside, then rename.
  const std::string partial = path + ".partial";
  std::ofstream(partial) << json;
  if (std::rename(partial.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

LocalCluster::~LocalCluster() { Stop(); }

}  // namespace moe::local
