"""Builds the Python client as a wheel, offline, from the repository.

The wheel holds the package `moe_serve`: `moe_serve.client` (moe_client.py;
`from moe_serve import MoeClient`) and `moe_serve.proto` (the generated
protobuf and gRPC modules, their `from proto import` rewritten to
`moe_serve.proto`). It depends on grpcio, protobuf and numpy, which Debian
provides (python3-grpcio, python3-protobuf, python3-numpy); install it with
    python3 -m pip install --no-index moe_serve_client-<version>-py3-none-any.whl
(--no-deps, or --user/--target, as your setup needs). Nothing is
downloaded.

Usage: build_wheel.py OUT.whl VERSION moe_client.py PROTO_MODULE...
"""

import base64
import hashlib
import os
import re
import sys
import zipfile

NAME = "moe_serve_client"


def rewrite_imports(text):
    return re.sub(r"^from proto import", "from moe_serve.proto import", text, flags=re.MULTILINE)


def main():
    out, version, client, protos = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    files = {
        "moe_serve/__init__.py": ('"""The moe-serve router client (docs in moe_serve.client)."""\n'
                                  "from moe_serve.client import (ForwardResult, MoeClient, decode,\n"
                                  "                              encode, tls_credentials)\n"),
        "moe_serve/proto/__init__.py": "",
    }
    with open(client) as f:
        files["moe_serve/client.py"] = rewrite_imports(f.read())
    for path in protos:
        with open(path) as f:
            files[f"moe_serve/proto/{os.path.basename(path)}"] = rewrite_imports(f.read())
    dist_info = f"{NAME}-{version}.dist-info"
    files[f"{dist_info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME}\n"
        f"Version: {version}\n"
        "Summary: Python client of the moe-serve router\n"
        "Requires-Python: >=3.9\n"
        "Requires-Dist: grpcio\n"
        "Requires-Dist: protobuf\n"
        "Requires-Dist: numpy\n")
    files[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\n"
        "Generator: moe-serve build_wheel.py\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n")
    record = []
    # Fixed timestamps: the same sources give the same wheel.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name in sorted(files):
            data = files[name].encode()
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data, zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        wheel.writestr(info, "\n".join(record) + "\n", zipfile.ZIP_DEFLATED)


if __name__ == "__main__":
    main()
