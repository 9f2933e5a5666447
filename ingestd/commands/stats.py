"""``ingestd stats``: what is in the database and in Redis, and how maintenance goes.

Sections: table sizes (plus ``hypertable_size()``, since a hypertable's root holds no rows), row
counts, hypertable chunks and compression, the two aggregates, TimescaleDB jobs with their last
run, ingestd's own maintenance rounds, the slowest statements from ``pg_stat_statements``
(``mean_exec_time``), and Redis ``INFO`` (server, clients, memory, stats, keyspace) with the
``metrics:*`` keys. ``render`` and ``print_report`` show them as sections of tables that fit the
width (100 columns off a terminal); the whole dictionary goes out as JSON with ``--json``.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable
from typing import Any, Final, TextIO

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from rich.console import RenderableType

from ingestd.commands.textui import (
    PLAIN_WIDTH,
    Column,
    Section,
    print_sections,
    render_sections,
    table,
)
from ingestd.daemon import liveness
from ingestd.daemon.db import Connection
from ingestd.daemon.gaps import SQL_COUNT_OPEN as SQL_COUNT_OPEN_GAPS
from ingestd.daemon.maintenance import hypertable_names
from ingestd.logs import escape
from ingestd.wire import tables

SQL_TABLE_SIZES: Final = """
SELECT
    schemaname,
    tablename,
    pg_size_pretty(pg_total_relation_size(schemaname||'.'||tablename)) as size
FROM pg_tables
WHERE schemaname = 'public'
ORDER BY pg_total_relation_size(schemaname||'.'||tablename) DESC;
"""

# The slowest statements by mean time (``mean_exec_time``), limited to this database (the view
# covers the whole server).
SQL_SLOW_QUERIES: Final = """
SELECT query, calls, mean_exec_time FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY mean_exec_time DESC
LIMIT $1
"""

# Tables that may be counted exactly (identifiers only from this allow-list).
COUNTABLE: Final = frozenset(
    {
        *(t.name for t in tables.APPEND_TABLES),
        "positions",
        "position_closes_pending",
        "dead_letters",
        "ingestd_maintenance",
        "ingestd_migrations",
        "daily_pnl_summary",
        "hourly_spread_avg",
        # The trading-safety tables.
        "alerts",
        "producer_gaps",
        "producer_seq_ranges",
        "heartbeat_history",
        "ingestd_aggregate_backfill",
    }
)
AGGREGATES: Final = ("daily_pnl_summary", "hourly_spread_avg")

_SQL_ESTIMATE: Final = """
SELECT CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END
FROM pg_class c WHERE c.oid = to_regclass($1)
"""

_SQL_HYPERTABLES: Final = """
SELECT h.hypertable_name::text AS name,
       d.time_interval::text AS chunk_interval,
       h.compression_enabled,
       (SELECT count(*) FROM timescaledb_information.chunks c
        WHERE c.hypertable_schema = h.hypertable_schema
          AND c.hypertable_name = h.hypertable_name)::int AS chunks,
       (SELECT count(*) FROM timescaledb_information.chunks c
        WHERE c.hypertable_schema = h.hypertable_schema
          AND c.hypertable_name = h.hypertable_name AND c.is_compressed)::int AS compressed_chunks,
       (SELECT string_agg(s.attname::text, ', ' ORDER BY s.segmentby_column_index)
        FROM timescaledb_information.compression_settings s
        WHERE s.hypertable_schema = h.hypertable_schema
          AND s.hypertable_name = h.hypertable_name
          AND s.segmentby_column_index IS NOT NULL) AS segmentby,
       (SELECT string_agg(s.attname::text || CASE WHEN s.orderby_asc THEN '' ELSE ' DESC' END,
                          ', ' ORDER BY s.orderby_column_index)
        FROM timescaledb_information.compression_settings s
        WHERE s.hypertable_schema = h.hypertable_schema
          AND s.hypertable_name = h.hypertable_name
          AND s.orderby_column_index IS NOT NULL) AS orderby,
       hypertable_size(format('%I.%I', h.hypertable_schema, h.hypertable_name)::regclass)
           AS total_bytes
