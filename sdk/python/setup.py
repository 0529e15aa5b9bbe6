"""Build hook: generate ``lanyard_client._proto`` from the proto files before setuptools
collects the package (see generate.py for why the generated code is not checked in).

Everything else about the package is in pyproject.toml.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate

proto_dir = generate.default_proto_dir()
if proto_dir is not None:
    generate.generate(proto_dir)
elif not (generate.OUT / "exchange_pb2_grpc.py").is_file():
    raise SystemExit(
        "lanyard-client: neither the proto files (../../proto) nor generated code "
        "(src/lanyard_client/_proto) are present; build from a lanyard checkout"
    )

setup()
