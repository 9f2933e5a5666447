"""hourly_spread_avg agrees with its defining query over spreads for any history.

On TimescaleDB the continuous aggregate's policy refreshes only the hours from 3 days ago to an
hour ago; spreads written before that window (a CSV import of history, a late batch) were never
materialized, and once the policy had moved the watermark the real-time part no longer showed
them either. Each test compares the aggregate with that query hour by hour, after the
policy itself has run (``run_job``), on TimescaleDB and on plain PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import random
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

import ingestd.daemon.db as ingestd_db
from ingestd.commands.csv_import import run_import
from ingestd.daemon import migrations
from ingestd.daemon.maintenance import TASK_BACKFILL, TASK_REFRESH, Maintenance, advisory_lock_id
from ingestd.daemon.sinks.postgres import PostgresSink
from tests.conftest import PgServer, quick_settings
from tests.samples import SPREAD_HEADER
from tests.scheduler import stop_own_scheduler
from tests.sink_items import item, spread

pytestmark = [pytest.mark.pg]

# The tests on either server run in the conftest's ``dsn``: plain PostgreSQL, then TimescaleDB,
# a freshly migrated database each (the scheduler stopped: the tests run the jobs themselves).
# Their settings are the defaults (a 90-day retention of spreads: a month of history is
# accepted), tuned for quick tests (``quick_settings``).


UTC = dt.UTC
SYMBOLS = ("BTC", "ETH")

# The hourly query over spreads that defines hourly_spread_avg.
SEED_HOURLY = """
SELECT TIME_BUCKET('1 hour', timestamp) AS hour, symbol,
       AVG(spread_pct) AS avg_spread_pct, AVG(net_spread_pct) AS avg_net_spread_pct,
       MAX(spread_pct) AS max_spread_pct, MIN(spread_pct) AS min_spread_pct
FROM spreads
GROUP BY TIME_BUCKET('1 hour', timestamp), symbol
"""
AGGREGATE = """
SELECT hour, symbol, avg_spread_pct, avg_net_spread_pct, max_spread_pct, min_spread_pct
FROM hourly_spread_avg
"""

Row = tuple[Decimal, Decimal, Decimal, Decimal]


async def hourly(conn: asyncpg.Connection, sql: str) -> dict[tuple[dt.datetime, str], Row]:
    """(hour, symbol) -> the four aggregates."""
    return {
        (r["hour"], r["symbol"]): (
            r["avg_spread_pct"],
            r["avg_net_spread_pct"],
            r["max_spread_pct"],
            r["min_spread_pct"],
        )
        for r in await conn.fetch(sql)
    }


async def assert_agree(conn: asyncpg.Connection) -> int:
    """The aggregate equals the defining query, hour by hour; returns the number of hours."""
    want = await hourly(conn, SEED_HOURLY)
    got = await hourly(conn, AGGREGATE)
    missing = sorted(k for k in want if k not in got)
    assert not missing, f"{len(missing)} hours missing from hourly_spread_avg, first {missing[:3]}"
    assert got.keys() == want.keys()
    differing = [k for k in want if got[k] != want[k]]
    assert not differing, f"hours that differ: {differing[:3]}"
    return len(want)


async def run_refresh_policy(conn: asyncpg.Connection) -> None:
    """TimescaleDB: run the continuous aggregate's own refresh policy now (as the scheduler
    would); plain PostgreSQL: nothing (ingestd refreshes the view)."""
    job = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_refresh_continuous_aggregate' "
        "AND hypertable_name = 'hourly_spread_avg'"
    )
    assert job is not None
    await conn.execute(f"CALL run_job({int(job)})")


async def is_timescale(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        )
    )


def spreads_csv(path: Path, start: dt.datetime, hours: int, per_hour: int, seed: int) -> int:
    """``spreads.csv`` with ``per_hour`` spreads per symbol in each of ``hours`` hours."""
    rnd = random.Random(seed)
    lines = [SPREAD_HEADER]
    for h in range(hours):
        for symbol in SYMBOLS:
            for n in range(per_hour):
                moment = start + dt.timedelta(hours=h, seconds=rnd.randrange(3600))
                pct = Decimal(rnd.randrange(-5000, 50000)) / 10000
                net = pct - Decimal("0.2000")
                stamp = moment.isoformat().replace("+00:00", "Z")
                lines.append(
                    f"{symbol},140123456.{n % 100:02d},98012.12345678,135800000.55,"
                    f"{pct},{net},{'true' if pct > 3 else 'false'},{stamp}"
                )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    settings = quick_settings(dsn, "redis://127.0.0.1:1/0")
    p = await ingestd_db.create_pool(settings.storage.postgres)
    yield p
    await p.close()


@pytest.fixture
async def maintenance(pool: asyncpg.Pool, dsn: str, redis_url: str) -> AsyncIterator[Maintenance]:
    """ingestd's maintenance on the test database (Redis for its metrics keys)."""
    settings = quick_settings(dsn, redis_url)
    client = aioredis.Redis.from_url(redis_url)
    yield Maintenance(pool, client, settings=settings.maintenance, retention=settings.retention)
    await client.aclose()


