"""Maintenance rounds against real PostgreSQL/TimescaleDB and Redis: retention, refreshes, keys,
one replica per round, failures retried, least privilege, and dedup into compressed chunks."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from ingestd.clients import redis_async
from ingestd.commands import roles as ingestd_roles
from ingestd.daemon.batching import Item
from ingestd.daemon.maintenance import (
    TASK_METRICS,
    TASK_POLICIES,
    TASK_REFRESH,
    TASK_RETENTION,
    TASKS,
    Maintenance,
)
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import MaintenanceSettings, RetentionSettings
from tests.commands import operator_env, run_ingestd
from tests.conftest import PLAIN_ONLY, TIMESCALE_ONLY, PgServer, ingestd_pool, with_db
from tests.sink_items import item, pos_close, pos_open, spread

pytestmark = [pytest.mark.pg, pytest.mark.redis]

UTC = dt.UTC
FUNCTIONS = (
    "ingestd_refresh_aggregates()",
    "ingestd_refresh_aggregate(text)",
    "ingestd_delete_expired(text, interval, integer)",
    "ingestd_set_retention(text, interval)",
    "ingestd_queue_backfill(timestamp with time zone, timestamp with time zone)",
    "ingestd_backfill_cutoff()",
)
# Those that run with their owner's rights: the refreshes, and the writer's way into the
# backfill queue (0009).
DEFINER_FUNCTIONS = (
    "ingestd_refresh_aggregates()",
    "ingestd_refresh_aggregate(text)",
    "ingestd_queue_backfill(timestamp with time zone, timestamp with time zone)",
)


def maintenance(
    pool: asyncpg.Pool, redis_client: Any, *, prefix: str = "", **retention: int
) -> Maintenance:
    """A Maintenance with the given retention (days; batch via delete_batch_rows)."""
    return Maintenance(
        pool,
        redis_client,
        settings=MaintenanceSettings(),
        retention=RetentionSettings(**retention),
        key_prefix=prefix,
    )


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Any]:
    """An asyncio Redis client as the Service builds it."""
    client = redis_async(redis_url, socket_timeout_s=2)
    yield client
    await client.aclose()


async def task_row(conn: asyncpg.Connection, task: str) -> asyncpg.Record:
    """The ingestd_maintenance row of one task."""
    row = await conn.fetchrow("SELECT * FROM ingestd_maintenance WHERE task = $1", task)
    assert row is not None, task
    return row


def iso(moment: dt.datetime) -> str:
    """RFC 3339 UTC."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- retention -----------------------------------------------------------------------------------


@PLAIN_ONLY
async def test_plain_retention_deletes_expired_rows_in_bounded_batches(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool, aredis: Any
) -> None:
    now = dt.datetime.now(UTC)
    old = [
        item(spread(f"old{i}", ts=iso(now - dt.timedelta(days=31, minutes=i)))) for i in range(23)
    ]
    new = [
        item(spread(f"new{i}", ts=iso(now - dt.timedelta(days=29, minutes=i)))) for i in range(7)
    ]
    await PostgresSink(pool).write(old + new)
    m = maintenance(pool, aredis, spreads_days=30, delete_batch_rows=5)
    result = await m.run_task(TASK_RETENTION, force=True)
    assert result is not None and result.ran
    assert "spreads: 23 rows deleted" in result.detail
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 7
    assert await conn.fetchval("SELECT count(*) FROM spreads WHERE event_id LIKE 'new%'") == 7
    row = await task_row(conn, TASK_RETENTION)
    assert row["last_status"] == "success" and row["runs"] == 1


