#!/usr/bin/env bash
# ingestd on local defaults, fed by the simulator: Ctrl-C (SIGINT) drains and stops both.
#
#   scripts/run-local.sh                   # simulator at 200 events/s
#   SIM_RATE=2000 scripts/run-local.sh     # faster feed
#
# Uses PostgreSQL/Redis on 127.0.0.1 where they answer, else installs and starts throwaway
# servers (scripts/services.sh). Data goes to the database `ingestd`, Redis database 0.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
eval "$(scripts/services.sh)"
if [ ! -x .venv/bin/ingestd ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
export DATABASE_URL="${DATABASE_URL:-${INGESTD_TEST_DATABASE_URL%/*}/ingestd}"
export REDIS_URL="${REDIS_URL:-${INGESTD_TEST_REDIS_URL%/*}/0}"
.venv/bin/ingestd migrate --create-database
.venv/bin/ingestd simulate --rate "${SIM_RATE:-200}" &
simulator=$!
trap 'kill "$simulator" 2>/dev/null || true' EXIT
echo "ingestd: database $DATABASE_URL, redis $REDIS_URL; try: redis-cli -u $REDIS_URL get spreads:BTC:last" >&2
.venv/bin/ingestd run "$@"
