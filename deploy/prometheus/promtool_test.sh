#!/usr/bin/env bash
# promtool check config, check rules and test rules on deploy/prometheus.
set -euo pipefail
cd "${TEST_SRCDIR}/${TEST_WORKSPACE}/deploy/prometheus"
if ! command -v promtool >/dev/null; then
  echo "promtool not found: run deploy/setup_debian.sh (Debian package prometheus)" >&2
  exit 1
fi
promtool check config prometheus.yml
promtool check rules rules/moe-serve.rules.yml
(cd rules && promtool test rules moe-serve.rules.test.yml)
