// manifest_check: reads rendered overlays (JSON arrays of Kubernetes objects,
// as deploy/k8s/tools/validate.js writes them) and checks that what the
// pods run agrees with the serving config they mount. The config is loaded
// from the ConfigMap with the project's own loader (ParseServingConfig,
// which also validates it). Then, for each overlay:
//   - server i of the config is pod i of the expert StatefulSet: name
//     "<statefulset>-<i>", address "<statefulset>-<i>.<headless service>:<port>"
//     (optionally ".<namespace>.svc[.cluster.local]"), one per replica;
//   - the headless Service is headless, publishes not-ready pods, selects
//     the StatefulSet's pods and serves the gRPC port the servers listen on;
//   - both containers read the config from where the ConfigMap is mounted,
//     a --checkpoint from a mounted volume, probe their --health_port (or
//     their gRPC port), readiness as "moe.ready", and are scraped
//     (annotation) on their own --metrics_port;
//   - with TLS, both do, reading certificates from a mounted Secret and
//     the --authz_policy from a mounted ConfigMap;
//   - the expert server's --name is its pod's name;
//   - each container's memory budgets (--training_state_bytes,
//     --max_buffered_bytes, set explicitly) plus its weights fit within its
//     memory limit.
// Prints one line per overlay; exits 1 naming every disagreement.
//
// Runs on renders validate.js accepted, so the fields the schema requires
// (a workload's pod template and containers, names) are there.
//
// Usage: manifest_check RENDER.json...
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "common/model_config.h"
#include "common/placement.h"

namespace moe::k8s {
namespace {

using Json = nlohmann::json;

class Checker {
 public:
  explicit Checker(std::string render) : render_(std::move(render)) {}

  void Fail(const std::string& what) { errors_.push_back(absl::StrCat(render_, ": ", what)); }
  const std::vector<std::string>& errors() const { return errors_; }

  // The one object of `kind` whose name starts with `prefix`.
  const Json* Find(const Json& objects, const std::string& kind, const std::string& prefix) {
    const Json* found = nullptr;
    for (const Json& object : objects) {
      if (object.value("kind", "") != kind) continue;
      if (!absl::StartsWith(object["metadata"].value("name", ""), prefix)) continue;
      if (found != nullptr) Fail(absl::StrCat("more than one ", kind, " ", prefix, "*"));
      found = &object;
    }
    if (found == nullptr) Fail(absl::StrCat("no ", kind, " ", prefix, "*"));
    return found;
  }

