#!/usr/bin/env bash
# The offline checks of deploy/k8s (see BUILD.bazel). Runs on the source
# tree the runfiles point to, where deploy/setup_debian.sh installed the npm
# tools (deploy/k8s/tools/node_modules).
set -euo pipefail
manifest_check="$(pwd)/$1"
runfiles="${TEST_SRCDIR}/${TEST_WORKSPACE}"
k8s="$(dirname "$(readlink -f "${runfiles}/deploy/k8s/tools/validate.js")")/.."
k8s="$(cd "${k8s}" && pwd)"
root="$(cd "${k8s}/../.." && pwd)"
tools="${k8s}/tools"
out="${TEST_TMPDIR}"

if [ ! -d "${tools}/node_modules/kubernetes-models" ]; then
  echo "${tools}/node_modules is missing: run deploy/setup_debian.sh" >&2
  exit 1
fi

echo "== yamllint deploy/"
(cd "${root}" && yamllint --strict -c .yamllint.yaml deploy/)

echo "== kustomize build + schema validation"
node "${tools}/validate.js" "${out}/render" \
  base="${k8s}/base" dev="${k8s}/overlays/dev" production="${k8s}/overlays/production"

# Where kubectl is installed, its own kustomize (whatever version) must
# render the same objects: the manifests do not depend on kustomize 4.5.4.
if command -v kubectl > /dev/null && kubectl kustomize --help > /dev/null 2>&1; then
  echo "== kubectl kustomize renders the same objects ($(kubectl version --client 2>/dev/null | tr '\n' ' '))"
  for overlay in base overlays/dev overlays/production; do
    name="$(basename "${overlay}")"
    kubectl kustomize "${k8s}/${overlay}" > "${out}/kubectl-${name}.yaml"
    NODE_PATH="${tools}/node_modules" node -e '
      const fs = require("fs");
      const YAML = require("yaml");
      const canonical = (value) => Array.isArray(value) ? value.map(canonical)
        : value && typeof value === "object"
          ? Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]))
          : value;
      const theirs = YAML.parseAllDocuments(fs.readFileSync(process.argv[1], "utf8"))
        .map((d) => d.toJS()).filter((o) => o !== null).map((o) => JSON.stringify(canonical(o))).sort();
      const ours = JSON.parse(fs.readFileSync(process.argv[2], "utf8"))
        .map((o) => JSON.stringify(canonical(o))).sort();
      if (JSON.stringify(theirs) !== JSON.stringify(ours)) {
        console.error(`kubectl kustomize and kustomize 4.5.4 differ on ${process.argv[3]}`);
        process.exit(1);
      }
      console.log(`${process.argv[3]}: ${ours.length} objects, identical`);
    ' "${out}/kubectl-${name}.yaml" "${out}/render/${name}.json" "${overlay}"
  done
else
  echo "== kubectl not installed: kustomize 4.5.4 only"
fi

echo "== the validator rejects known-bad objects"
if node "${tools}/validate.js" "${out}/invalid" invalid="${tools}/testdata/invalid" \
     2> "${out}/invalid.err"; then
  echo "validate.js accepted tools/testdata/invalid" >&2
  exit 1
fi
for expected in \
    "Deployment/typo: Object literal may only specify known properties, and '\"readinesProbe\"' does not exist" \
    "StatefulSet/wrong-type: data/spec/replicas must be integer" \
    "Service/no-port: data/spec/ports/0 must have required property port" \
    "StatefulSets/unknown-kind: apps/v1 StatefulSets is not a Kubernetes 1.33"; do
  if ! grep -qF "${expected}" "${out}/invalid.err"; then
    echo "validate.js did not report: ${expected}" >&2
    cat "${out}/invalid.err" >&2
    exit 1
  fi
done
echo "rejected: $(grep -c INVALID "${out}/invalid.err") errors, as expected"

echo "== serving config vs StatefulSet, Services, mounts and flags"
"${manifest_check}" "${out}/render/base.json" "${out}/render/dev.json" \
  "${out}/render/production.json"

echo "== manifest_check finds a replica count that disagrees with the config"
node -e '
  const fs = require("fs");
  const objects = JSON.parse(fs.readFileSync(process.argv[1]));
  objects.find((o) => o.kind === "StatefulSet").spec.replicas = 3;
  fs.writeFileSync(process.argv[2], JSON.stringify(objects));
' "${out}/render/dev.json" "${out}/dev-3-replicas.json"
if "${manifest_check}" "${out}/dev-3-replicas.json" 2> "${out}/mismatch.err"; then
  echo "manifest_check accepted 3 replicas for a 2-server config" >&2
  exit 1
fi
grep -F "the config lists 2 servers (0 spare), the StatefulSet runs 3" "${out}/mismatch.err"

echo "== manifest_check accepts fewer pods than servers when the rest are spare"
node -e '
  const fs = require("fs");
  const objects = JSON.parse(fs.readFileSync(process.argv[1]));
  objects.find((o) => o.kind === "StatefulSet").spec.replicas = 1;
  fs.writeFileSync(process.argv[2], JSON.stringify(objects));
  for (const o of objects) {
    if (o.kind !== "ConfigMap") continue;
    for (const key of Object.keys(o.data || {})) {
      if (key.endsWith(".pbtxt")) o.data[key] = o.data[key].replace("cluster {", "cluster {\n  spare_servers: 1");
    }
  }
  fs.writeFileSync(process.argv[3], JSON.stringify(objects));
' "${out}/render/dev.json" "${out}/dev-1-replica.json" "${out}/dev-1-replica-spare.json"
if "${manifest_check}" "${out}/dev-1-replica.json" 2> "${out}/missing-pod.err"; then
  echo "manifest_check accepted 1 pod for 2 active servers" >&2
  exit 1
fi
grep -F "the config lists 2 servers (0 spare), the StatefulSet runs 1" "${out}/missing-pod.err"
"${manifest_check}" "${out}/dev-1-replica-spare.json"

echo "== manifest_check finds budgets over the memory limit"
node -e '
  const fs = require("fs");
  const objects = JSON.parse(fs.readFileSync(process.argv[1]));
  const router = objects.find((o) => o.kind === "Deployment").spec.template.spec.containers[0];
  router.env.find((e) => e.name === "TRAINING_STATE_BYTES").value = String(1 << 30);
  fs.writeFileSync(process.argv[2], JSON.stringify(objects));
' "${out}/render/dev.json" "${out}/dev-over-budget.json"
if "${manifest_check}" "${out}/dev-over-budget.json" 2> "${out}/budget.err"; then
  echo "manifest_check accepted a 1 GiB training budget in a 512 MiB router" >&2
  exit 1
fi
grep -F "moe-router: budgets and weights need 1280 MiB, over the memory limit of 512 MiB" \
  "${out}/budget.err"
echo "all manifest checks passed"
