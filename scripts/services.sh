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

# --- TimescaleDB -------------------------------------------------------------------------------
# The TimescaleDB tests need a server with timescaledb preloaded. In order: the server that
# INGESTD_TEST_TIMESCALE_URL names; a cluster of this machine on 5433 (started if stopped); else,
# where ../shared/vendor/timescaledb (the 2.28.3 source and its patch) sits beside the checkout
# (or INGESTD_TIMESCALEDB_SOURCE names that folder), the extension is built and installed into
# pg_config's directories once (skipped when that build is already installed; log in
# .local/timescaledb-build.log) and a throwaway cluster of our own runs under .local/timescale
# on port 55433. Without any of these the TimescaleDB tests skip (or fail, with CI=true).
ts_version=2.28.3
ts_vendor="${INGESTD_TIMESCALEDB_SOURCE:-$root/../shared/vendor/timescaledb}"
ts_url="${INGESTD_TEST_TIMESCALE_URL:-}"
ts_port=55433
ts_built=0

ts_preloaded() {
  PGCONNECT_TIMEOUT=3 psql "$1" -qtAc "select count(*) from pg_available_extensions
    where name = 'timescaledb' and current_setting('shared_preload_libraries') like '%timescaledb%'" \
    2>/dev/null | grep -qx 1
}

# What an installed build from the vendored source is keyed by: the source, the patch and the
# installed libraries. A rebuild happens when the source or patch changes, or when the installed
# libraries are not the ones this script built (e.g. an unpatched build installed over them).
ts_stamp_text() {  # $1: pkglibdir
  sha256sum "$ts_vendor/timescaledb-$ts_version.tar.xz" "$ts_vendor/portal-done-pg15.20.patch" \
    "$1/timescaledb-$ts_version.so" "$1/timescaledb-tsl-$ts_version.so" 2>/dev/null \
    | awk '{print $1}' | tr '\n' ' '
}

