"""A slow database, a hung one, data the database refuses, events out of order, shutdown.

The slow database is a side session holding ``LOCK TABLE ... ACCESS EXCLUSIVE``; the hung one
is the server SIGSTOPped (its sockets stay open and nothing answers). Poison rows are made real
by a CHECK constraint the events do not know about. Out-of-order feeds are shuffled so that
closes come before opens and legs before their positions, across two replicas.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import signal
import time
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis

from ingestd import Outcome, Service
from ingestd.settings import Settings
from ingestd.tools.simulate import Simulator
from tests.daemons import StartDaemon
from tests.faults.conftest import FAULT_CONFIG, FaultServers
from tests.feeds import (
    START,
    pending,
    produce,
    publish_from_other_process,
    published_feed,
    simulated,
    wait_for_rows,
    wait_until,
    watch_queue,
)
from tests.ledger import (
    Expected,
    assert_landed_exactly_once,
    assert_landed_in,
    wait_until_landed_exactly_once,
)

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]


async def test_slow_database_lock_gives_backpressure_and_loses_nothing(
    fault_settings: Settings,
) -> None:
    settings = fault_settings.replace(
        **{"pipeline.queue_max_events": 1_000, "pipeline.batch_max_rows": 500}
    )
    sent = simulated(10_000, seed=51)
    exp = Expected.of(sent)
    dsn = settings.storage.postgres.dsn
    locker = await asyncpg.connect(dsn)
    try:
        async with Service(settings, stream_intake=False) as service:
            assert service.pipeline is not None
            peak = [0]
            watcher = asyncio.create_task(watch_queue(service, peak))
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE spreads IN ACCESS EXCLUSIVE MODE")
            producing = asyncio.create_task(produce(service, sent))
            await asyncio.sleep(8)  # longer than command_timeout_s (3 s): COPYs time out
            assert not producing.done()  # producers are held back...
            assert peak[0] <= 1_000 + 50  # ...and memory is bounded
            retries_while_locked = service.pipeline.metrics.flush_retries
            await tx.rollback()
            outcomes = await asyncio.wait_for(producing, timeout=120)
            watcher.cancel()
            assert outcomes == {Outcome.COMMITTED: len(sent)}
            assert retries_while_locked > 0  # the timeouts happened, and became retries
    finally:
        await locker.close()
    await wait_until_landed_exactly_once(settings.storage.postgres.dsn, exp)


async def test_hung_database_every_flush_fails_within_its_deadline_then_recovers(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    sent = simulated(8_000, seed=52)
    exp = Expected.of(sent)
    settings = fault_settings.replace(**{"pipeline.queue_max_events": 2_000})
    async with Service(settings, stream_intake=False) as service:
        assert service.pipeline is not None
        pipeline = service.pipeline
        first = sent[:2_000]
        assert set(await service.submit_many(first)) == {Outcome.COMMITTED}
        fault_servers.pg.freeze()
        try:
            producing = asyncio.create_task(produce(service, sent[2_000:]))
            # Nothing answers and no socket closes: only the deadlines can end a flush.
            await wait_until(lambda: pipeline.failing, timeout=30)
            await wait_until(lambda: pipeline.metrics.flush_retries >= 2, timeout=30)
            assert not producing.done()
        finally:
            fault_servers.pg.thaw()
        outcomes = await asyncio.wait_for(producing, timeout=120)
        assert outcomes == {Outcome.COMMITTED: len(sent) - 2_000}
    await wait_until_landed_exactly_once(settings.storage.postgres.dsn, exp)


def over_limit(event: dict[str, Any], limit: Decimal) -> bool:
    return event["type"] == "spread" and Decimal(event["spread_pct"]) >= limit


async def test_rows_the_database_refuses_become_dead_letters_and_the_rest_commits(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    sent = simulated(20_000, seed=53)
    limit = Decimal("4.0")
    dsn = fault_settings.storage.postgres.dsn
    conn = await asyncpg.connect(dsn)
    try:
        # A rule the events do not know about: they pass validation and fail in the database.
        await conn.execute(
            "ALTER TABLE spreads ADD CONSTRAINT spread_under_limit CHECK (spread_pct < 4.0)"
        )
        refused = [e for e in sent if e["type"] == "spread" and Decimal(e["spread_pct"]) >= limit]
        good = [
            e for e in sent if not (e["type"] == "spread" and Decimal(e["spread_pct"]) >= limit)
        ]
        assert 50 < len(refused) < len(sent) // 4
        publish_from_other_process(fault_settings, len(sent), seed=53)
        daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
        exp = Expected.of(good)
        await wait_for_rows(dsn, "spreads", exp.counts["spreads"])
        await wait_for_rows(dsn, "dead_letters", len(refused))
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0, daemon.log
        await assert_landed_exactly_once(conn, exp)
        rows = await conn.fetch("SELECT event_id, error, field FROM dead_letters")
        assert {r["event_id"] for r in rows} == {e["event_id"] for e in refused}
        assert all("spread_under_limit" in r["error"] for r in rows)
        assert all("23514" in r["error"] for r in rows)  # check_violation, by SQLSTATE
    finally:
        await conn.close()
    assert pending(redis.Redis.from_url(fault_settings.storage.redis.url)) == 0


def shuffled_position_feed(seed: int, count: int) -> list[dict[str, Any]]:
    """Simulated events with every position's events reversed and the whole feed shuffled."""
    start = dt.datetime.fromisoformat(START)
    sim = Simulator(seed=seed, symbols=("BTC", "ETH", "XRP"), start=start, tick_s=1.0)
    events: list[dict[str, Any]] = []
    while len(events) < count:
        events.extend(sim.step())
    rng = random.Random(seed)
    rng.shuffle(events)
    # Make sure closes precede their opens, and legs precede both, for every position.
    order = {"trade": 0, "order": 1, "position_close": 2, "position_open": 3}
    by_key = [e for e in events if "position_key" in e]
    by_key.sort(key=lambda e: order[e["type"]])
    others = [e for e in events if "position_key" not in e]
    return [*by_key, *others]


