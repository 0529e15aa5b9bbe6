#!/usr/bin/env bash
# Test lanyard-client against the real lanyard binary: make (or reuse) a venv under
# target/, install the pinned requirements, generate the gRPC code from proto/, install
# the package from this directory (as a user would), and run pytest.
#
# Needs python3 >= 3.10 with venv and pip (PyPI), and target/debug/lanyard (built by
# .ci/run; or set LANYARD_BIN). Environment: PYTHON (default python3), VENV (default
# target/sdk-python-venv), extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
venv="${VENV:-$root/target/sdk-python-venv}"
export LANYARD_BIN="${LANYARD_BIN:-$root/target/debug/lanyard}"

if [ ! -x "$LANYARD_BIN" ]; then
    echo "run-tests.sh: $LANYARD_BIN not found; build it with: cargo build -p lanyard-cli" >&2
    exit 1
fi
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "python >= 3.10 needed, found " + sys.version.split()[0])'

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Reinstall only when the lock changed since the venv last installed it.
stamp="$venv/.lanyard-requirements.sha256"
want="$(sha256sum "$here/requirements.lock" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.lock"
    echo "$want" > "$stamp"
fi

"$venv/bin/python" "$here/generate.py"
# Installed from a built wheel (not PYTHONPATH) so the tests also check the packaging:
# the generated code and py.typed must be in it. The build requirements are in the venv.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$here"
rm -rf "$here/build" "$here/src/lanyard_client.egg-info"

cd "$here/tests"
exec "$venv/bin/python" -m pytest -p no:cacheprovider --rootdir "$here" -c "$here/pyproject.toml" "$@"
