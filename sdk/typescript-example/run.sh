#!/usr/bin/env bash
# Run the TypeScript example's tests against the real lanyard binary, if Node is here.
# `npm ci` installs the locked dependencies (package-lock.json), tsc compiles, and
# node's test runner starts `lanyard serve --dev` on loopback and exchanges a dev token.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "typescript example: node/npm not found; skipped"
    exit 0
fi
export LANYARD_BIN="${LANYARD_BIN:-$root/target/debug/lanyard}"
if [ ! -x "$LANYARD_BIN" ]; then
    echo "typescript example: $LANYARD_BIN not found; build it with: cargo build -p lanyard-cli" >&2
    exit 1
fi
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
rm -rf dist
npx --no-install tsc -p .
node --test dist/test/
