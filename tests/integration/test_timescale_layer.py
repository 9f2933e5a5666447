"""The TimescaleDB layer and its plain-PostgreSQL fallback, after a simulated week of data.

A week of collector + paper-trader events (ingestd.tools.simulate, one tick a minute) goes through
the
real pipeline (Redis Stream -> Service -> PostgreSQL); the expected answers of the queries users
run (the two views, three ad-hoc queries, the table sizes) are computed here, independently, with
Decimal arithmetic from the events that were sent. Run on plain PostgreSQL, and on TimescaleDB
where a server preloads it (else skipped, saying why).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import time
from collections import defaultdict
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from ingestd import Service
from ingestd.daemon.maintenance import (
    METRICS_TTL_S,
    TASK_BACKFILL,
    TASK_METRICS,
    TASK_POLICIES,
    TASK_REFRESH,
    TASK_RETENTION,
    TASKS,
)
from ingestd.settings import Settings
from ingestd.tools.simulate import Simulator
from tests.conftest import PgServer, quick_settings
from tests.daemons import run_cli

pytestmark = [pytest.mark.pg, pytest.mark.redis]

UTC = dt.UTC
STREAM = "ingestd:events"
SYMBOLS = ("BTC", "ETH", "XRP")
# Configured retention, deliberately not the defaults: the policies must follow settings.
RETENTION = {"spreads": 30, "fx_rates": 60, "orders": 365}

# --- the queries users run, verbatim ------------------------------------------------------------

SEED_DAILY_PNL_VIEW = "SELECT * FROM daily_pnl_summary"
SEED_HOURLY_SPREAD_VIEW = "SELECT * FROM hourly_spread_avg"

SEED_RECENT_BTC_POSITIONS = """
SELECT * FROM positions
WHERE symbol = 'BTC' AND status = 'CLOSED'
ORDER BY timestamp_close DESC
LIMIT 100;
"""

SEED_DAILY_PNL = """
SELECT
    DATE(timestamp_close) as trade_date,
    SUM(pnl_krw) as daily_pnl,
    COUNT(*) as trade_count
FROM positions
WHERE status = 'CLOSED'
GROUP BY DATE(timestamp_close)
ORDER BY trade_date DESC;
"""

SEED_HOURLY_SPREAD = """
SELECT
    TIME_BUCKET('1 hour', timestamp) as hour,
    AVG(net_spread_pct) as avg_spread
FROM spreads
WHERE symbol = 'BTC'
GROUP BY TIME_BUCKET('1 hour', timestamp)
ORDER BY hour DESC
LIMIT 24;
"""

SEED_TABLE_SIZES = """
SELECT
    schemaname,
    tablename,
    pg_size_pretty(pg_total_relation_size(schemaname||'.'||tablename)) as size
