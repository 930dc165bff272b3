#!/usr/bin/env bash
# Lays out the runtime image's files under OUT, exactly what the
# Dockerfile's runtime stage copies in (and what //deploy/docker:runtime_test
# starts the binaries from):
#   OUT/opt/moe-serve/bin/router, OUT/opt/moe-serve/bin/expert_server
#   OUT/opt/moe-serve/runtime-packages.txt: the Debian packages owning every
#     shared library the binaries load (from ldd and dpkg -S), which the
#     runtime stage installs; no -dev package, no build tool.
#
# Usage: stage_runtime.sh OUT ROUTER_BINARY EXPERT_SERVER_BINARY
set -euo pipefail
if [ "$#" -ne 3 ]; then
  echo "usage: stage_runtime.sh OUT ROUTER_BINARY EXPERT_SERVER_BINARY" >&2
  exit 2
fi
out="$1"
mkdir -p "$out/opt/moe-serve/bin"
install -m 0755 "$2" "$out/opt/moe-serve/bin/router"
install -m 0755 "$3" "$out/opt/moe-serve/bin/expert_server"

libraries="$(ldd "$out/opt/moe-serve/bin/router" "$out/opt/moe-serve/bin/expert_server" |
  awk '/=> \// { print $3 }' | sort -u)"
if ldd "$out/opt/moe-serve/bin/router" "$out/opt/moe-serve/bin/expert_server" | grep -q "not found"; then
  echo "stage_runtime: a shared library is missing:" >&2
  ldd "$out/opt/moe-serve/bin/"* | grep "not found" >&2
  exit 1
fi
packages=""
for library in $libraries; do
  # dpkg knows /lib/... and /usr/lib/... paths; try the real path too.
  owner="$(dpkg -S "$library" 2>/dev/null || dpkg -S "$(readlink -f "$library")" 2>/dev/null ||
           dpkg -S "/usr$library" 2>/dev/null || true)"
  owner="$(printf "%s" "$owner" | head -n 1)"
  if [ -z "$owner" ]; then
    echo "stage_runtime: no Debian package owns $library" >&2
    exit 1
  fi
  packages+="${owner%%:*}"$'\n'
done
printf '%s' "$packages" | sort -u > "$out/opt/moe-serve/runtime-packages.txt"
echo "staged $(wc -l < "$out/opt/moe-serve/runtime-packages.txt") runtime packages, 2 binaries in $out/opt/moe-serve"