@PLAIN_ONLY
async def test_delete_function_is_bounded_and_refuses_other_tables(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    now = dt.datetime.now(UTC)
    batch = [
        item(spread(f"o{i}", ts=iso(now - dt.timedelta(days=100, seconds=i)))) for i in range(12)
    ]
    await PostgresSink(pool).write(batch)
    deleted = await conn.fetchval("SELECT ingestd_delete_expired('spreads', '90 days', 5)")
    assert deleted == 5
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 7
    for bad in ("positions", "dead_letters", "spreads; DROP TABLE positions"):
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.fetchval("SELECT ingestd_delete_expired($1, '1 day', 5)", bad)
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await conn.fetchval("SELECT ingestd_delete_expired('spreads', '0 days', 5)")
    assert await conn.fetchval("SELECT to_regclass('positions') IS NOT NULL")


@TIMESCALE_ONLY
async def test_timescale_retention_policies_follow_the_settings(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool, aredis: Any
) -> None:
    async def policies() -> dict[str, str]:
        rows = await conn.fetch(
            "SELECT hypertable_name::text AS t, config->>'drop_after' AS keep"
            " FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
        )
        return {r["t"]: r["keep"] for r in rows}

    assert await policies() == {"spreads": "90 days", "fx_rates": "180 days", "orders": "365 days"}
    m = maintenance(pool, aredis)  # the default retention: nothing to change
    result = await m.run_task(TASK_POLICIES, force=True)
    assert result is not None and result.detail.count("unchanged") == 3
    m = maintenance(pool, aredis, spreads_days=14, fx_rates_days=0, orders_days=365)
    result = await m.run_task(TASK_POLICIES, force=True)
    assert result is not None
    assert "spreads (14 days): changed" in result.detail
    assert "fx_rates (kept forever): removed" in result.detail
    assert await policies() == {"spreads": "14 days", "orders": "365 days"}
    # The delete path is refused on a hypertable: drop_chunks does retention there.
    with pytest.raises(asyncpg.WrongObjectTypeError):
        await conn.fetchval("SELECT ingestd_delete_expired('spreads', '1 day', 5)")
    result = await m.run_task(TASK_RETENTION, force=True)
    assert result is not None and "TimescaleDB policies" in result.detail
    # Retention actually drops old chunks with the reconciled interval.
    now = dt.datetime.now(UTC)
    await PostgresSink(pool).write(
        [item(spread("old", ts=iso(now - dt.timedelta(days=20)))), item(spread("new", ts=iso(now)))]
    )
    job = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_retention' AND hypertable_name = 'spreads'"
    )
    await conn.execute(f"CALL run_job({int(job)})")
    assert [r["event_id"] for r in await conn.fetch("SELECT event_id FROM spreads")] == ["new"]


# --- refresh and metrics keys ------------------------------------------------------------------


def closed_position(key: str, symbol: str, pnl: str, pct: str, closed: str) -> list[Item]:
    """A position opened and closed at ``closed``, as two items."""
    close = pos_close(key, symbol)
    close.update(pnl_krw=pnl, pnl_pct=pct, timestamp_close=closed)
    return [item(pos_open(key, symbol)), item(close)]


async def test_refresh_and_metrics_keys_respect_the_key_prefix(
    server: tuple[str, PgServer],
    dsn: str,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    aredis: Any,
    rclient: redis.Redis,
) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    today, yesterday = now.date(), now.date() - dt.timedelta(days=1)
    # 23:30 on the day before in UTC is the next day in Seoul: the UTC day must win.
    late_yesterday = dt.datetime.combine(yesterday, dt.time(23, 30), UTC)
    batch = [
        *closed_position("p1", "BTC", "1000.50", "1.2500", iso(late_yesterday)),
        *closed_position("p2", "BTC", "-200.25", "-0.5000", iso(late_yesterday)),
        *closed_position("p3", "ETH", "10.00", "0.1000", iso(now)),
        item(spread("s1", "BTC", iso(now), spread_pct="3.0000", net_spread_pct="2.8000")),
        item(spread("s2", "BTC", iso(now), spread_pct="3.0001", net_spread_pct="2.8001")),
    ]
    await PostgresSink(pool).write(batch)
    m = maintenance(pool, aredis, prefix="t1:")
    refreshed = await m.run_task(TASK_REFRESH, force=True)
    assert refreshed is not None and "daily_pnl_summary" in refreshed.detail
    result = await m.run_task(TASK_METRICS, force=True)
    assert result is not None and result.ran

    assert rclient.get("metrics:daily_pnl:" + yesterday.isoformat()) is None  # prefix respected
    raw = rclient.get(f"t1:metrics:daily_pnl:{yesterday.isoformat()}")
    assert raw is not None
    doc = orjson.loads(raw)
    assert doc["trade_count"] == 2
    assert doc["total_pnl_krw"] == "800.25"
    assert doc["max_pnl_krw"] == "1000.50" and doc["min_pnl_krw"] == "-200.25"
    assert Decimal(doc["symbols"]["BTC"]["avg_pnl_pct"]) == Decimal("0.375")
    assert set(doc["symbols"]) == {"BTC"}
    assert 0 < rclient.ttl(f"t1:metrics:daily_pnl:{yesterday.isoformat()}") <= 86_400
    today_doc = orjson.loads(rclient.get(f"t1:metrics:daily_pnl:{today.isoformat()}") or b"{}")
    assert today_doc["symbols"]["ETH"]["total_pnl_krw"] == "10.00"
    hour_key = f"t1:metrics:hourly_spread:{now:%Y-%m-%d-%H}"
    hour_doc = orjson.loads(rclient.get(hour_key) or b"{}")
    assert Decimal(hour_doc["symbols"]["BTC"]["avg_spread_pct"]) == Decimal("3.00005")
    assert hour_doc["symbols"]["BTC"]["max_spread_pct"] == "3.0001"
    assert 0 < rclient.ttl(hour_key) <= 86_400


