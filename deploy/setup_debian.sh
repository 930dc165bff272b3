#!/usr/bin/env bash
# Installs the Debian 12 packages moe-serve builds, tests and runs with.
# Idempotent: installs only what is missing and runs `apt-get update` at most
# once. Nothing else is ever downloaded (see docs/building.md). The README's
# commands and the Dockerfile both call this script first.
set -euo pipefail

readonly PACKAGES=(
  # Toolchain and build.
  g++ pkg-config bazel-bootstrap
  # Wire API.
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev
  # Libraries.
  libabsl-dev libdnnl-dev prometheus-cpp-dev nlohmann-json3-dev
  # Tests and benchmarks.
  libgtest-dev libgmock-dev libbenchmark-dev
  # The all-reduce benchmark's baseline (Gloo's ring over TCP).
  libgloo-dev
  # The independent numerical oracle (PyTorch autograd) used by tests.
  python3 python3-numpy python3-torch
  # The Python client of the router.
  python3-grpcio python3-protobuf
  # Observability and deployment checks: Prometheus and promtool, yamllint.
  prometheus yamllint
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: installed ${#missing[@]} package(s)"