FROM pg_tables
WHERE schemaname = 'public'
ORDER BY pg_total_relation_size(schemaname||'.'||tablename) DESC;
"""


# --- the oracle: expected answers from the events sent ----------------------------------------


def ts(text: str) -> dt.datetime:
    """An RFC 3339 event time as an aware datetime."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def hour_of(moment: dt.datetime) -> dt.datetime:
    """The UTC hour bucket."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def assert_avg(got: Decimal, values: Iterable[Decimal], what: str) -> None:
    """``got`` is the exact mean rounded (half away from zero) at the scale PostgreSQL chose."""
    vals = list(values)
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        exact = sum(vals, Decimal(0)) / len(vals)
    scale = -int(got.as_tuple().exponent)
    assert scale >= 4, f"{what}: {got} keeps fewer digits than its column"
    assert got == exact.quantize(Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP), what


@dataclasses.dataclass
class Position:
    """A closed position as the events describe it."""

    key: str
    symbol: str
    pnl_krw: Decimal
    pnl_pct: Decimal
    closed: dt.datetime


@dataclasses.dataclass
class Week:
    """A simulated week of events and what the database must hold afterwards."""

    events: list[dict[str, Any]]
    end: dt.datetime

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of one type."""
        return [e for e in self.events if e["type"] == kind]

    @property
    def row_counts(self) -> dict[str, int]:
        """Rows per table once everything has landed."""
        return {
            "spreads": len(self.of("spread")),
            "fx_rates": len(self.of("fx_rate")),
            "orders": len(self.of("order")),
            "trades": len(self.of("trade")),
            "positions": len(self.of("position_open")),
        }

    @property
    def closed(self) -> list[Position]:
        """Every closed position."""
        symbol = {e["position_key"]: e["symbol"] for e in self.of("position_open")}
        return [
            Position(
                e["position_key"],
                symbol[e["position_key"]],
                Decimal(e["pnl_krw"]),
                Decimal(e["pnl_pct"]),
                ts(e["timestamp_close"]),
            )
            for e in self.of("position_close")
        ]

    def daily(self) -> dict[tuple[dt.date, str], list[Position]]:
        """Closed positions by (UTC day, symbol)."""
        out: dict[tuple[dt.date, str], list[Position]] = defaultdict(list)
        for p in self.closed:
            out[(p.closed.astimezone(UTC).date(), p.symbol)].append(p)
        return out

    def hourly(self) -> dict[tuple[dt.datetime, str], list[dict[str, Any]]]:
        """Spread events by (UTC hour, symbol)."""
        out: dict[tuple[dt.datetime, str], list[dict[str, Any]]] = defaultdict(list)
        for e in self.of("spread"):
            out[(hour_of(ts(e["timestamp"])), e["symbol"])].append(e)
        return out


def simulate_week(end: dt.datetime, tick_s: float = 60.0) -> Week:
    """A week of events up to ``end``, one market tick per ``tick_s`` seconds."""
    sim = Simulator(seed=11, symbols=SYMBOLS, start=end - dt.timedelta(days=7), tick_s=tick_s)
    events: list[dict[str, Any]] = []
    while sim.now + sim.tick < end:
        events.extend(sim.step())
    return Week(events, end)


# --- fixtures ---------------------------------------------------------------------------------


def make_settings(dsn: str, redis_url: str, **extra: Any) -> Settings:
    """Settings for this test's database and Redis, with the test's retention."""
    retention = {f"retention.{t}_days": d for t, d in RETENTION.items()}
    return quick_settings(dsn, redis_url, **{"stream.consumer": "tsdb-test", **retention, **extra})


async def ingest(
    settings: Settings, rclient: redis.Redis, week: Week, conn: asyncpg.Connection
) -> Service:
    """Publish the week to the stream and let a running Service write it; return the Service."""
    pipe = rclient.pipeline(transaction=False)
    for n, ev in enumerate(week.events, 1):
        pipe.xadd(STREAM, {"event": orjson.dumps(ev)})
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()
    service = Service(settings)
    await service.start()
    want = week.row_counts
    deadline = time.monotonic() + 180
    got: dict[str, int] = {}
    while time.monotonic() < deadline:
        got = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in want}
        closed = int(await conn.fetchval("SELECT count(*) FROM positions WHERE status = 'CLOSED'"))
        if got == want and closed == len(week.closed):
            break
        await asyncio.sleep(0.2)
    assert got == want
    return service


async def timescale_jobs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """The policies' jobs with their target (the cagg's name for its refresh policy)."""
    return await conn.fetch(
        """
        SELECT j.job_id, j.proc_name::text AS proc, j.config,
               coalesce(ca.view_name::text, j.hypertable_name::text) AS target
        FROM timescaledb_information.jobs j
        LEFT JOIN timescaledb_information.continuous_aggregates ca
          ON ca.materialization_hypertable_name = j.hypertable_name
        WHERE j.proc_name LIKE 'policy_%' AND j.hypertable_name IS NOT NULL
        """
    )


# --- the Done-when test -------------------------------------------------------------------------