FROM timescaledb_information.hypertables h
JOIN timescaledb_information.dimensions d
  ON d.hypertable_schema = h.hypertable_schema AND d.hypertable_name = h.hypertable_name
 AND d.dimension_number = 1
WHERE h.hypertable_schema = 'public'
ORDER BY h.hypertable_name
"""

_SQL_COMPRESSION: Final = """
SELECT before_compression_total_bytes AS before_bytes,
       after_compression_total_bytes AS after_bytes
FROM hypertable_compression_stats($1::regclass)
"""

_SQL_CAGGS: Final = """
SELECT view_name::text AS name, materialized_only
FROM timescaledb_information.continuous_aggregates
WHERE view_schema = 'public'
"""

_SQL_JOBS: Final = """
SELECT j.job_id, j.application_name::text AS application_name, j.proc_name::text AS proc_name,
       coalesce(ca.view_name::text, j.hypertable_name::text) AS target,
       j.schedule_interval::text AS schedule_interval, j.config::text AS config,
       j.scheduled, s.last_run_started_at, s.last_successful_finish,
       s.last_run_status::text AS last_run_status, s.next_start,
       s.total_runs, s.total_successes, s.total_failures, e.err_message AS last_error
FROM timescaledb_information.jobs j
LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
-- Why the last run failed (TimescaleDB keeps each failed run's error); nothing after a success.
LEFT JOIN LATERAL (
    SELECT err.err_message::text AS err_message FROM timescaledb_information.job_errors err
    WHERE err.job_id = j.job_id ORDER BY err.finish_time DESC LIMIT 1
) e ON s.last_run_status = 'Failed'
LEFT JOIN timescaledb_information.continuous_aggregates ca
  ON ca.materialization_hypertable_schema = j.hypertable_schema
 AND ca.materialization_hypertable_name = j.hypertable_name
WHERE j.proc_name IN ('policy_retention', 'policy_compression',
                      'policy_refresh_continuous_aggregate')
ORDER BY j.job_id
"""

# Closes of positions whose open has not landed (visible here, then dead letters past an age).
_SQL_PARKED_CLOSES: Final = """
SELECT count(*)::int AS waiting,
       (count(*) FILTER (
           WHERE received_at < CURRENT_TIMESTAMP - make_interval(secs => $1)))::int AS past,
       min(received_at) AS oldest,
       extract(epoch FROM CURRENT_TIMESTAMP - min(received_at))::float8 AS oldest_age_s
FROM position_closes_pending
"""

_SQL_MAINTENANCE: Final = """
SELECT task::text, last_started_at, last_finished_at, last_status::text, last_detail,
       last_error, runs, failures
FROM ingestd_maintenance ORDER BY task
"""


def _plain(value: Any) -> Any:
    """JSON-ready: times as UTC ISO-8601, decimals as strings."""
    if isinstance(value, dt.datetime):
        # asyncpg gives PostgreSQL's +-infinity (a paused job's next start) as the naive
        # datetime.max/min; every real timestamptz comes back aware.
        if value.tzinfo is None:
            return "infinity" if value.year == 9999 else "-infinity"
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date | dt.timedelta):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _record(r: asyncpg.Record) -> dict[str, Any]:
    return {k: _plain(v) for k, v in r.items()}


async def _exists(conn: Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def _extension(conn: Connection, name: str) -> str | None:
    version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = $1", name)
    return None if version is None else str(version)


async def _row_count(conn: Connection, name: str, hyper: bool, exact: bool) -> int | None:
    if exact and name in COUNTABLE:
        return int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
    if hyper:
        return int(await conn.fetchval("SELECT approximate_row_count($1::regclass)", name))
    value = await conn.fetchval(_SQL_ESTIMATE, name)
    return None if value is None else int(value)


async def _slow_queries(conn: Connection, top: int) -> dict[str, Any]:
    if await _extension(conn, "pg_stat_statements") is not None:
        rows = await conn.fetch(SQL_SLOW_QUERIES, top)
        return {
            "available": True,
            "rows": [
                {
                    "query": " ".join(str(r["query"]).split()),
                    "calls": r["calls"],
                    "mean_exec_time_ms": round(float(r["mean_exec_time"]), 3),
                }
                for r in rows
            ],
        }
    preloaded = "pg_stat_statements" in str(
        await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    )
    if preloaded:
        hint = (
            "pg_stat_statements is preloaded but not created in this database: "
            "run CREATE EXTENSION pg_stat_statements; (as a superuser)"
        )
    else:
        hint = (
            "pg_stat_statements is not available: add it to shared_preload_libraries in "
            "postgresql.conf, restart PostgreSQL, then CREATE EXTENSION pg_stat_statements;"
        )
    return {"available": False, "hint": hint, "rows": []}


async def collect_database(
    conn: Connection,
    *,
    exact: bool = False,
    top: int = 10,
    parked_close_max_age_s: float = 86_400.0,
    liveness_alive_within_s: float = 15.0,
) -> dict[str, Any]:
    """Every database section of the report."""
    timescale = await _extension(conn, "timescaledb")
    hyper = await hypertable_names(conn)
    report: dict[str, Any] = {
        # What the text's relative times ("5m ago") count from.
        "collected_at": _plain(dt.datetime.now(dt.UTC)),
        "database": {
            "name": await conn.fetchval("SELECT current_database()"),
            "server_version": await conn.fetchval("SHOW server_version"),
            "timescaledb": timescale,
            "flavour": "TimescaleDB" if timescale else "plain PostgreSQL",
            "timezone": await conn.fetchval("SHOW timezone"),
        },
    }
    hyper_info: dict[str, dict[str, Any]] = {}
    if timescale:
        for r in await conn.fetch(_SQL_HYPERTABLES):
            info = _record(r)
            info["before_compression_bytes"] = info["after_compression_bytes"] = None
            info["compression_ratio"] = None
            if r["compressed_chunks"]:
                comp = await conn.fetchrow(_SQL_COMPRESSION, r["name"])
                if comp is not None and comp["after_bytes"]:
                    info["before_compression_bytes"] = comp["before_bytes"]
                    info["after_compression_bytes"] = comp["after_bytes"]
                    info["compression_ratio"] = round(comp["before_bytes"] / comp["after_bytes"], 2)
            hyper_info[r["name"]] = info
    sizes = []
    for r in await conn.fetch(SQL_TABLE_SIZES):
        name = r["tablename"]
        entry = {
            "schemaname": r["schemaname"],
            "tablename": name,
            "size": r["size"],
            "hypertable": name in hyper,
            "hypertable_size": None,
            "rows": await _row_count(conn, name, name in hyper, exact),
            "rows_exact": exact and name in COUNTABLE,
        }
        if name in hyper_info:
            entry["hypertable_size"] = await conn.fetchval(
                "SELECT pg_size_pretty($1::bigint)", hyper_info[name]["total_bytes"]
            )
        sizes.append(entry)
    report["tables"] = sizes
    report["hypertables"] = list(hyper_info.values())

    caggs = (
        {r["name"]: r["materialized_only"] for r in await conn.fetch(_SQL_CAGGS)}
        if (timescale)
        else {}
    )
    aggregates = []
    for name in AGGREGATES:
        if not await _exists(conn, name):
            continue
        kind = "continuous aggregate" if name in caggs else "materialized view"
        populated = await conn.fetchval(
            "SELECT relispopulated FROM pg_class WHERE oid = to_regclass($1)", name
        )
        aggregates.append(
            {
                "name": name,
                "kind": kind,
                "real_time": (not caggs[name]) if name in caggs else False,
                "refreshed_by": "TimescaleDB policy" if name in caggs else "ingestd maintenance",
                "rows": int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
                if populated
                else None,
            }
        )
    report["aggregates"] = aggregates
    report["jobs"] = [_record(r) for r in await conn.fetch(_SQL_JOBS)] if timescale else []
    report["maintenance"] = (
        [_record(r) for r in await conn.fetch(_SQL_MAINTENANCE)]
        if await _exists(conn, "ingestd_maintenance")
        else []
    )
    if await _exists(conn, "position_closes_pending"):
        parked = await conn.fetchrow(_SQL_PARKED_CLOSES, float(parked_close_max_age_s))
        assert parked is not None
        report["parked_closes"] = {
            "waiting": parked["waiting"],
            "past_max_age": parked["past"],
            "max_age_s": parked_close_max_age_s,
            "oldest_received_at": _plain(parked["oldest"]),
            "oldest_age_s": parked["oldest_age_s"],
        }
    if await _exists(conn, "producer_gaps"):
        # Open gaps in the producers' seq numbers (ingestd.daemon.gaps), oldest first, at most 100.
        gaps = await conn.fetch(_SQL_OPEN_GAPS)
        report["producer_gaps"] = {
            "open": await conn.fetchval(SQL_COUNT_OPEN_GAPS),
            "rows": [_record(r) for r in gaps],
        }
    report["liveness"] = await liveness.collect_section(
        conn, alive_within_s=liveness_alive_within_s
    )
    report["slow_queries"] = await _slow_queries(conn, top)
    return report


_SQL_OPEN_GAPS = """
SELECT producer, session, first_missing, last_missing, last_missing - first_missing + 1 AS missing,
       detected_at
FROM producer_gaps WHERE closed_at IS NULL
ORDER BY detected_at, producer, session, first_missing LIMIT 100
"""


# The INFO sections collected (all of their fields go into the JSON; the text shows a few).
REDIS_INFO_SECTIONS: Final = ("server", "clients", "memory", "stats", "keyspace")


async def collect_redis(client: aioredis.Redis, *, key_prefix: str = "") -> dict[str, Any]:
    """Redis ``INFO`` (server, clients, memory, stats, keyspace) and the ``metrics:*`` keys."""
    try:
        info = {s: await client.info(s) for s in REDIS_INFO_SECTIONS}
        keys = sorted(
            [
                k.decode() if isinstance(k, bytes) else str(k)
                async for k in client.scan_iter(match=f"{key_prefix}metrics:*", count=1000)
            ]
        )
    except (redis.exceptions.RedisError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    report: dict[str, Any] = {
        "db": int(client.connection_pool.connection_kwargs.get("db", 0)),
        **{f"info_{s}": {k: _plain(v) for k, v in info[s].items()} for s in REDIS_INFO_SECTIONS},
        "metrics_keys": keys,
    }
    return report


# --- the text report: a header and a list of sections, each rendered alike ----------------------
#
# A new section is a function of the report returning a ``Section`` (or None when it has nothing
# to say), added to ``SECTIONS`` in the order it should print. Times are shown relative to when the
# report was collected; the JSON keeps them exact.

_POLICY_NAMES: Final = {"refresh_continuous_aggregate": "refresh"}


def _ago(value: Any, now: dt.datetime) -> str:
    """``5m ago`` / ``in 12m`` for an ISO-8601 time; other values as they are."""
    if value is None:
        return ""
    if value == "infinity":
        return "never"
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is None:
        return str(value)
    seconds = (when - now).total_seconds()
    span = _span(abs(seconds))
    return f"in {span}" if seconds > 0 else f"{span} ago"


def _span(seconds: float) -> str:
    """A duration in its largest two units: ``45s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"


def _took(started: Any, finished: Any) -> str:
    try:
        a = dt.datetime.fromisoformat(str(started))
        b = dt.datetime.fromisoformat(str(finished))
    except ValueError:
        return ""
    seconds = (b - a).total_seconds()
    return f"{seconds:.1f}s" if 0 <= seconds < 600 else ""


def _bytes(n: Any) -> str:
    if n is None or n == "":
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # pragma: no cover - the loop returns


def _collected_at(report: dict[str, Any]) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(str(report.get("collected_at")))
    except ValueError:
        return dt.datetime.now(dt.UTC)


def _tables(report: dict[str, Any], now: dt.datetime) -> Section:
    hyper = any(t["hypertable"] for t in report["tables"])
    columns = [
        Column("table"),
        Column("size", numeric=True),
        *([Column("hypertable size", numeric=True)] if hyper else []),
        Column("rows", numeric=True),
    ]
    rows = [
        [
            t["tablename"]
            if t["schemaname"] == "public"
            else f"{t['schemaname']}.{t['tablename']}",
            t["size"],
            *([t["hypertable_size"] or ""] if hyper else []),
            ""
            if t["rows"] is None
            else (f"{t['rows']:,}" if t["rows_exact"] else f"~{t['rows']:,}"),
        ]
        for t in report["tables"]
    ]
    title = "tables (~: an estimate, --exact counts)"
    if hyper:
        # A hypertable's rows live in its chunks: its root table alone is nearly empty.
        title = "tables (~: an estimate, --exact counts; a hypertable's chunks: hypertable size)"
    return Section(title, [table(columns, rows)])


def _hypertables(report: dict[str, Any], now: dt.datetime) -> Section | None:
    if not report["hypertables"]:
        return None
    columns = [
        Column("hypertable"),
        Column("chunk"),
        Column("chunks", numeric=True),
        Column("compressed", numeric=True),
        Column("segmentby", cut=True),
        Column("orderby", cut=True),
        Column("before", numeric=True),
        Column("after", numeric=True),
        Column("ratio", numeric=True),
    ]
    rows = [
        [
            h["name"],
            h["chunk_interval"],
            h["chunks"],
            h["compressed_chunks"],
            h["segmentby"] or ("-" if not h["compression_enabled"] else ""),
            h["orderby"] or "",
            _bytes(h["before_compression_bytes"]),
            _bytes(h["after_compression_bytes"]),
            "" if h["compression_ratio"] is None else f"{h['compression_ratio']}x",
        ]
        for h in report["hypertables"]
    ]
    return Section("hypertables (compression: before / after)", [table(columns, rows)])


def _aggregates(report: dict[str, Any], now: dt.datetime) -> Section:
    columns = [
        Column("view"),
        Column("kind"),
        Column("real-time"),
        Column("refreshed by"),
        Column("rows", numeric=True),
    ]
    rows = [
        [a["name"], a["kind"], a["real_time"], a["refreshed_by"], a["rows"]]
        for a in report["aggregates"]
    ]
    return Section("aggregates", [table(columns, rows)])


def _jobs(report: dict[str, Any], now: dt.datetime) -> Section | None:
    if not report["jobs"]:
        return None
    columns = [
        Column("job", numeric=True),
        Column("policy"),
        Column("on"),
        Column("every"),
        Column("last run"),
        Column("status"),
        Column("next"),
        Column("runs", numeric=True),
        Column("failed", numeric=True),
    ]
    rows = []
    errors = []
    for j in report["jobs"]:
        policy = str(j["proc_name"]).removeprefix("policy_")
        rows.append(
            [
                str(j["job_id"]),  # an id, not a quantity: no thousands separator
                _POLICY_NAMES.get(policy, policy),
                j["target"],
                j["schedule_interval"],
                _ago(j["last_run_started_at"], now),
                j["last_run_status"],
                _ago(j["next_start"], now),
                j["total_runs"],
                j["total_failures"],
            ]
        )
        if j["last_error"]:
            errors.append(f"job {j['job_id']} last error: {escape(str(j['last_error']))}")
    return Section("TimescaleDB jobs (policies)", [table(columns, rows), *errors])


def _maintenance(report: dict[str, Any], now: dt.datetime) -> Section:
    title = "ingestd maintenance rounds"
    if not report["maintenance"]:
        return Section(title, ["(no round has run yet: ingestd run does them)"])
    columns = [
        Column("task"),
        Column("last started"),
        Column("took", numeric=True),
        Column("status"),
        Column("runs", numeric=True),
        Column("failures", numeric=True),
        Column("detail / error", cut=True),
    ]
    rows = [
        [
            m["task"],
            _ago(m["last_started_at"], now),
            _took(m["last_started_at"], m["last_finished_at"]),
            m["last_status"],
            m["runs"],
            m["failures"],
            m["last_error"] if m["last_status"] == "failed" else m["last_detail"],
        ]
        for m in report["maintenance"]
    ]
    return Section(title, [table(columns, rows)])


def _parked_closes(report: dict[str, Any], now: dt.datetime) -> Section | None:
    parked = report.get("parked_closes")
    if parked is None:
        return None
    if parked["waiting"]:
        summary = (
            f"{parked['waiting']} waiting, {parked['past_max_age']} past "
            f"pipeline.parked_close_max_age_s ({parked['max_age_s']:g} s; the daemon makes "
            f"them dead letters), oldest since {parked['oldest_received_at']}"
        )
    else:
        summary = "none"
    return Section(f"parked closes (position_close waiting for its open): {summary}", [])


def _producer_gaps(report: dict[str, Any], now: dt.datetime) -> Section | None:
    gaps = report.get("producer_gaps")
    if gaps is None:
        return None
    body = []
    if gaps["rows"]:
        columns = [
            Column("producer", cut=True),
            Column("session", cut=True),
            Column("first missing", numeric=True),
            Column("last missing", numeric=True),
            Column("missing", numeric=True),
            Column("since"),
        ]
        rows = [
            [
                # Producer-chosen text: escaped, it cannot move the terminal.
                escape(g["producer"] or "(none)"),
                escape(g["session"] or "(none)"),
                g["first_missing"],
                g["last_missing"],
                g["missing"],
                _ago(g["detected_at"], now),
            ]
            for g in gaps["rows"]
        ]
        body.append(table(columns, rows))
    return Section(f"open producer gaps (seq numbers not received): {gaps['open']}", body)


def _liveness(report: dict[str, Any], now: dt.datetime) -> Section | None:
    """Each component's newest liveness interval (the heartbeat history,
    ingestd/daemon/liveness.py)."""
    section = report.get("liveness")
    if section is None:
        return None
    rows = section["components"]
    title = f"component liveness (heartbeat history): {len(rows)} component(s)"
    if not rows:
        return Section(title, ["(no heartbeat recorded yet)"])
    columns = [
        Column("component", cut=True),
        Column("state"),
        Column("alive since"),
        Column("last seen"),
        Column("intervals", numeric=True),
    ]
    body = [
        [
            # Producer-chosen text: escaped, it cannot move the terminal.
            escape(c["component"]),
            "alive" if c["alive"] else "DOWN",
            _ago(_plain(c["alive_from"]), now) if c["alive"] else "-",
            _ago(_plain(c["last_seen"]), now),
            c["intervals"],
        ]
        for c in rows
    ]
    return Section(title, [table(columns, body)])


def _slow_queries_section(report: dict[str, Any], now: dt.datetime) -> Section:
    slow = report["slow_queries"]
    title = "slowest statements (pg_stat_statements, mean_exec_time)"
    if not slow["available"]:
        return Section(title, [slow["hint"]])
    columns = [
        Column("mean ms", numeric=True),
        Column("calls", numeric=True),
        Column("query", cut=True),
    ]
    rows = [[f"{q['mean_exec_time_ms']:,.3f}", q["calls"], q["query"]] for q in slow["rows"]]
    return Section(title, [table(columns, rows)])


def _redis_rows(rds: dict[str, Any]) -> list[list[Any]]:
    """The INFO fields an operator looks at, from the sections collected."""
    server = rds.get("info_server", {})
    clients = rds.get("info_clients", {})
    memory = rds.get("info_memory", {})
    st = rds.get("info_stats", {})
    rows: list[list[Any]] = []

    def add(name: str, *values: Any, text: str | None = None) -> None:
        if all(v is not None for v in values):
            rows.append([name, text if text is not None else values[0]])

    add("version", server.get("redis_version"))
    uptime = server.get("uptime_in_seconds")
    add("uptime", uptime, text=None if uptime is None else _span(float(uptime)))
    add("memory used", memory.get("used_memory_human"))
    add("memory peak", memory.get("used_memory_peak_human"))
    maxmemory = memory.get("maxmemory")
    add(
        "memory max",
        maxmemory,
        memory.get("maxmemory_policy"),
        text=f"{'no limit' if not maxmemory else memory.get('maxmemory_human')}, "
        f"policy {memory.get('maxmemory_policy')}",
    )
    add("clients connected", clients.get("connected_clients"))
    add("clients blocked", clients.get("blocked_clients"))
    add("ops/s", st.get("instantaneous_ops_per_sec"))
    add("commands processed", st.get("total_commands_processed"))
    hits, misses = st.get("keyspace_hits"), st.get("keyspace_misses")
    if hits is not None and misses is not None:
        ratio = f" ({hits / (hits + misses):.0%} hits)" if hits + misses else ""
        rows.append(["keyspace hits / misses", f"{hits:,} / {misses:,}{ratio}"])
    add("evicted keys", st.get("evicted_keys"))
    add("expired keys", st.get("expired_keys"))
    add("rejected connections", st.get("rejected_connections"))
    own = f"db{rds.get('db', 0)}"
    for db, keys in sorted(rds.get("info_keyspace", {}).items()):
        if db == own and isinstance(keys, dict):
            rows.append(
                [
                    f"keys in {db}",
                    f"{keys.get('keys', 0):,} ({keys.get('expires', 0):,} with a TTL)",
                ]
            )
    return rows


def _redis(report: dict[str, Any], now: dt.datetime) -> Section | None:
    rds = report.get("redis")
    if rds is None:
        return None
    if "error" in rds:
        return Section("redis", [f"unavailable: {rds['error']}"])
    columns = [Column("field"), Column("value", cut=True)]
    return Section("redis (INFO; --json has every field)", [table(columns, _redis_rows(rds))])


_METRICS_KEYS_SHOWN: Final = 10


def _metrics_keys(report: dict[str, Any], now: dt.datetime) -> Section | None:
    rds = report.get("redis")
    if rds is None or "error" in rds:
        return None
    keys = rds["metrics_keys"]
    body: list[RenderableType] = [f"  {k}" for k in keys[:_METRICS_KEYS_SHOWN]]
    if len(keys) > _METRICS_KEYS_SHOWN:
        body.append(f"  … and {len(keys) - _METRICS_KEYS_SHOWN} more (--json lists them all)")
    return Section(f"metrics keys ({len(keys)})", body)


SECTIONS: Final[tuple[Callable[[dict[str, Any], dt.datetime], Section | None], ...]] = (
    _tables,
    _hypertables,
    _aggregates,
    _jobs,
    _maintenance,
    _parked_closes,
    _producer_gaps,
    _liveness,
    _slow_queries_section,
    _redis,
    _metrics_keys,
)


def header(report: dict[str, Any]) -> list[str]:
    """The first line: which database, which server, which time zone."""
    db = report["database"]
    return [
        f"database {db['name']}: PostgreSQL {db['server_version']}, "
        + (f"TimescaleDB {db['timescaledb']}" if db["timescaledb"] else "plain (no timescaledb)")
        + f", TimeZone {db['timezone']}"
    ]


def sections(report: dict[str, Any]) -> list[Section]:
    """The report's sections, in order, leaving out those with nothing to show."""
    now = _collected_at(report)
    return [s for build in SECTIONS if (s := build(report, now)) is not None]


def render(report: dict[str, Any], *, width: int = PLAIN_WIDTH) -> str:
    """The report as plain text, ``width`` columns wide."""
    return render_sections(header(report), sections(report), width=width)


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The report on ``out``: at the terminal's width on a terminal, else ``PLAIN_WIDTH``."""
    print_sections(out, header(report), sections(report))


def to_json(report: dict[str, Any]) -> bytes:
    """The report as JSON (times in UTC ISO-8601, decimals as strings)."""
    return orjson.dumps(report, default=_plain, option=orjson.OPT_INDENT_2)
