# Sourced by the bench scripts: start_cluster CONFIG DTYPE [moe_local flags]
# starts a local cluster with moe_local --serve, waits until it serves, sets
# `cluster` (moe_local's pid), `address` (the router's host:port) and
# `router_metrics` (its /metrics URL), and stops it when the script exits.
start_cluster() {
  local config="$1" dtype="$2"
  shift 2
  cluster_log="$(mktemp)"
  bazel-bin/deploy/local/moe_local --config="$config" --dtype="$dtype" "$@" \
      --duration=1s --concurrency=1 --batch=64 --serve >"$cluster_log" 2>&1 &
  cluster=$!
  trap 'kill -INT $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -f "$cluster_log"' EXIT
  while ! grep -q "serving at" "$cluster_log"; do
    if ! kill -0 $cluster 2>/dev/null; then cat "$cluster_log"; exit 1; fi
    sleep 0.2  # waiting for the cluster to start; not part of any measurement
  done
  address="$(grep -o 'serving at [0-9.:]*' "$cluster_log" | awk '{print $3}')"
  router_metrics="$(grep '^router ' "$cluster_log" | grep -o 'http://[^ ]*metrics')"
}
