#!/usr/bin/env bash
# The client's wheel installs offline (pip, no index, no downloads) and
# works from where it was installed, against Debian's grpcio and protobuf.
set -euo pipefail
wheel="$1"
site="${TEST_TMPDIR:-$(mktemp -d)}/site"
/usr/bin/python3 -m pip install --quiet --no-index --no-deps --no-cache-dir \
  --disable-pip-version-check --target "$site" "$wheel"
cd "$site"  # not the runfiles: only what was installed is importable
PYTHONPATH="$site" /usr/bin/python3 - <<'PY'
import numpy as np

import moe_serve
from moe_serve import MoeClient, decode, encode
from moe_serve.proto import router_pb2, router_pb2_grpc

assert moe_serve.client.__file__.startswith(__import__("os").getcwd()), moe_serve.client.__file__
x = np.arange(12, dtype=np.float32).reshape(3, 4)
assert np.array_equal(decode(encode(x)), x)
request = router_pb2.ForwardRequest(client_id=7, x=encode(x))
assert router_pb2.ForwardRequest.FromString(request.SerializeToString()).client_id == 7
client = MoeClient("127.0.0.1:1", timeout=1.0)  # channels connect lazily
assert hasattr(client, "forward_stream") and hasattr(client, "cluster_state")
client.close()
print("the wheel installs and imports offline")
PY