async def test_a_simulated_week_gives_the_seeds_answers(
    server: tuple[str, PgServer],
    dsn: str,
    conn: asyncpg.Connection,
    redis_url: str,
    rclient: redis.Redis,
) -> None:
    kind, _ = server
    end = dt.datetime.now(UTC).replace(microsecond=0)
    week = simulate_week(end)
    assert len(week.closed) > 50, "the simulation must close positions on most days"
    settings = make_settings(dsn, redis_url)
    service = await ingest(settings, rclient, week, conn)
    try:
        assert service.maintenance is not None
        # One full round after the last event. The Service's own first round may still hold a
        # task's lock (then that task is skipped, not failed): try it again shortly.
        for task in TASKS:
            for _ in range(20):
                result = await service.maintenance.run_task(task, force=True)
                assert result is not None, task
                if result.ran:
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail(f"maintenance task {task} never got its lock")
    finally:
        await service.stop()

    if kind == "timescale":
        # Run the policies now rather than wait for their schedule (the scheduler itself running
        # them is tests/integration/test_timescale_scheduler.py).
        jobs = await timescale_jobs(conn)
        for j in jobs:
            if j["proc"] in {"policy_compression", "policy_refresh_continuous_aggregate"}:
                await conn.execute(f"CALL run_job({int(j['job_id'])})")
        await conn.execute("CALL refresh_continuous_aggregate('hourly_spread_avg', NULL, NULL)")
        await check_timescale_policies(conn, end)

    await check_seed_views(conn, week)
    await check_seed_queries(conn, week)
    await check_table_sizes(conn, kind)
    await check_metrics_keys(rclient, week, end)
    await check_stats(settings, week, kind, conn)


async def check_timescale_policies(conn: asyncpg.Connection, end: dt.datetime) -> None:
    """Hypertables, compression, retention and refresh policies exist with the set intervals."""
    intervals = {
        r["hypertable_name"]: r["time_interval"]
        for r in await conn.fetch(
            "SELECT hypertable_name::text, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = 'public'"
        )
    }
    assert intervals == {
        "spreads": dt.timedelta(days=1),
        "fx_rates": dt.timedelta(days=7),
        "orders": dt.timedelta(days=30),
        "trades": dt.timedelta(days=30),
    }
    by: dict[str, dict[str, Any]] = defaultdict(dict)
    for j in await timescale_jobs(conn):
        by[j["proc"]][j["target"]] = orjson.loads(j["config"])
    # Retention reconciled from the settings (the migration installed the default 90/180/365).
    assert {t: c["drop_after"] for t, c in by["policy_retention"].items()} == {
        t: f"{d} days" for t, d in RETENTION.items()
    }
    assert {t: c["compress_after"] for t, c in by["policy_compression"].items()} == {
        "spreads": "2 days",
        "fx_rates": "2 days",
    }
    refresh = by["policy_refresh_continuous_aggregate"]["hourly_spread_avg"]
    assert (refresh["start_offset"], refresh["end_offset"]) == ("3 days", "01:00:00")
    cagg = await conn.fetchrow(
        "SELECT materialized_only FROM timescaledb_information.continuous_aggregates"
        " WHERE view_name = 'hourly_spread_avg'"
    )
    assert cagg is not None and cagg["materialized_only"] is False  # real-time
    # Compression ran on every chunk whose range ended more than 2 days ago, and on no other.
    chunks = await conn.fetch(
        "SELECT range_end, is_compressed FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'spreads'"
    )
    old = [c for c in chunks if c["range_end"] <= end - dt.timedelta(days=2)]
    assert len(old) >= 4
    assert all(c["is_compressed"] for c in old)
    assert not any(c["is_compressed"] for c in chunks if c not in old)
    stats = await conn.fetchrow(
        "SELECT before_compression_total_bytes AS b, after_compression_total_bytes AS a"
        " FROM hypertable_compression_stats('spreads')"
    )
    assert stats is not None and stats["a"] < stats["b"]


