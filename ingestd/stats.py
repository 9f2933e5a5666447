"""``ingestd stats`` (seed §7): what is in the database and in Redis, and how maintenance goes.

Sections: table sizes (seed §7.1's query, plus ``hypertable_size()`` since a hypertable's root
holds no rows), row counts, hypertable chunks and compression, the two aggregates, TimescaleDB
jobs with their last run, ingestd's own maintenance rounds, the slowest statements from
``pg_stat_statements`` (``mean_exec_time``, the PostgreSQL 13+ name of the seed's ``mean_time``),
and Redis ``INFO stats`` with the ``metrics:*`` keys. ``render`` prints readable tables; the same
dictionary goes out as JSON with ``--json``.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import liveness, tables
from ingestd.db import Connection
from ingestd.gaps import SQL_COUNT_OPEN as SQL_COUNT_OPEN_GAPS
from ingestd.logs import escape
from ingestd.maintenance import hypertable_names

# Seed §7.1, verbatim.
SQL_TABLE_SIZES: Final = """
SELECT
    schemaname,
    tablename,
    pg_size_pretty(pg_total_relation_size(schemaname||'.'||tablename)) as size
FROM pg_tables
WHERE schemaname = 'public'
ORDER BY pg_total_relation_size(schemaname||'.'||tablename) DESC;
"""

# Seed §7.1's slow-query log with the column's current name, limited to this database (the view
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
        "alerts",
        "producer_gaps",
        "producer_seq_ranges",
        "heartbeat_history",
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

# Closes of positions whose open has not landed (DESIGN: visible, then dead letters past an age).
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
        "database": {
            "name": await conn.fetchval("SELECT current_database()"),
            "server_version": await conn.fetchval("SHOW server_version"),
            "timescaledb": timescale,
            "flavour": "TimescaleDB" if timescale else "plain PostgreSQL",
            "timezone": await conn.fetchval("SHOW timezone"),
        }
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
        # Open gaps in the producers' seq numbers (ingestd.gaps), oldest first, at most 100.
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


async def collect_redis(client: aioredis.Redis, *, key_prefix: str = "") -> dict[str, Any]:
    """Redis ``INFO stats`` (seed §7.2) and the ``metrics:*`` keys ingestd wrote."""
    try:
        info = await client.info("stats")
        keys = sorted(
            [
                k.decode() if isinstance(k, bytes) else str(k)
                async for k in client.scan_iter(match=f"{key_prefix}metrics:*", count=1000)
            ]
        )
    except (redis.exceptions.RedisError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "info_stats": {k: _plain(v) for k, v in info.items()},
        "metrics_keys": keys,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, rule, *body])


def _cut(text: Any, width: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= width else s[: width - 1] + "…"


def render(report: dict[str, Any]) -> str:
    """The report as readable text tables."""
    db = report["database"]
    hyper = any(t["hypertable"] for t in report["tables"])
    out = [
        f"database {db['name']}: PostgreSQL {db['server_version']}, "
        + (f"TimescaleDB {db['timescaledb']}" if db["timescaledb"] else "plain (no timescaledb)")
        + f", TimeZone {db['timezone']}",
        "",
        "tables (seed §7.1; a hypertable's own size is its root, see hypertable size)",
        _table(
            ["schema", "table", "size", *(["hypertable size"] if hyper else []), "rows"],
            [
                [
                    t["schemaname"],
                    t["tablename"],
                    t["size"],
                    *([t["hypertable_size"] or ""] if hyper else []),
                    ""
                    if t["rows"] is None
                    else (f"{t['rows']}" if t["rows_exact"] else f"~{t['rows']}"),
                ]
                for t in report["tables"]
            ],
        ),
    ]
    if report["hypertables"]:
        out += [
            "",
            "hypertables",
            _table(
                [
                    "hypertable",
                    "chunk",
                    "chunks",
                    "compressed",
                    "segmentby",
                    "orderby",
                    "before",
                    "after",
                    "ratio",
                ],
                [
                    [
                        h["name"],
                        h["chunk_interval"],
                        h["chunks"],
                        h["compressed_chunks"],
                        h["segmentby"] or ("-" if not h["compression_enabled"] else ""),
                        h["orderby"] or "",
                        h["before_compression_bytes"] or "",
                        h["after_compression_bytes"] or "",
                        "" if h["compression_ratio"] is None else f"{h['compression_ratio']}x",
                    ]
                    for h in report["hypertables"]
                ],
            ),
        ]
    out += [
        "",
        "aggregates",
        _table(
            ["view", "kind", "real-time", "refreshed by", "rows"],
            [
                [
                    a["name"],
                    a["kind"],
                    "yes" if a["real_time"] else "no",
                    a["refreshed_by"],
                    a["rows"],
                ]
                for a in report["aggregates"]
            ],
        ),
    ]
    if report["jobs"]:
        out += [
            "",
            "TimescaleDB jobs (policies)",
            _table(
                [
                    "job",
                    "policy",
                    "on",
                    "every",
                    "config",
                    "last run",
                    "status",
                    "next",
                    "runs",
                    "failed",
                    "last error",
                ],
                [
                    [
                        j["job_id"],
                        str(j["proc_name"]).removeprefix("policy_"),
                        j["target"],
                        j["schedule_interval"],
                        _cut(j["config"], 60),
                        j["last_run_started_at"],
                        j["last_run_status"],
                        j["next_start"],
                        j["total_runs"],
                        j["total_failures"],
                        _cut(j["last_error"], 70),
                    ]
                    for j in report["jobs"]
                ],
            ),
        ]
    out += [
        "",
        "ingestd maintenance rounds",
        _table(
            [
                "task",
                "last started",
                "last finished",
                "status",
                "runs",
                "failures",
                "detail / error",
            ],
            [
                [
                    m["task"],
                    m["last_started_at"],
                    m["last_finished_at"],
                    m["last_status"],
                    m["runs"],
                    m["failures"],
                    _cut(m["last_error"] if m["last_status"] == "failed" else m["last_detail"], 70),
                ]
                for m in report["maintenance"]
            ],
        )
        if report["maintenance"]
        else "(no round has run yet: `ingestd run` does them)",
    ]
    parked = report.get("parked_closes")
    if parked is not None:
        line = "parked closes (position_close waiting for its open): "
        if parked["waiting"]:
            line += (
                f"{parked['waiting']} waiting, {parked['past_max_age']} past "
                f"pipeline.parked_close_max_age_s ({parked['max_age_s']:g} s; the daemon makes "
                f"them dead letters), oldest since {parked['oldest_received_at']}"
            )
        else:
            line += "none"
        out += ["", line]
    gaps = report.get("producer_gaps")
    if gaps is not None:
        out += ["", f"open producer gaps (seq numbers not received): {gaps['open']}"]
        if gaps["rows"]:
            out.append(
                _table(
                    ["producer", "session", "first missing", "last missing", "missing", "since"],
                    [
                        [
                            # Producer-chosen text: escaped, it cannot move the terminal.
                            _cut(escape(g["producer"] or "(none)"), 20),
                            _cut(escape(g["session"] or "(none)"), 50),
                            g["first_missing"],
                            g["last_missing"],
                            g["missing"],
                            g["detected_at"],
                        ]
                        for g in gaps["rows"]
                    ],
                )
            )
    out += render_liveness(report.get("liveness"))
    slow = report["slow_queries"]
    out += ["", "slowest statements (pg_stat_statements, mean_exec_time)"]
    if slow["available"]:
        out.append(
            _table(
                ["mean ms", "calls", "query"],
                [[q["mean_exec_time_ms"], q["calls"], _cut(q["query"], 90)] for q in slow["rows"]],
            )
        )
    else:
        out.append(slow["hint"])
    rds = report.get("redis")
    if rds is not None:
        out += ["", "redis INFO stats"]
        if "error" in rds:
            out.append(f"unavailable: {rds['error']}")
        else:
            out.append(_table(["field", "value"], sorted(rds["info_stats"].items())))
            keys = rds["metrics_keys"]
            out += ["", f"metrics keys ({len(keys)})"]
            out += [f"  {k}" for k in keys[:50]]
            if len(keys) > 50:
                out.append(f"  … and {len(keys) - 50} more")
    return "\n".join(out) + "\n"


def render_liveness(section: dict[str, Any] | None) -> list[str]:
    """The component liveness section (ingestd/liveness.py) as text lines; empty when the
    heartbeat history does not exist."""
    if section is None:
        return []
    rows = section["components"]
    out = ["", f"component liveness (heartbeat history; {len(rows)} component(s))"]
    if not rows:
        out.append("(no heartbeat recorded yet)")
        return out
    out.append(
        _table(
            ["component", "state", "alive since", "last seen", "ago", "intervals"],
            [
                [
                    # Producer-chosen text: escaped, it cannot move the terminal.
                    escape(c["component"]),
                    "alive" if c["alive"] else "DOWN",
                    _plain(c["alive_from"]) if c["alive"] else "-",
                    _plain(c["last_seen"]),
                    f"{c['last_seen_age_s']:g}s",
                    c["intervals"],
                ]
                for c in rows
            ],
        )
    )
    return out


def to_json(report: dict[str, Any]) -> bytes:
    """The report as JSON (times in UTC ISO-8601, decimals as strings)."""
    return orjson.dumps(report, default=_plain, option=orjson.OPT_INDENT_2)