# --- several replicas, failures ----------------------------------------------------------------


@PLAIN_ONLY
async def test_only_one_replica_does_each_round(
    dsn: str, conn: asyncpg.Connection, aredis: Any
) -> None:
    pools = [await ingestd_pool(dsn) for _ in range(3)]
    try:
        replicas = [maintenance(p, aredis) for p in pools]
        results = await asyncio.gather(*(r.run_task(TASK_REFRESH) for r in replicas))
        assert sorted(r is not None and r.ran for r in results) == [False, False, True]
        # Within the interval nobody runs it again; forced, one does.
        again = await asyncio.gather(*(r.run_task(TASK_REFRESH) for r in replicas))
        assert not any(r is not None and r.ran for r in again)
        assert (await task_row(conn, TASK_REFRESH))["runs"] == 1
    finally:
        for p in pools:
            await p.close()


@PLAIN_ONLY
async def test_a_failed_round_is_logged_recorded_and_retried(
    dsn: str,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    aredis: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await PostgresSink(pool).write(
        closed_position("p1", "BTC", "5.00", "0.0100", iso(dt.datetime.now(UTC)))
    )
    await maintenance(pool, aredis).run_task(TASK_REFRESH, force=True)
    dead_redis = redis_async("redis://127.0.0.1:1/0", socket_timeout_s=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="ingestd.daemon.maintenance"):
            assert await maintenance(pool, dead_redis).run_task(TASK_METRICS) is None
        await asyncio.sleep(0)
    finally:
        await dead_redis.aclose()
    assert any(getattr(r, "action", None) == "maintenance_failed" for r in caplog.records)
    row = await task_row(conn, TASK_METRICS)
    assert row["last_status"] == "failed" and row["failures"] == 1
    assert "ConnectionError" in row["last_error"]
    # Next round (another replica, or this one once Redis is back) succeeds.
    result = await maintenance(pool, aredis).run_task(TASK_METRICS, force=True)
    assert result is not None and result.ran
    row = await task_row(conn, TASK_METRICS)
    assert row["last_status"] == "success" and row["last_error"] is None


@PLAIN_ONLY
async def test_a_round_without_a_database_fails_cleanly(dsn: str, aredis: Any) -> None:
    p = await ingestd_pool(dsn)
    m = maintenance(p, aredis)
    await p.close()
    # Every task fails (and so does recording the failure); none raises, all are counted.
    assert await m.run_all() == [None] * len(TASKS)
    assert m.failures == len(TASKS)


# --- least privilege ----------------------------------------------------------------------------


async def test_a_dml_only_role_refreshes_but_cannot_run_retention_even_if_granted(
    server: tuple[str, PgServer], dsn: str, conn: asyncpg.Connection, aredis: Any
) -> None:
    kind, srv = server
    role = f"ingestd_writer_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    if kind == "timescale":  # the owner's own policy would drop the old row mid-test
        await conn.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_retention'"
        )
    old = dt.datetime.now(UTC) - dt.timedelta(days=400)
    await conn.execute(
        "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
        " spread_pct, net_spread_pct, timestamp) VALUES ('old', 'BTC', 1, 1, 1, 1, 1, $1)",
        old,
    )
    try:
        db = dsn.rsplit("/", 1)[1]
        await conn.execute(f"GRANT CONNECT ON DATABASE {db} TO {role}")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
        writer_dsn = with_db(srv.admin_dsn, db, user=role)
        writer = await asyncpg.connect(writer_dsn)
        try:
            # Not the owner: REFRESH is refused directly, and the functions until granted.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute("REFRESH MATERIALIZED VIEW daily_pnl_summary")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.fetchval("SELECT ingestd_refresh_aggregate('daily_pnl_summary')")
        finally:
            await writer.close()
        # A careless grant of every function: the retention ones run with the caller's rights
        # (migration 0007), so a role that may not DELETE or own the table still cannot.
        for fn in FUNCTIONS:
            await conn.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {role}")
        writer = await asyncpg.connect(writer_dsn)
        try:
            if kind == "postgres":
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await writer.fetchval("SELECT ingestd_delete_expired('spreads', '1 day', 10)")
            else:
                with pytest.raises(asyncpg.PostgresError):
                    await writer.fetchval("SELECT ingestd_set_retention('spreads', '1 day')")
        finally:
            await writer.close()
        p = await ingestd_pool(writer_dsn)
        try:
            m = maintenance(p, aredis, spreads_days=45)
            results = {r.task: r for r in await m.run_all() if r is not None}
            assert m.failures == 0
            assert results[TASK_REFRESH].ran and results[TASK_METRICS].ran
            for task in (TASK_POLICIES, TASK_RETENTION):
                assert not results[task].ran and results[task].detail == "not the owner"
        finally:
            await p.close()
        assert await conn.fetchval("SELECT count(*) FROM spreads") == 1
        if kind == "timescale":
            keep = await conn.fetchval(
                "SELECT config->>'drop_after' FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_retention' AND hypertable_name = 'spreads'"
            )
            assert keep == "90 days"
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_functions_run_with_a_fixed_search_path(conn: asyncpg.Connection, dsn: str) -> None:
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS fn, p.prosecdef, p.proconfig"
        # Functions only: the TimescaleDB job's procedure (0009) may not have a SET clause (it
        # commits); it names its schema in its body instead.
        " FROM pg_proc p WHERE p.proname LIKE 'ingestd\\_%' AND p.prokind = 'f'"
    )
    assert {r["fn"] for r in rows} == {f.replace(", ", ",") for f in FUNCTIONS}
    definers = {f.replace(", ", ",") for f in DEFINER_FUNCTIONS}
    for r in rows:
        # Retention runs as its caller (0007).
        assert r["prosecdef"] == (r["fn"] in definers), r["fn"]
        assert r["proconfig"] == ["search_path=pg_catalog, public, pg_temp"], r["fn"]