async def test_out_of_order_events_across_two_replicas_end_right(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    feed = shuffled_position_feed(54, 30_000)
    exp = Expected.of(feed)
    assert len(exp.positions_closed) > 10
    client = redis.Redis.from_url(fault_settings.storage.redis.url)
    pipe = client.pipeline(transaction=False)
    for ev in feed:
        pipe.xadd("ingestd:events", {"event": json.dumps(ev)})
    pipe.execute()
    small = {"BATCH_MAX_ROWS": "50"}  # many batches: an open and its close rarely meet in one
    replicas = [
        start_daemon(fault_settings, name, config_yaml=FAULT_CONFIG, **small) for name in ("a", "b")
    ]
    dsn = fault_settings.storage.postgres.dsn
    for table in ("spreads", "orders", "trades"):
        await wait_for_rows(dsn, table, exp.counts[table])
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 60
        while await conn.fetchval("SELECT count(*) FROM position_closes_pending") and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.1)
        for r in replicas:
            r.signal(signal.SIGTERM)
        for r in replicas:
            assert await asyncio.to_thread(r.wait, 30) == 0, r.log
        await assert_landed_exactly_once(conn, exp)
        # Every leg and trade found its position, whichever landed first.
        for table in ("orders", "trades"):
            unlinked = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE position_key IS NOT NULL "
                "AND position_id IS NULL"
            )
            assert unlinked == 0, table
        # The closed rows carry the close's PnL and the open's entry columns.
        closed = await conn.fetch("SELECT * FROM positions WHERE status = 'CLOSED'")
        closes = {e["position_key"]: e for e in feed if e["type"] == "position_close"}
        opens = {e["position_key"]: e for e in feed if e["type"] == "position_open"}
        for row in closed:
            assert row["pnl_krw"] == Decimal(closes[row["position_key"]]["pnl_krw"])
            assert row["entry_upbit_price"] == Decimal(
                opens[row["position_key"]]["entry_upbit_price"]
            )
    finally:
        await conn.close()


async def test_second_signal_exits_at_once_and_a_restart_completes_exactly_once(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 30_000, seed=55)
    exp = Expected.of(sent)
    dsn = fault_settings.storage.postgres.dsn
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    await wait_for_rows(dsn, "spreads", 2_000)
    locker = await asyncpg.connect(dsn)
    try:
        # A drain that cannot finish: the tables are locked.
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE spreads IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(0.5)
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for_log("draining")
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 10) == 130
        assert "second signal" in daemon.log
        await tx.rollback()
    finally:
        await locker.close()
    # Nothing was acknowledged without a commit: a restart delivers the rest, exactly once.
    assert pending(redis.Redis.from_url(fault_settings.storage.redis.url)) > 0
    again = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    for table in ("spreads", "fx_rates", "orders", "trades"):
        await wait_for_rows(dsn, table, exp.counts[table])
    again.signal(signal.SIGTERM)
    # Exit code 0 means the drain finished within shutdown.grace_s (3 would mean forced).
    assert await asyncio.to_thread(again.wait, 30) == 0, again.log
    await assert_landed_in(dsn, exp)
