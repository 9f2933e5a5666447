#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer, and print the environment that points at them.
#
#   eval "$(scripts/services.sh)"
#
# Uses the servers already running on 127.0.0.1 (5432 / 6379) when they answer; otherwise
# installs Debian's postgresql / redis-server where missing and starts throwaway servers under
# .local/ on ports 55432 / 56379 (trust auth, loopback only, no persistence for Redis). Never
# changes the configuration of a system cluster. Output on stdout is only `export` lines.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/.local"
mkdir -p "$state"
log() { echo "services: $*" >&2; }

pg_url="${INGESTD_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
redis_url="${INGESTD_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"

pg_answers() { PGCONNECT_TIMEOUT=3 psql "$1" -qtAc 'select 1' >/dev/null 2>&1; }
redis_answers() { redis-cli -u "$1" ping 2>/dev/null | grep -q PONG; }

apt_install() {
  if [ ! -f "$state/.apt-updated" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && touch "$state/.apt-updated"
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --- PostgreSQL -------------------------------------------------------------------------------
command -v psql >/dev/null 2>&1 || apt_install postgresql-client
if ! pg_answers "$pg_url"; then
  # A system cluster that exists but is stopped (e.g. after a reboot): start it as it is.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    while read -r ver name port status _; do
      [ "$port" = "5432" ] && [ "$status" != "online" ] && {
        log "starting cluster $ver/$name"
        pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start >&2 || true
      }
    done < <(pg_lsclusters -h 2>/dev/null || true)
  fi
fi
if ! pg_answers "$pg_url"; then
  initdb_bin="$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -z "$initdb_bin" ]; then
    apt_install postgresql
    initdb_bin="$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)"
  fi
  bindir="$(dirname "$initdb_bin")"
  data="$state/pg"
  run_as=()
  [ "$(id -u)" = "0" ] && run_as=(runuser -u postgres --)
  if [ ! -f "$data/PG_VERSION" ]; then
    log "creating a throwaway PostgreSQL cluster in $data"
    mkdir -p "$data" && chmod 700 "$data"
    [ "$(id -u)" = "0" ] && chown postgres:postgres "$data"
    "${run_as[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >&2
  fi
  "${run_as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w \
    -o "-p 55432 -c listen_addresses=127.0.0.1 -k /tmp" start >&2 || true
  pg_url="postgresql://postgres@127.0.0.1:55432/postgres"
  pg_answers "$pg_url" || { log "PostgreSQL did not start (see $data/server.log)"; exit 1; }
fi

# A TimescaleDB cluster that exists on this machine (port 5433) is started for the TimescaleDB
# tests; where there is none they skip, saying why.
if command -v pg_lsclusters >/dev/null 2>&1; then
  while read -r ver name port status _; do
    [ "$port" = "5433" ] && [ "$status" != "online" ] && {
      log "starting cluster $ver/$name (TimescaleDB tests)"
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start >&2 || true
    }
  done < <(pg_lsclusters -h 2>/dev/null || true)
fi

# --- Redis ------------------------------------------------------------------------------------
command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
if ! redis_answers "$redis_url"; then
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  if [ "$redis_url" = "redis://127.0.0.1:6379/15" ]; then
    # The machine's own Redis, stopped: start it the way the machine does.
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile "$state/redis-6379.log" >&2 || true
  fi
fi
if ! redis_answers "$redis_url"; then
  mkdir -p "$state/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 56379 --save "" --appendonly no \
    --dir "$state/redis" --logfile "$state/redis/server.log" >&2
  redis_url="redis://127.0.0.1:56379/15"
  for _ in $(seq 50); do redis_answers "$redis_url" && break; sleep 0.1; done
  redis_answers "$redis_url" || { log "Redis did not start"; exit 1; }
fi

echo "export INGESTD_TEST_DATABASE_URL='$pg_url'"
echo "export INGESTD_TEST_REDIS_URL='$redis_url'"
