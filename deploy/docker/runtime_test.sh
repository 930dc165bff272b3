#!/usr/bin/env bash
# What the runtime image would run, without a container engine:
#   1. stage_runtime.sh lays out the image's file set in a temporary root;
#      it holds the two binaries and their runtime package list, nothing
#      else, and that list names installed runtime packages only;
#   2. the Dockerfile builds with the setup script and copies that file set,
#      and runs as the user the manifests run as;
#   3. the dev overlay is rendered, and its expert servers and router are
#      started from the staged root with the command and flags the manifests
#      give them (only the ports, which must be free here, and the config's
#      addresses, which are cluster DNS names there, point at this machine);
#   4. a client's Forward is answered through them;
#   5. SIGTERM ends each within the pods' terminationGracePeriodSeconds.
#
# Usage: runtime_test.sh ROUTER EXPERT_SERVER MOE_CLIENT
set -euo pipefail
router_binary="$(pwd)/$1"
expert_binary="$(pwd)/$2"
client_binary="$(pwd)/$3"
here="${TEST_SRCDIR}/${TEST_WORKSPACE}/deploy/docker"
validate="$(readlink -f "${TEST_SRCDIR}/${TEST_WORKSPACE}/deploy/k8s/tools/validate.js")"
k8s="$(cd "$(dirname "${validate}")/.." && pwd)"
work="${TEST_TMPDIR}"
root="${work}/root"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "${pid}" 2>/dev/null || true; done; }
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== 1. the runtime file set"
"${here}/stage_runtime.sh" "${root}" "${router_binary}" "${expert_binary}"
files="$(cd "${root}" && find . -type f | sort | tr '\n' ' ')"
expected="./opt/moe-serve/bin/expert_server ./opt/moe-serve/bin/router ./opt/moe-serve/runtime-packages.txt "
[ "${files}" = "${expected}" ] || fail "staged files are '${files}', expected '${expected}'"
while read -r package; do
  dpkg-query -W -f='${Status}' "${package}" | grep -q "install ok installed" ||
    fail "runtime package ${package} is not an installed Debian package"
  case "${package}" in
    *-dev|gcc*|g++*|cpp*|binutils*|bazel*|make|pkg-config|protobuf-compiler*)
      fail "build tool ${package} in the runtime packages" ;;
  esac
done < "${root}/opt/moe-serve/runtime-packages.txt"
echo "runtime packages: $(tr '\n' ' ' < "${root}/opt/moe-serve/runtime-packages.txt")"

echo "== 2. the Dockerfile"
dockerfile="${here}/Dockerfile"
grep -q '^RUN /src/deploy/setup_debian.sh --build-only$' "${dockerfile}" || fail "the build stage does not run setup_debian.sh"
grep -q 'deploy/docker/stage_runtime.sh /runtime' "${dockerfile}" || fail "the build stage does not stage /runtime"
grep -q '^COPY --from=build /runtime/ /$' "${dockerfile}" || fail "the runtime stage does not copy /runtime"
grep -q 'runtime-packages.txt' "${dockerfile}" || fail "the runtime stage does not install runtime-packages.txt"
[ "$(grep -c '^FROM ' "${dockerfile}")" = 2 ] || fail "expected two stages"
grep -q '^USER 10001:10001$' "${dockerfile}" || fail "the image does not run as 10001"

echo "== 3. the dev overlay's pods, from the staged root"
node "${validate}" "${work}/render" dev="${k8s}/overlays/dev" > /dev/null
# One line per fact the test needs from the rendered objects.
node -e '
  const objects = JSON.parse(require("fs").readFileSync(process.argv[1]));
  const find = (kind) => objects.find((o) => o.kind === kind);
  const config = find("ConfigMap");
  require("fs").writeFileSync(process.argv[2], config.data["serving_config.pbtxt"]);
  for (const [kind, name] of [["Deployment", "router"], ["StatefulSet", "expert"]]) {
    const pod = find(kind).spec.template.spec;
    const container = pod.containers[0];
    if (pod.securityContext.runAsUser !== 10001) throw new Error(`${kind} does not run as 10001`);
    const env = {};
    for (const e of container.env || []) if (e.value !== undefined) env[e.name] = e.value;
    const args = container.args.map((a) => a.replace(/\$\((\w+)\)/g, (m, v) => env[v] ?? m));
    require("fs").writeFileSync(`${process.argv[3]}/${name}.command`, container.command.join("\n") + "\n");
    require("fs").writeFileSync(`${process.argv[3]}/${name}.args`, args.join("\n") + "\n");
    require("fs").writeFileSync(`${process.argv[3]}/${name}.grace`, String(pod.terminationGracePeriodSeconds));
  }
  console.log(`experts: ${find("StatefulSet").spec.replicas}`);