 private:
  const std::string render_;
  std::vector<std::string> errors_;
};

// The value of --flag=value in a container's args, if present.
std::optional<std::string> FlagValue(const Json& container, absl::string_view flag) {
  const std::string prefix = absl::StrCat("--", flag, "=");
  for (const Json& arg : container.value("args", Json::array())) {
    const std::string text = arg.get<std::string>();
    if (absl::StartsWith(text, prefix)) return text.substr(prefix.size());
  }
  return std::nullopt;
}

int IntFlag(Checker& check, const Json& container, absl::string_view flag) {
  int value = -1;
  const std::optional<std::string> text = FlagValue(container, flag);
  if (!text.has_value() || !absl::SimpleAtoi(*text, &value)) {
    check.Fail(absl::StrCat(container.value("name", "?"), ": no numeric --", flag));
  }
  return value;
}

// Where in the container the volume named `volume_of(volume)` is mounted.
template <typename Predicate>
std::vector<std::string> MountsOf(const Json& pod_spec, const Json& container,
                                  Predicate volume_matches) {
  std::vector<std::string> paths;
  for (const Json& volume : pod_spec.value("volumes", Json::array())) {
    if (!volume_matches(volume)) continue;
    for (const Json& mount : container.value("volumeMounts", Json::array())) {
      if (mount.value("name", "") == volume.value("name", "")) {
        paths.push_back(mount.value("mountPath", ""));
      }
    }
  }
  return paths;
}

// The checks every moe-serve container shares: config from the ConfigMap,
// checkpoint from a volume, probes and scrape annotation on its own ports.
void CheckContainer(Checker& check, const Json& workload, const std::string& config_map) {
  const Json& pod = workload["spec"]["template"];
  const Json& spec = pod["spec"];
  const Json& container = spec["containers"][0];
  const std::string who = workload["metadata"].value("name", "?");
  const std::vector<std::string> config_mounts = MountsOf(spec, container, [&](const Json& v) {
    return v.contains("configMap") && v["configMap"].value("name", "") == config_map;
  });
  const std::optional<std::string> config = FlagValue(container, "config");
  bool config_mounted = false;
  for (const std::string& mount : config_mounts) {
    config_mounted = config_mounted || config == mount + "/serving_config.pbtxt";
  }
  if (!config_mounted) {
    check.Fail(absl::StrCat(who, ": --config=", config.value_or("(none)"),
                            " is not serving_config.pbtxt of ConfigMap ", config_map,
                            " as mounted"));
  }
  if (const std::optional<std::string> checkpoint = FlagValue(container, "checkpoint")) {
    bool under_volume = false;
    for (const Json& mount : container.value("volumeMounts", Json::array())) {
      under_volume = under_volume ||
                     absl::StartsWith(*checkpoint, mount.value("mountPath", "") + "/");
    }
    if (!under_volume) check.Fail(absl::StrCat(who, ": --checkpoint=", *checkpoint, " is on no volume"));
  }
  // Probes on the plaintext health port when there is one (the gRPC port
  // may require client certificates), readiness as "moe.ready" there.
  const bool health_port = FlagValue(container, "health_port").has_value();
  const int probed = IntFlag(check, container, health_port ? "health_port" : "port");
  for (const char* probe : {"readinessProbe", "livenessProbe", "startupProbe"}) {
    if (!container.contains(probe)) continue;
    if (container[probe].value(Json::json_pointer("/grpc/port"), -1) != probed) {
      check.Fail(absl::StrCat(who, ": ", probe, " does not probe ",
                              health_port ? "--health_port " : "gRPC port ", probed));
    }
  }
  if (!container.contains("readinessProbe") || !container.contains("livenessProbe")) {
    check.Fail(absl::StrCat(who, ": needs readiness and liveness probes"));
  } else if (health_port && container["readinessProbe"].value(Json::json_pointer("/grpc/service"),
                                                              "") != "moe.ready") {
    check.Fail(absl::StrCat(who, ": the readinessProbe must ask service \"moe.ready\""));
  }
  if (FlagValue(container, "transport_security") == "tls") {
    // Certificates from a Secret, the policy from a ConfigMap, as mounted.
    auto mounted_from = [&](const std::string& path, const char* source) {
      for (const std::string& mount :
           MountsOf(spec, container, [&](const Json& v) { return v.contains(source); })) {
        if (absl::StartsWith(path, mount + "/")) return true;
      }
      return false;
    };
    for (const char* flag : {"tls_cert", "tls_key", "tls_ca"}) {
      const std::string path = FlagValue(container, flag).value_or("(none)");
      if (!mounted_from(path, "secret")) {
        check.Fail(absl::StrCat(who, ": --", flag, "=", path, " is on no mounted Secret"));
      }
    }
    if (const std::optional<std::string> policy = FlagValue(container, "authz_policy")) {
      if (!mounted_from(*policy, "configMap")) {
        check.Fail(absl::StrCat(who, ": --authz_policy=", *policy, " is on no mounted ConfigMap"));
      }
    }
  }
  const int metrics_port = IntFlag(check, container, "metrics_port");
  const std::string annotated =
      pod.value(Json::json_pointer("/metadata/annotations/prometheus.io~1port"), "");
  if (annotated != absl::StrCat(metrics_port)) {
    check.Fail(absl::StrCat(who, ": scraped on port \"", annotated, "\", serves /metrics on ",
                            metrics_port));
  }
}

// A Kubernetes memory quantity ("512Mi", "4Gi", "1000000"); -1 if not one.
int64_t MemoryBytes(const std::string& quantity) {
  for (const auto& [suffix, shift] :
       {std::pair<const char*, int>{"Ki", 10}, {"Mi", 20}, {"Gi", 30}}) {
    int64_t value = 0;
    if (absl::EndsWith(quantity, suffix) &&
        absl::SimpleAtoi(absl::string_view(quantity).substr(0, quantity.size() - 2), &value)) {
      return value << shift;
    }
  }
  int64_t value = 0;
  return absl::SimpleAtoi(quantity, &value) ? value : -1;
}

// The memory a container's budgets allow it, within its memory limit: the
// bounded state (--training_state_bytes, --max_buffered_bytes, which the
// manifests must set: the binaries' defaults are sized for a large machine)
// plus `fixed_bytes` (weights) plus 128 MiB for the process itself.
void CheckMemory(Checker& check, const Json& workload, int64_t fixed_bytes) {
  const Json& container = workload["spec"]["template"]["spec"]["containers"][0];
  const std::string who = workload["metadata"].value("name", "?");
  std::map<std::string, std::string> env;
  for (const Json& e : container.value("env", Json::array())) {
    if (e.contains("value")) env[e.value("name", "")] = e.value("value", "");
  }
  int64_t total = fixed_bytes + (int64_t{128} << 20);
  for (const char* flag : {"training_state_bytes", "max_buffered_bytes"}) {
    std::string text = FlagValue(container, flag).value_or("");
    if (absl::StartsWith(text, "$(") && absl::EndsWith(text, ")")) {
      text = env[text.substr(2, text.size() - 3)];
    }
    int64_t value = 0;
    if (!absl::SimpleAtoi(text, &value)) {
      check.Fail(absl::StrCat(who, ": --", flag, " must be set to bytes, got \"", text, "\""));
      return;
    }
    total += value;
  }
  const int64_t limit = MemoryBytes(
      container.value(Json::json_pointer("/resources/limits/memory"), std::string("?")));
  if (limit < 0) {
    check.Fail(absl::StrCat(who, ": no memory limit"));
  } else if (total > limit) {
    check.Fail(absl::StrCat(who, ": budgets and weights need ", total >> 20,
                            " MiB, over the memory limit of ", limit >> 20, " MiB"));
  }
}

void CheckRender(Checker& check, const Json& objects) {
  const Json* config_map = check.Find(objects, "ConfigMap", "moe-serving-config");
  const Json* experts = check.Find(objects, "StatefulSet", "moe-expert");
  const Json* router = check.Find(objects, "Deployment", "moe-router");
  if (config_map == nullptr || experts == nullptr || router == nullptr) return;

  const std::string text = (*config_map)["data"].value("serving_config.pbtxt", "");
  absl::StatusOr<ServingConfig> config = ParseServingConfig(text);
  if (!config.ok()) {
    check.Fail(absl::StrCat("the ConfigMap's serving_config.pbtxt does not load: ",
                            config.status().message()));
    return;
  }
  const std::string config_map_name = (*config_map)["metadata"]["name"];
  CheckContainer(check, *experts, config_map_name);
  CheckContainer(check, *router, config_map_name);
  // Weights: a server's experts twice (fp32 master and the kernel's copy);
  // the router's gate.
  const ModelConfig& model = config->model;
  absl::StatusOr<Placement> placement = ComputePlacement(model, config->cluster);
  if (placement.ok()) {
    size_t most = 0;
    for (int s = 0; s < placement->num_servers(); ++s) {
      most = std::max(most, placement->ExpertsOn(s).size());
    }
    const int64_t expert_bytes = model.expert_parameters() * 4;
    CheckMemory(check, *experts, static_cast<int64_t>(most) * expert_bytes * 2);
  }
  CheckMemory(check, *router, int64_t{model.d_model} * model.num_experts * 4);
  // The router dials the servers with its own credentials.
  const auto security = [](const Json& workload) {
    return FlagValue(workload["spec"]["template"]["spec"]["containers"][0], "transport_security")
        .value_or("plaintext");
  };
  if (security(*experts) != security(*router)) {
    check.Fail(absl::StrCat("the router runs --transport_security=", security(*router),
                            ", the expert servers ", security(*experts)));
  }

  // Server i is pod i, reached through the headless Service.
  const std::string statefulset = (*experts)["metadata"]["name"];
  const std::string namespace_name = (*experts)["metadata"].value("namespace", "");
  const std::string service_name = (*experts)["spec"].value("serviceName", "");
  const Json* service = check.Find(objects, "Service", service_name);
  const Json& container = (*experts)["spec"]["template"]["spec"]["containers"][0];
  const int port = IntFlag(check, container, "port");
  if (service != nullptr) {
    const Json& spec = (*service)["spec"];
    if (spec.value("clusterIP", "") != "None") check.Fail(service_name + " is not headless");
    if (!spec.value("publishNotReadyAddresses", false)) {
      check.Fail(service_name + ": pods must be found by name before they are ready");
    }
    const Json selector = spec.value("selector", Json::object());
    for (const auto& [key, value] : selector.items()) {
      const Json::json_pointer label(
          "/spec/template/metadata/labels/" +
          absl::StrReplaceAll(key, {{"~", "~0"}, {"/", "~1"}}));
      if (experts->value(label, Json()) != value) {
        check.Fail(absl::StrCat(service_name, " selects ", key, "=", value.dump(),
                                ", which the expert pods do not carry"));
      }
    }
    bool serves_port = false;
    for (const Json& p : spec.value("ports", Json::array())) {
      serves_port = serves_port || p.value("port", -1) == port;
    }
    if (!serves_port) check.Fail(absl::StrCat(service_name, " has no port ", port));
  }
  if (FlagValue(container, "name") != "$(POD_NAME)") {
    check.Fail(statefulset + ": --name must be $(POD_NAME)");
  }
  bool pod_name_env = false;
  for (const Json& env : container.value("env", Json::array())) {
    pod_name_env = pod_name_env ||
                   (env.value("name", "") == "POD_NAME" &&
                    env.value(Json::json_pointer("/valueFrom/fieldRef/fieldPath"), "") ==
                        "metadata.name");
  }
  if (!pod_name_env) check.Fail(statefulset + ": POD_NAME must come from metadata.name");

  const int replicas = (*experts)["spec"].value("replicas", 1);
  const std::vector<ServerSpec>& servers = config->cluster.servers;
  // Pods past the config's active servers are spare (they may run or
  // not); the active ones must all run.
  if (replicas < config->cluster.active_servers() || replicas > static_cast<int>(servers.size())) {
    check.Fail(absl::StrCat("the config lists ", servers.size(), " servers (",
                            config->cluster.spare_servers, " spare), the StatefulSet runs ",
                            replicas));
  }
  for (size_t i = 0; i < servers.size(); ++i) {
    const std::string pod = absl::StrCat(statefulset, "-", i);
    const std::string host = absl::StrCat(pod, ".", service_name);
    const std::vector<std::string> addresses = {
        absl::StrCat(host, ":", port), absl::StrCat(host, ".", namespace_name, ".svc:", port),
        absl::StrCat(host, ".", namespace_name, ".svc.cluster.local:", port)};
    if (servers[i].name != pod) {
      check.Fail(absl::StrCat("config server ", i, " is \"", servers[i].name, "\", pod ", i,
                              " is \"", pod, "\""));
    }
    if (std::find(addresses.begin(), addresses.end(), servers[i].address) == addresses.end()) {
      check.Fail(absl::StrCat("config server ", servers[i].name, " is at \"", servers[i].address,
                              "\", its pod at \"", addresses[0], "\""));
    }
  }
  std::printf("%zu expert servers = pods %s-0..%d of headless Service %s, port %d; %s",
              servers.size(), statefulset.c_str(), replicas - 1, service_name.c_str(), port,
              FlagValue(container, "checkpoint").has_value() ? "checkpoint from a volume"
                                                             : "seeded weights");
}

}  // namespace
}  // namespace moe::k8s

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: manifest_check RENDER.json...\n");
    return 2;
  }
  int failures = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i]);
    std::stringstream text;
    text << in.rdbuf();
    const nlohmann::json objects = nlohmann::json::parse(text.str(), nullptr, false);
    const std::string render = std::string(argv[i]).substr(std::string(argv[i]).rfind('/') + 1);
    moe::k8s::Checker check(render);
    std::printf("%s: ", render.c_str());
    if (objects.is_discarded() || !objects.is_array()) {
      check.Fail("not a JSON array of objects");
    } else {
      moe::k8s::CheckRender(check, objects);
    }
    std::printf("\n");
    for (const std::string& error : check.errors()) std::fprintf(stderr, "MISMATCH %s\n", error.c_str());
    failures += static_cast<int>(check.errors().size());
  }
  return failures == 0 ? 0 : 1;
}