async def check_seed_views(conn: asyncpg.Connection, week: Week) -> None:
    """Both views, queried as dashboards do, in UTC whatever the session's TimeZone."""
    daily = week.daily()
    hourly = week.hourly()
    for session_tz in (None, "Asia/Seoul"):
        if session_tz:
            await conn.execute(f"SET TIME ZONE '{session_tz}'")
        rows = await conn.fetch(SEED_DAILY_PNL_VIEW)
        assert {(r["trade_date"], r["symbol"]) for r in rows} == set(daily)
        for r in rows:
            ps = daily[(r["trade_date"], r["symbol"])]
            what = f"daily_pnl_summary {r['trade_date']} {r['symbol']}"
            assert r["trade_count"] == len(ps), what
            assert r["total_pnl_krw"] == sum((p.pnl_krw for p in ps), Decimal(0)), what
            assert r["max_pnl_krw"] == max(p.pnl_krw for p in ps), what
            assert r["min_pnl_krw"] == min(p.pnl_krw for p in ps), what
            assert_avg(r["avg_pnl_pct"], (p.pnl_pct for p in ps), what)
        rows = await conn.fetch(SEED_HOURLY_SPREAD_VIEW)
        assert {(r["hour"], r["symbol"]) for r in rows} == set(hourly)
        for r in rows:
            evs = hourly[(r["hour"], r["symbol"])]
            what = f"hourly_spread_avg {r['hour']} {r['symbol']}"
            spread = [Decimal(e["spread_pct"]) for e in evs]
            assert_avg(r["avg_spread_pct"], spread, what)
            assert_avg(r["avg_net_spread_pct"], (Decimal(e["net_spread_pct"]) for e in evs), what)
            assert r["max_spread_pct"] == max(spread), what
            assert r["min_spread_pct"] == min(spread), what
    await conn.execute("RESET TIME ZONE")


async def check_seed_queries(conn: asyncpg.Connection, week: Week) -> None:
    """The three ad-hoc queries, run unchanged, in a session with the database's TimeZone (UTC)."""
    assert await conn.fetchval("SHOW timezone") == "UTC"
    btc = sorted((p for p in week.closed if p.symbol == "BTC"), key=lambda p: p.closed)[::-1]
    rows = await conn.fetch(SEED_RECENT_BTC_POSITIONS)
    assert [(r["position_key"], r["pnl_krw"], r["timestamp_close"]) for r in rows] == [
        (p.key, p.pnl_krw, p.closed) for p in btc[:100]
    ]

    by_day: dict[dt.date, list[Position]] = defaultdict(list)
    for p in week.closed:
        by_day[p.closed.astimezone(UTC).date()].append(p)
    rows = await conn.fetch(SEED_DAILY_PNL)
    assert [(r["trade_date"], r["daily_pnl"], r["trade_count"]) for r in rows] == [
        (day, sum((p.pnl_krw for p in by_day[day]), Decimal(0)), len(by_day[day]))
        for day in sorted(by_day, reverse=True)
    ]

    hours: dict[dt.datetime, list[Decimal]] = defaultdict(list)
    for e in week.of("spread"):
        if e["symbol"] == "BTC":
            hours[hour_of(ts(e["timestamp"]))].append(Decimal(e["net_spread_pct"]))
    rows = await conn.fetch(SEED_HOURLY_SPREAD)
    assert [r["hour"] for r in rows] == sorted(hours, reverse=True)[:24]
    for r in rows:
        assert_avg(r["avg_spread"], hours[r["hour"]], f"BTC {r['hour']}")


