#!/usr/bin/env bash
# ingestd on local defaults, fed by the simulator: Ctrl-C, or SIGTERM to this script, drains and
# stops both.
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
# Both run in the background so that this shell handles its signals at once (a shell waiting for
# a foreground command runs no trap until the command ends): Ctrl-C, `kill` of this script
# (SIGTERM) or a closed terminal (SIGHUP) pass one SIGTERM to both, and the script waits for the
# daemon's drain; nothing is left behind holding the metrics port. Each runs in a session of its
# own (setsid) so that a Ctrl-C reaches it only through this script: a second signal straight
# from the terminal would make the daemon skip its drain.
detached=()
command -v setsid >/dev/null 2>&1 && detached=(setsid)
"${detached[@]}" .venv/bin/ingestd simulate --rate "${SIM_RATE:-200}" &
simulator=$!
"${detached[@]}" .venv/bin/ingestd run "$@" &
daemon=$!
stop() { kill -TERM "$daemon" "$simulator" 2>/dev/null || true; }
trap stop INT TERM HUP
trap 'stop; wait' EXIT
echo "ingestd: database $DATABASE_URL, redis $REDIS_URL; try: redis-cli -u $REDIS_URL get spreads:BTC:last" >&2
status=0
wait "$daemon" || status=$?
# A trapped signal ends `wait` early, while the daemon is still draining: wait for it to exit.
while kill -0 "$daemon" 2>/dev/null; do
  status=0
  wait "$daemon" || status=$?
done
exit "$status"