async def test_an_imported_month_agrees_hour_by_hour(
    dsn: str,
    conn: asyncpg.Connection,
    maintenance: Maintenance,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """import-csv of 30 days of spreads, then the policy: every hour of the month is there."""
    settings = quick_settings(dsn, redis_url)
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    timescale = await is_timescale(conn)
    # Live data first, and the policy has run: the watermark is current, as in production.
    (tmp_path / "live").mkdir()
    spreads_csv(tmp_path / "live" / "spreads.csv", now - dt.timedelta(hours=5), 3, 4, seed=1)
    code = await run_import(settings, tmp_path / "live", progress_mode="off", out=io.StringIO())
    assert code == 0
    if timescale:
        await run_refresh_policy(conn)
    # Then a month of history (30 days, ending before the policy's 3-day window and inside it).
    (tmp_path / "history").mkdir()
    rows = spreads_csv(
        tmp_path / "history" / "spreads.csv", now - dt.timedelta(days=30), 30 * 24 - 6, 3, seed=2
    )
    err = io.StringIO()
    code = await run_import(
        settings,
        tmp_path / "history",
        id_prefix="history-",
        progress_mode="off",
        out=io.StringIO(),
        err=err,
    )
    assert code == 0, err.getvalue()
    assert await conn.fetchval("SELECT count(*) FROM spreads") == rows + 3 * 4 * len(SYMBOLS)
    if timescale:
        assert "refreshed hourly_spread_avg over" in err.getvalue()
        await run_refresh_policy(conn)  # what the scheduler does next: must not lose any hour
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
    else:
        assert await maintenance.run_task(TASK_REFRESH, force=True)
    hours = await assert_agree(conn)
    assert hours >= (30 * 24 - 6) * len(SYMBOLS)


async def test_late_spreads_through_the_sink_land_in_old_hours(
    dsn: str,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    maintenance: Maintenance,
) -> None:
    """A late batch five days back - into a stored hour and into a new one - reaches the
    aggregate through the maintenance round; a live batch queues nothing."""
    timescale = await is_timescale(conn)
    sink = PostgresSink(pool)
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old = now - dt.timedelta(days=5)

    def at(moment: dt.datetime) -> str:
        return moment.isoformat().replace("+00:00", "Z")

    first = [
        item(spread(f"first-{n}", ts=at(old + dt.timedelta(minutes=n)), spread_pct="1.0000"))
        for n in range(10)
    ] + [item(spread("live-0", ts=at(now - dt.timedelta(hours=2))))]
    await sink.write(first)
    await maintenance.run_all(force=True)
    if timescale:
        await run_refresh_policy(conn)
    await assert_agree(conn)

    # A live batch: within the policy's window, nothing is queued. A minute ago by the clock, not
    # five minutes before the hour: from :55 on that was older than the window's end (an hour
    # ago) and was queued, a failure by time of day.
    live = dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    outcome = await sink.write([item(spread("live-1", ts=at(live)))])
    assert outcome.backfill_queued is None
    if timescale:
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0

    # Late: a higher spread in the stored hour, and a new hour a day earlier.
    late = [
        item(spread("late-0", ts=at(old + dt.timedelta(minutes=30)), spread_pct="9.0000")),
        item(spread("late-1", ts=at(old - dt.timedelta(days=1)), symbol="ETH")),
    ]
    outcome = await sink.write(late)
    if timescale:
        assert outcome.backfill_queued is not None
        # Queued in the batch's own transaction: committed with the rows.
        queued = await conn.fetch("SELECT range_start, range_end FROM ingestd_aggregate_backfill")
        assert [(r["range_start"], r["range_end"]) for r in queued] == [
            (old - dt.timedelta(days=1), old + dt.timedelta(hours=1))
        ]
    await maintenance.run_all(force=True)
    if timescale:
        await run_refresh_policy(conn)
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
        status = await conn.fetchrow(
            "SELECT last_status, last_detail FROM ingestd_maintenance WHERE task = $1",
            TASK_BACKFILL,
        )
        assert status is not None and status["last_status"] == "success"
    await assert_agree(conn)
    stored = await hourly(conn, AGGREGATE)
    assert stored[(old, "BTC")][2] == Decimal("9.0000")
    assert (old - dt.timedelta(days=1), "ETH") in stored


@pytest.fixture
async def timescale_dsn(timescale_server: PgServer) -> AsyncIterator[str]:
    """An empty TimescaleDB database (migrated by the test) whose jobs run only when a test asks
    (its scheduler stopped: its own run of ingestd_backfill_job took the drain's lock while the
    test's run_job returned having drained nothing)."""
    dsn = await timescale_server.create_empty("ingestd_bf")
    conn = await asyncpg.connect(dsn)
    try:
        await stop_own_scheduler(conn)
    finally:
        await conn.close()
    yield dsn
    await timescale_server.drop(dsn)


async def insert_spreads(
    conn: asyncpg.Connection, first: dt.datetime, hours: int, symbol: str = "BTC"
) -> None:
    """Four spreads in each of ``hours`` hours from ``first`` (as any earlier writer did)."""
    await conn.execute(
        "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
        " spread_pct, net_spread_pct, timestamp)"
        " SELECT 'pre-' || $2 || '-' || g, $2, 1, 1, 1, (g % 97) / 10.0, (g % 89) / 10.0,"
        " $1::timestamptz + make_interval(mins => g * 15)"
        " FROM generate_series(0, $3 * 4 - 1) AS g",
        first,
        symbol,
        hours,
    )


@pytest.mark.timescale
async def test_migration_0009_queues_the_history_the_policy_never_materialized(
    timescale_dsn: str, redis_url: str
) -> None:
    """A database of the earlier layer, whose policy has moved the watermark past months of
    history: after migrating, one maintenance round makes the aggregate agree."""
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    every = migrations.load_migrations()
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await migrations.migrate(conn, [m for m in every if m.version < 9])
        await insert_spreads(conn, now - dt.timedelta(days=40), 40 * 24 - 2)
        await run_refresh_policy(conn)
        with pytest.raises(AssertionError, match="hours missing"):
            await assert_agree(conn)  # the defect this migration repairs
        await migrations.migrate(conn, every)
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 1
        settings = quick_settings(timescale_dsn, redis_url)
        pool = await ingestd_db.create_pool(settings.storage.postgres)
        try:
            m = Maintenance(pool, None, settings=settings.maintenance, retention=settings.retention)
            result = await m.run_task(TASK_BACKFILL, force=True)
        finally:
            await pool.close()
        assert result is not None and result.ran, result
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
        assert await assert_agree(conn) == 40 * 24 - 2
    finally:
        await conn.close()


@pytest.mark.timescale
async def test_a_failed_refresh_keeps_the_hours_queued_and_one_replica_drains_at_a_time(
    timescale_dsn: str, redis_url: str
) -> None:
    """The queue survives a refresh that fails (here: it cannot get its lock before the
    statement timeout); while one replica drains, another skips the round."""
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    conn = await asyncpg.connect(timescale_dsn)
    blocker = await asyncpg.connect(timescale_dsn)
    settings = quick_settings(timescale_dsn, redis_url)
    quick = dataclasses.replace(settings.maintenance, statement_timeout_s=1.0)
    pool = await ingestd_db.create_pool(settings.storage.postgres)
    try:
        await migrations.migrate(conn)
        await run_refresh_policy(conn)
        old = now - dt.timedelta(days=10)
        sink = PostgresSink(pool)
        stamp = old.isoformat().replace("+00:00", "Z")
        await sink.write([item(spread("late-a", ts=stamp))])
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 1
        first = Maintenance(pool, None, settings=quick, retention=settings.retention)
        second = Maintenance(pool, None, settings=quick, retention=settings.retention)

        # Another session holds the materialization table: the refresh times out.
        mat = await conn.fetchval(
            "SELECT format('%I.%I', materialization_hypertable_schema,"
            " materialization_hypertable_name) FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'hourly_spread_avg'"
        )
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(f"LOCK TABLE {mat} IN ACCESS EXCLUSIVE MODE")
        assert await first.run_task(TASK_BACKFILL, force=True) is None  # failed, recorded
        assert first.failures == 1
        await tx.rollback()
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 1
        row = await conn.fetchrow(
            "SELECT last_status, failures FROM ingestd_maintenance WHERE task = $1", TASK_BACKFILL
        )
        assert row is not None and (row["last_status"], row["failures"]) == ("failed", 1)

        # A replica that holds the backfill lock: the other one skips its round.
        holder = await asyncpg.connect(timescale_dsn)
        try:
            assert await holder.fetchval(
                "SELECT pg_try_advisory_lock($1)", advisory_lock_id(TASK_BACKFILL)
            )
            skipped = await second.run_task(TASK_BACKFILL, force=True)
            assert skipped is not None and not skipped.ran
        finally:
            await holder.close()  # its session lock goes with it
        done = await second.run_task(TASK_BACKFILL, force=True)
        assert done is not None and done.ran
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM hourly_spread_avg WHERE hour = $1", old) == 1
        )
    finally:
        await pool.close()
        await blocker.close()
        await conn.close()