async def check_table_sizes(conn: asyncpg.Connection, kind: str) -> None:
    """The table-size query runs unchanged and lists every table, largest first."""
    rows = await conn.fetch(SEED_TABLE_SIZES)
    names = [r["tablename"] for r in rows]
    assert set(names) >= {
        "positions",
        "orders",
        "spreads",
        "fx_rates",
        "trades",
        "dead_letters",
        "ingestd_maintenance",
    }
    sizes = [
        await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", f"public.{n}")
        for n in names
    ]
    assert sizes == sorted(sizes, reverse=True)
    assert all(isinstance(r["size"], str) and r["size"] for r in rows)
    if kind == "postgres":
        assert names[0] == "spreads"  # a plain table holds its own rows


async def check_metrics_keys(rclient: redis.Redis, week: Week, end: dt.datetime) -> None:
    """metrics:daily_pnl:{day} for the last 7 days, metrics:hourly_spread:{hour} for 48 hours."""
    first_day = end.date() - dt.timedelta(days=6)
    days = {d for d, _ in week.daily() if d >= first_day}
    keys = {k.decode() for k in rclient.scan_iter(match="metrics:*", count=1000)}
    assert {k for k in keys if k.startswith("metrics:daily_pnl:")} == {
        f"metrics:daily_pnl:{d.isoformat()}" for d in days
    }
    for day in days:
        key = f"metrics:daily_pnl:{day.isoformat()}"
        assert 0 < rclient.ttl(key) <= METRICS_TTL_S
        raw = rclient.get(key)
        assert raw is not None
        doc = orjson.loads(raw)
        positions = [p for (d, _), ps in week.daily().items() if d == day for p in ps]
        assert doc["trade_date"] == day.isoformat()
        assert doc["trade_count"] == len(positions)
        assert Decimal(doc["total_pnl_krw"]) == sum((p.pnl_krw for p in positions), Decimal(0))
        assert isinstance(doc["total_pnl_krw"], str)  # decimals travel as strings
        for symbol, s in doc["symbols"].items():
            ps = week.daily()[(day, symbol)]
            assert s["trade_count"] == len(ps)
            assert Decimal(s["total_pnl_krw"]) == sum((p.pnl_krw for p in ps), Decimal(0))
            assert Decimal(s["max_pnl_krw"]) == max(p.pnl_krw for p in ps)
            assert_avg(Decimal(s["avg_pnl_pct"]), (p.pnl_pct for p in ps), f"{key} {symbol}")

    first_hour = hour_of(end) - dt.timedelta(hours=47)
    hourly = week.hourly()
    hours = {h for h, _ in hourly if h >= first_hour}
    assert {k for k in keys if k.startswith("metrics:hourly_spread:")} == {
        f"metrics:hourly_spread:{h:%Y-%m-%d-%H}" for h in hours
    }
    newest = max(hours)
    key = f"metrics:hourly_spread:{newest:%Y-%m-%d-%H}"
    assert 0 < rclient.ttl(key) <= METRICS_TTL_S
    raw = rclient.get(key)
    assert raw is not None
    doc = orjson.loads(raw)
    assert ts(doc["hour"]) == newest
    assert set(doc["symbols"]) == set(SYMBOLS)
    for symbol, s in doc["symbols"].items():
        evs = hourly[(newest, symbol)]
        assert_avg(Decimal(s["avg_spread_pct"]), (Decimal(e["spread_pct"]) for e in evs), key)
        assert Decimal(s["min_spread_pct"]) == min(Decimal(e["spread_pct"]) for e in evs)


