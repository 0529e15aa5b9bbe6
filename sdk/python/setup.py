"""Build hook: generate ``lanyard_client._proto`` from the proto files before setuptools
collects the package (see generate.py for why the generated code is not checked in).

Everything else about the package is in pyproject.toml.
"""

import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "src" / "lanyard_client" / "_proto" / "exchange_pb2_grpc.py"
PROTO = "lanyard/v1/exchange.proto"

# In a lanyard checkout the code is generated from proto/. An sdist has no proto/ but
# carries the generated code (MANIFEST.in), and generate.py is imported only when needed.
if any((d / PROTO).is_file() for d in (HERE.parent.parent / "proto", HERE / "proto")):
    sys.path.insert(0, str(HERE))
    import generate

    proto_dir = generate.default_proto_dir()
    assert proto_dir is not None
    generate.generate(proto_dir)
elif not GENERATED.is_file():
    raise SystemExit(
        "lanyard-client: neither the proto files (../../proto) nor generated code "
        "(src/lanyard_client/_proto) are present; build from a lanyard checkout or an sdist"
    )

setup()