# --- compressed chunks and the dedup path ------------------------------------------------------


@TIMESCALE_ONLY
async def test_redelivery_into_a_compressed_chunk_is_deduplicated_and_late_data_lands(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    day = dt.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    moment = day - dt.timedelta(days=5, hours=-3)
    first = [item(spread(f"c{i}", "BTC", iso(moment + dt.timedelta(seconds=i)))) for i in range(50)]
    sink = PostgresSink(pool)
    await sink.write(first)
    compressed = await conn.fetch(
        "SELECT compress_chunk(c)"
        " FROM show_chunks('spreads', older_than => now() - interval '2 days') c"
    )
    assert len(compressed) == 1
    assert await conn.fetchval(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'spreads'"
    )
    # The whole batch again (COPY meets the unique index inside the compressed chunk, then the
    # staging merge's ON CONFLICT DO NOTHING), plus a late event for the same chunk.
    late = item(spread("late-1", "ETH", iso(moment + dt.timedelta(minutes=30))))
    outcome = await sink.write([*first, late])
    assert outcome.inserted == {"spreads": 1}
    assert outcome.duplicates == 50
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 51
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM spreads") == 51
    # A redelivery of the late event alone (direct COPY path first) lands zero times again.
    again = await sink.write(
        [item(spread("late-1", "ETH", iso(moment + dt.timedelta(minutes=30))))]
    )
    assert again.inserted == {"spreads": 0} and again.duplicates == 1
    assert await conn.fetchval("SELECT count(*) FROM spreads WHERE event_id = 'late-1'") == 1


async def test_refresh_one_aggregate_refuses_any_other_name(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT ingestd_refresh_aggregate('daily_pnl_summary')") is True
    with pytest.raises(asyncpg.InvalidParameterValueError, match="not one of ingestd"):
        await db.fetchval("SELECT ingestd_refresh_aggregate('positions; DROP TABLE spreads')")


@PLAIN_ONLY
async def test_a_stuck_hourly_refresh_does_not_roll_back_the_daily_one(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool, aredis: Any
) -> None:
    await PostgresSink(pool).write(
        closed_position("p1", "BTC", "5.00", "0.0100", iso(dt.datetime.now(UTC)))
    )
    m = Maintenance(
        pool,
        aredis,
        settings=MaintenanceSettings(statement_timeout_s=1.0),
        retention=RetentionSettings(),
    )
    # spreads is locked: hourly_spread_avg cannot be recomputed and its refresh times out.
    async with conn.transaction():
        await conn.execute("LOCK TABLE spreads IN ACCESS EXCLUSIVE MODE")
        assert await m.run_task(TASK_REFRESH, force=True) is None  # the round failed...
    row = await task_row(conn, TASK_REFRESH)
    assert row["last_status"] == "failed"
    # ...but the daily summary, refreshed first in a transaction of its own, is there.
    assert await conn.fetchval("SELECT sum(trade_count) FROM daily_pnl_summary") == 1


@TIMESCALE_ONLY
async def test_migrate_as_the_owner_sets_the_configured_retention_policies(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text("retention:\n  spreads_days: 30\n  orders_days: 0\n", encoding="utf-8")
    env = operator_env(without_pg=True, DATABASE_URL=dsn, INGESTD_CONFIG=str(config))
    done = run_ingestd(env, "migrate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spreads (30 days): changed" in done.stdout
    assert "orders (kept forever): removed" in done.stdout
    policies = {
        r["hypertable_name"]: r["keep"]
        for r in await conn.fetch(
            "SELECT hypertable_name, config->>'drop_after' AS keep"
            " FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
        )
    }
    assert policies == {"spreads": "30 days", "fx_rates": "180 days"}


# --- retention of the trading-safety history ----------------------------------------------------


async def test_retention_trims_the_trading_safety_history_but_never_what_is_open(
    dsn: str, conn: asyncpg.Connection, pool: asyncpg.Pool, aredis: Any
) -> None:
    """Cleared alerts, closed gaps, the seq ranges of quiet sessions and old liveness intervals
    past their periods go (on both flavours); open alerts and gaps, the ranges of a session with an
    open gap or recent seqs, and recent rows stay."""
    await conn.execute(
        """
        INSERT INTO alerts (kind, producer, key, details, raised_at, cleared_at) VALUES
          ('half_hedge', 'live', 'cleared_long_ago', '{}', now() - interval '100 days',
           now() - interval '99 days'),
          ('half_hedge', 'live', 'cleared_lately', '{}', now() - interval '100 days',
           now() - interval '5 days'),
          ('half_hedge', 'live', 'open_long', '{}', now() - interval '100 days', NULL)
        """
    )
    await conn.execute(
        """
        INSERT INTO producer_gaps (producer, session, first_missing, last_missing, detected_at,
                                   closed_at) VALUES
          ('collector', 's-old', 5, 6, now() - interval '100 days', now() - interval '99 days'),
          ('collector', 's-open', 5, 6, now() - interval '100 days', NULL),
          ('collector', 's-lately', 5, 6, now() - interval '100 days', now() - interval '1 day')
        """
    )
    await conn.execute(
        """
        INSERT INTO producer_seq_ranges (producer, session, first_seq, last_seq, recorded_at,
                                         last_recorded_at) VALUES
          ('collector', 's-quiet', 0, 10, now() - interval '100 days', now() - interval '90 days'),
          ('collector', 's-quiet', 12, 20, now() - interval '95 days', now() - interval '95 days'),
          ('collector', 's-legacy', 0, 10, now() - interval '100 days', NULL),
          ('collector', 's-running', 0, 99, now() - interval '100 days', now()),
          ('collector', 's-open', 0, 4, now() - interval '100 days', now() - interval '100 days'),
          ('collector', 's-open', 7, 9, now() - interval '100 days', now() - interval '100 days')
        """
    )
    await conn.execute(
        """
        INSERT INTO heartbeat_history (component, first_seen, last_seen, beats) VALUES
          ('collector', now() - interval '100 days', now() - interval '95 days', 10),
          ('collector', now() - interval '95 days', now() - interval '10 days', 10),
          ('paper', now() - interval '1 hour', now(), 10)
        """
    )
    m = maintenance(
        pool,
        aredis,
        alerts_days=30,
        producer_gaps_days=30,
        producer_seq_ranges_days=30,
        heartbeat_history_days=30,
        delete_batch_rows=1,
    )
    result = await m.run_task(TASK_RETENTION, force=True)
    assert result is not None and result.ran, result
    assert "alerts: 1 rows deleted" in result.detail
    assert "producer_gaps: 1 rows deleted" in result.detail
    assert "producer_seq_ranges: 3 rows deleted" in result.detail
    assert "heartbeat_history: 1 rows deleted" in result.detail
    keys = {r["key"] for r in await conn.fetch("SELECT key FROM alerts")}
    assert keys == {"cleared_lately", "open_long"}
    sessions = {r["session"] for r in await conn.fetch("SELECT session FROM producer_gaps")}
    assert sessions == {"s-open", "s-lately"}
    ranges = await conn.fetch("SELECT session, first_seq FROM producer_seq_ranges ORDER BY 1, 2")
    assert [tuple(r) for r in ranges] == [("s-open", 0), ("s-open", 7), ("s-running", 0)]
    beats = await conn.fetch("SELECT component, last_seen FROM heartbeat_history ORDER BY 2")
    assert [r["component"] for r in beats] == ["collector", "paper"]

    # 0 keeps forever: nothing more goes, whatever its age.
    await conn.execute("UPDATE alerts SET cleared_at = now() - interval '50 days'")
    kept = maintenance(
        pool,
        aredis,
        alerts_days=0,
        producer_gaps_days=0,
        producer_seq_ranges_days=0,
        heartbeat_history_days=0,
    )
    result = await kept.run_task(TASK_RETENTION, force=True)
    assert result is not None and result.ran
    assert await conn.fetchval("SELECT count(*) FROM alerts") == 2
    assert await conn.fetchval("SELECT count(*) FROM heartbeat_history") == 2


@PLAIN_ONLY
async def test_the_writer_role_cannot_trim_the_trading_safety_history(
    server: tuple[str, PgServer], dsn: str, conn: asyncpg.Connection, aredis: Any
) -> None:
    """With sql/roles.sql's grants the writer may not delete alerts, gaps or liveness intervals,
    and its maintenance leaves retention to the owner."""
    _, srv = server
    role = f"ingestd_w_{uuid.uuid4().hex[:8]}"
    await conn.execute(ingestd_roles.roles_sql())
    await conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE ingestd_writer")
    try:
        await conn.execute(
            "INSERT INTO alerts (kind, producer, key, details, raised_at, cleared_at) VALUES"
            " ('half_hedge', 'live', 'k', '{}', now() - interval '100 days',"
            " now() - interval '99 days')"
        )
        await conn.execute(
            "INSERT INTO heartbeat_history (component, first_seen, last_seen)"
            " VALUES ('collector', now() - interval '100 days', now() - interval '99 days')"
        )
        db = dsn.rsplit("/", 1)[1].split("?", maxsplit=1)[0]
        writer_dsn = with_db(srv.admin_dsn, db, user=role)
        writer = await asyncpg.connect(writer_dsn)
        try:
            for table in ("alerts", "producer_gaps", "heartbeat_history"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await writer.execute(f"DELETE FROM {table}")
        finally:
            await writer.close()
        p = await ingestd_pool(writer_dsn)
        try:
            m = maintenance(p, aredis, alerts_days=1, heartbeat_history_days=1)
            result = await m.run_task(TASK_RETENTION, force=True)
            assert result is not None and not result.ran and result.detail == "not the owner"
        finally:
            await p.close()
        assert await conn.fetchval("SELECT count(*) FROM alerts") == 1
        assert await conn.fetchval("SELECT count(*) FROM heartbeat_history") == 1
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