async def check_stats(settings: Settings, week: Week, kind: str, conn: asyncpg.Connection) -> None:
    """``ingestd stats`` shows the tables, chunks, compression, jobs, rounds, keys and INFO."""
    preloaded = "pg_stat_statements" in await conn.fetchval("SHOW shared_preload_libraries")
    if preloaded:  # the TimescaleDB server here preloads it; this database is the test's own
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM spreads WHERE spread_pct > 0")
    done = run_cli(settings, "stats", "--json", "--exact")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["database"]["flavour"] == (
        "TimescaleDB" if kind == "timescale" else "plain PostgreSQL"
    )
    rows = {t["tablename"]: t["rows"] for t in report["tables"]}
    for table, n in week.row_counts.items():
        assert rows[table] == n, table
    aggregates = {a["name"]: a for a in report["aggregates"]}
    assert aggregates["daily_pnl_summary"]["rows"] == len(week.daily())
    assert aggregates["hourly_spread_avg"]["rows"] == len(week.hourly())
    tasks = {m["task"]: m for m in report["maintenance"]}
    assert set(tasks) == {TASK_POLICIES, TASK_RETENTION, TASK_REFRESH, TASK_BACKFILL, TASK_METRICS}
    assert all(m["last_status"] == "success" for m in tasks.values()), tasks
    keys = report["redis"]["metrics_keys"]
    assert any(k.startswith("metrics:daily_pnl:") for k in keys)
    assert any(k.startswith("metrics:hourly_spread:") for k in keys)
    assert "keyspace_hits" in report["redis"]["info_stats"]
    # The JSON keeps every field of the INFO sections the text picks from.
    assert "used_memory" in report["redis"]["info_memory"]
    assert "connected_clients" in report["redis"]["info_clients"]
    assert "redis_version" in report["redis"]["info_server"]
    if kind == "timescale":
        hyper = {h["name"]: h for h in report["hypertables"]}
        assert set(hyper) == {"spreads", "fx_rates", "orders", "trades"}
        assert hyper["spreads"]["compressed_chunks"] >= 4
        assert hyper["spreads"]["compression_ratio"] > 1
        assert hyper["spreads"]["segmentby"] == "symbol"
        assert hyper["fx_rates"]["segmentby"] == "pair"
        assert aggregates["hourly_spread_avg"]["kind"] == "continuous aggregate"
        jobs = {(j["proc_name"], j["target"]): j for j in report["jobs"]}
        assert {t for p, t in jobs if p == "policy_retention"} == set(RETENTION)
        assert {t for p, t in jobs if p == "policy_compression"} == {"spreads", "fx_rates"}
        refresh = jobs[("policy_refresh_continuous_aggregate", "hourly_spread_avg")]
        assert refresh["schedule_interval"] == "00:15:00"
        # Each job's last run as TimescaleDB's scheduler recorded it (CALL run_job is not
        # recorded; the scheduler's own runs are checked in test_timescale_scheduler.py).
        for job in report["jobs"]:
            assert job["scheduled"] is True
            assert job["last_run_status"] in {"Success", "Failed", None}, job
            assert {"last_run_started_at", "next_start", "total_runs", "total_failures"} <= set(job)
        spreads_size = next(t for t in report["tables"] if t["tablename"] == "spreads")
        assert spreads_size["hypertable"] and spreads_size["hypertable_size"]
    else:
        assert report["hypertables"] == [] and report["jobs"] == []
        assert aggregates["hourly_spread_avg"]["kind"] == "materialized view"
    slow = report["slow_queries"]
    assert slow["available"] == preloaded
    if preloaded:
        assert slow["rows"], "pg_stat_statements saw this database's statements"
        means = [q["mean_exec_time_ms"] for q in slow["rows"]]
        assert means == sorted(means, reverse=True)
        assert any("spread_pct > $1" in q["query"] for q in slow["rows"]) or len(means) == 10
    else:
        assert "pg_stat_statements" in slow["hint"] and "CREATE EXTENSION" in slow["hint"]

    text = run_cli(settings, "stats")
    assert text.returncode == 0, text.stderr
    for heading in ("tables", "aggregates", "ingestd maintenance rounds", "redis (INFO"):
        assert heading in text.stdout
    # Fits 100 columns off a terminal, and shows the Redis fields an operator reads.
    assert max(len(line) for line in text.stdout.splitlines()) <= 100, text.stdout
    for field in ("memory used", "memory max", "clients connected", "ops/s", "evicted keys"):
        assert field in text.stdout
    if kind == "timescale":
        assert "hypertables" in text.stdout and "TimescaleDB jobs" in text.stdout