ts_build() {  # $1: pg_config of the server the extension is for
  local pg_config="$1" major pkglib sharedir stamp build logf
  major="$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
  pkglib="$("$pg_config" --pkglibdir)"
  sharedir="$("$pg_config" --sharedir)"
  stamp="$pkglib/timescaledb-$ts_version.ingestd-build"
  if [ -f "$pkglib/timescaledb-$ts_version.so" ] \
    && [ -f "$sharedir/extension/timescaledb--$ts_version.sql" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$(ts_stamp_text "$pkglib")" ]; then
    return 0
  fi
  local missing=()
  for pkg in "postgresql-server-dev-$major" cmake gcc make libssl-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
  build="$state/timescaledb-build"
  logf="$state/timescaledb-build.log"
  log "building TimescaleDB $ts_version from $ts_vendor (a minute or two; log in $logf)"
  rm -rf "$build" && mkdir -p "$build"
  if ! (
    set -e
    cd "$build"
    tar -xJf "$ts_vendor/timescaledb-$ts_version.tar.xz"
    cd "timescaledb-$ts_version"
    patch -p1 <"$ts_vendor/portal-done-pg15.20.patch"
    ./bootstrap -DPG_CONFIG="$pg_config" -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
      -DWARNINGS_AS_ERRORS=OFF -DLINTER=OFF -DGENERATE_DOWNGRADE_SCRIPT=OFF -DUSE_TELEMETRY=OFF
    make -C build -j"$(nproc)"
    make -C build install
  ) >"$logf" 2>&1; then
    log "the TimescaleDB build failed; the end of $logf:"
    tail -n 30 "$logf" >&2
    return 1
  fi
  ts_stamp_text "$pkglib" >"$stamp"
  ts_built=1
  rm -rf "$build"
}

if [ -n "$ts_url" ] && ! ts_preloaded "$ts_url"; then
  log "INGESTD_TEST_TIMESCALE_URL=$ts_url does not answer with timescaledb preloaded"
  ts_url=""
fi
if [ -z "$ts_url" ] && command -v pg_lsclusters >/dev/null 2>&1; then
  while read -r ver name port status _; do
    [ "$port" = "5433" ] && [ "$status" != "online" ] && {
      log "starting cluster $ver/$name (TimescaleDB tests)"
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start >&2 || true
    }
  done < <(pg_lsclusters -h 2>/dev/null || true)
  ts_preloaded "postgresql://postgres@127.0.0.1:5433/postgres" \
    && ts_url="postgresql://postgres@127.0.0.1:5433/postgres"
fi
if [ -z "$ts_url" ] && [ ! -f "$ts_vendor/timescaledb-$ts_version.tar.xz" ] \
  && ts_preloaded "postgresql://postgres@127.0.0.1:$ts_port/postgres"; then
  ts_url="postgresql://postgres@127.0.0.1:$ts_port/postgres"  # started by an earlier run
fi
if [ -z "$ts_url" ] && [ -f "$ts_vendor/timescaledb-$ts_version.tar.xz" ]; then
  initdb_bin="$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -z "$initdb_bin" ]; then
    apt_install postgresql
    initdb_bin="$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)"
  fi
  bindir="$(dirname "$initdb_bin")"
  major="$(basename "$(dirname "$bindir")")"
  [ -x "$bindir/pg_config" ] || apt_install "postgresql-server-dev-$major"
  # One build at a time on a machine (two checkouts install into the same directories).
  exec 9>"/tmp/ingestd-timescaledb-$ts_version.lock"
  flock 9
  ts_build "$bindir/pg_config" || exit 1
  flock -u 9
  exec 9>&-  # not inherited by the server started below
  data="$state/timescale"
  run_as=()
  [ "$(id -u)" = "0" ] && run_as=(runuser -u postgres --)
  if [ ! -f "$data/PG_VERSION" ]; then
    log "creating a throwaway TimescaleDB cluster in $data"
    mkdir -p "$data" && chmod 700 "$data"
    [ "$(id -u)" = "0" ] && chown postgres:postgres "$data"
    "${run_as[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >&2
  fi
  grep -q "^include_if_exists = 'ingestd.conf'" "$data/postgresql.conf" \
    || echo "include_if_exists = 'ingestd.conf'" >>"$data/postgresql.conf"
  # Every database with the extension runs a scheduler in a background worker of its own, and
  # each running job takes one more: the test suite clones a database per test, which the
  # defaults (8 / 16) do not cover ("failed to start a background worker").
  cat >"$data/ingestd.conf" <<CONF
# written by scripts/services.sh at every run
port = $ts_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
shared_preload_libraries = 'timescaledb'
max_worker_processes = 40
timescaledb.max_background_workers = 32
timescaledb.telemetry_level = off
CONF
  [ "$(id -u)" = "0" ] && chown postgres:postgres "$data/ingestd.conf"
  ts_url="postgresql://postgres@127.0.0.1:$ts_port/postgres"
  if "${run_as[@]}" "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # Ours runs: restart it only when it runs with other settings than the file now says, or
    # with the libraries of an earlier build loaded.
    if [ "$ts_built" = 1 ] || ! ts_preloaded "$ts_url" \
      || [ "$(psql "$ts_url" -qtAc "select count(*) from pg_file_settings
                                    where sourcefile like '%ingestd.conf' and not applied")" != 0 ]; then
      log "restarting the TimescaleDB cluster in $data (new build or settings)"
      "${run_as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w restart >&2 || true
    fi
  elif ! ts_preloaded "$ts_url"; then  # (else: another checkout's cluster has the port)
    "${run_as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w start >&2 || true
  fi
  ts_preloaded "$ts_url" || { log "TimescaleDB did not start (see $data/server.log)"; exit 1; }
fi
[ -n "$ts_url" ] || log "no TimescaleDB: its tests skip (docs/development.md: Running the TimescaleDB tests)"

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

# --- Prometheus -----------------------------------------------------------------------------------
# tests/e2e/test_prometheus.py starts a Prometheus of its own and runs promtool: Debian's package
# has both. Only the binaries are needed (no recommends: no node exporter).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt_install --no-install-recommends prometheus
  else
    log "prometheus/promtool are not installed (apt-get install prometheus): their tests skip"
  fi
fi

echo "export INGESTD_TEST_DATABASE_URL='$pg_url'"
echo "export INGESTD_TEST_REDIS_URL='$redis_url'"
[ -z "$ts_url" ] || echo "export INGESTD_TEST_TIMESCALE_URL='$ts_url'"