' "${work}/render/dev.json" "${work}/serving_config.pbtxt" "${work}" > "${work}/facts"
replicas="$(sed -n 's/^experts: //p' "${work}/facts")"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The config's cluster DNS names become loopback ports.
mkdir -p "${work}/etc"
cp "${work}/serving_config.pbtxt" "${work}/etc/serving_config.pbtxt"
ports=()
for ((i = 0; i < replicas; ++i)); do
  ports+=("$(free_port)")
  sed -i "s/moe-expert-${i}\.moe-expert:50061/127.0.0.1:${ports[i]}/" "${work}/etc/serving_config.pbtxt"
done
grep -q "moe-expert:" "${work}/etc/serving_config.pbtxt" && fail "an address was not rewritten"

# The manifest's flags, with ports and the config path moved to this machine.
local_args() {  # NAME GRPC_PORT [POD_NAME]
  sed -e "s|^--config=.*|--config=${work}/etc/serving_config.pbtxt|" \
      -e "s|^--port=.*|--port=$2|" \
      -e "s|^--metrics_port=.*|--metrics_port=0|" \
      -e "s|^--health_port=.*|--health_port=0|" \
      -e "s|\$(POD_NAME)|${3:-}|" "${work}/$1.args"
}
start() {  # NAME LOG GRPC_PORT [POD_NAME]
  local command
  command="${root}$(head -n 1 "${work}/$1.command")"
  [ -x "${command}" ] || fail "the manifest's command ${command#"${root}"} is not in the image"
  mapfile -t args < <(local_args "$1" "$3" "${4:-}")
  echo "$ ${command#"${root}"} ${args[*]}"
  # A bare environment and an empty working directory, as in the pod.
  mkdir -p "${work}/cwd"
  (cd "${work}/cwd" && exec env -i HOME=/nonexistent "${command}" "${args[@]}") > "$2" 2>&1 &
  pids+=("$!")
}
wait_for() {  # LOG TEXT
  for _ in $(seq 600); do
    grep -q "$2" "$1" && return 0
    sleep 0.1  # Polling a log file for a readiness line.
  done
  cat "$1" >&2
  fail "no '$2' in $1"
}
for ((i = 0; i < replicas; ++i)); do
  start expert "${work}/expert-${i}.log" "${ports[i]}" "moe-expert-${i}"
done
for ((i = 0; i < replicas; ++i)); do wait_for "${work}/expert-${i}.log" "serving gRPC on port"; done
router_port="$(free_port)"
start router "${work}/router.log" "${router_port}"
wait_for "${work}/router.log" "router serving gRPC on port"

echo "== 4. a request through the router"
"${client_binary}" --router="127.0.0.1:${router_port}" --tokens=4 --d_model=256 > "${work}/client.out" 2>&1 ||
  { cat "${work}/client.out" >&2; fail "the client's Forward failed"; }
cat "${work}/client.out"

echo "== 5. SIGTERM drains within terminationGracePeriodSeconds"
names=()
for ((i = 0; i < replicas; ++i)); do names+=("expert-${i}"); done
names+=("router")
grace_router="$(cat "${work}/router.grace")"
grace_expert="$(cat "${work}/expert.grace")"
# Router first, as a rollout would drain it before the servers.
for index in $(seq $(( ${#pids[@]} - 1 )) -1 0); do
  pid="${pids[index]}"
  name="${names[index]}"
  grace="${grace_expert}"
  [ "${name}" = "router" ] && grace="${grace_router}"
  start_ns="$(date +%s%N)"
  kill -TERM "${pid}"
  code=0
  timeout "${grace}" tail --pid="${pid}" --sleep-interval=0.05 -f /dev/null || fail "${name} still runs ${grace} s after SIGTERM"
  wait "${pid}" || code=$?
  [ "${code}" = 0 ] || fail "${name} exited ${code} after SIGTERM"
  elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
  printf '%s: exit 0, %d.%03d s after SIGTERM (grace %s s)\n' "${name}" \
    $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "${grace}"
done
pids=()
echo "the runtime file set serves as the manifests run it"
