#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for tests (TOOLCHAIN.md section 7).
#
# Prints three lines on stdout, everything else goes to stderr:
#   PGROOT=<temp dir holding data, socket and logs>
#   PGBIN=<directory of the postgres binaries>
#   LANYARD_TEST_PG_URL=postgres://lanyard@127.0.0.1:<port>/lanyard
#
# Usage:
#   eval "$(.ci/pg-start.sh | sed 's/^/export /')"
#   trap '.ci/pg-stop.sh "$PGROOT" "$PGBIN"' EXIT
#
# Works as root on a fresh Debian machine: installs postgresql with apt if it is
# missing and runs the server as the `postgres` user (postgres refuses to run as root).
# Trust authentication, loopback only, a random free port, fsync off: for tests only.
set -euo pipefail

log() { echo "pg-start: $*" >&2; }

find_pgbin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true
}

PGBIN=$(find_pgbin)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/postgres" ]; then
  log "postgresql not found; installing it with apt"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  PGBIN=$(find_pgbin)
  if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/postgres" ]; then
    log "postgresql installed but no server binary under /usr/lib/postgresql/*/bin"
    exit 1
  fi
fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

PGROOT=$(mktemp -d /tmp/lanyard-pg.XXXXXX)
if [ "$(id -u)" = 0 ]; then chown postgres: "$PGROOT"; fi

# A free port: bind port 0 on loopback and read what the kernel picked.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "initdb in $PGROOT/data"
if ! as_pg "$PGBIN/initdb" -D "$PGROOT/data" -U lanyard --auth=trust -E UTF8 --locale=C \
    --no-sync >"$PGROOT/initdb.log" 2>&1; then
  cat "$PGROOT/initdb.log" >&2
  exit 1
fi

log "starting postgres on 127.0.0.1:$PORT"
if ! as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w -t 30 \
    -o "-h 127.0.0.1 -p $PORT -k $PGROOT -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >&2; then
  cat "$PGROOT/server.log" >&2 || true
  exit 1
fi

as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U lanyard lanyard >&2

echo "PGROOT=$PGROOT"
echo "PGBIN=$PGBIN"
echo "LANYARD_TEST_PG_URL=postgres://lanyard@127.0.0.1:$PORT/lanyard"
