#!/usr/bin/env bash
# Stop a PostgreSQL started by .ci/pg-start.sh and delete its directory.
# Usage: .ci/pg-stop.sh PGROOT PGBIN
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 PGROOT PGBIN" >&2
  exit 2
fi
PGROOT=$1
PGBIN=$2

# Refuse anything that does not look like a directory pg-start.sh made.
case "$PGROOT" in
  /tmp/lanyard-pg.*) ;;
  *) echo "pg-stop: $PGROOT was not made by pg-start.sh" >&2; exit 2 ;;
esac

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ -f "$PGROOT/data/postmaster.pid" ]; then
  as_pg "$PGBIN/pg_ctl" -D "$PGROOT/data" -m immediate -w -t 30 stop >&2
fi
rm -rf -- "$PGROOT"