@pytest.mark.timescale
async def test_the_owners_job_drains_the_queue_where_ingestd_runs_as_the_writer(
    timescale_dsn: str,
) -> None:
    """TimescaleDB's scheduler runs ingestd_backfill_job as the owner: the queue is drained even
    where no ingestd runs as the owner (here run once with run_job, as the scheduler would)."""
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await migrations.migrate(conn)
        await insert_spreads(conn, now - dt.timedelta(hours=30), 28)
        await run_refresh_policy(conn)
        # Two overlapping late ranges and one apart, as writers' batches queue them.
        for first, hours, symbol in ((20, 30, "BTC"), (19, 10, "ETH"), (60, 5, "XRP")):
            start = now - dt.timedelta(days=first)
            await insert_spreads(conn, start, hours, symbol)
            assert await conn.fetchval(
                "SELECT ingestd_queue_backfill($1, $2)",
                start,
                start + dt.timedelta(hours=hours, minutes=-1),
            )
        with pytest.raises(AssertionError, match="hours missing"):
            await assert_agree(conn)
        job = await conn.fetchval(
            "SELECT job_id FROM timescaledb_information.jobs"
            " WHERE proc_name = 'ingestd_backfill_job'"
        )
        assert job is not None
        await conn.execute(f"CALL run_job({int(job)})")
        assert await conn.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
        assert await assert_agree(conn) == 28 + 30 + 10 + 5
    finally:
        await conn.close()
