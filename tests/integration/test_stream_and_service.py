"""The stream consumer group and the in-process API against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis

from ingestd import Outcome, Service
from ingestd.errors import InvalidEvent, SchemaBehind, ShuttingDown
from ingestd.settings import Settings
from tests.samples import fx_event

pytestmark = [pytest.mark.pg, pytest.mark.redis]

STREAM = "ingestd:events"


def fx(i: int, *, rate: str = "1385.5", event_id: str | None = None) -> dict[str, Any]:
    """A valid FX event, its source named "test"."""
    return fx_event(i, rate=rate, event_id=event_id, source="test")


async def count(conn: asyncpg.Connection, table: str, want: int, timeout: float = 20) -> int:
    """Wait until ``table`` holds ``want`` rows; return what it holds."""
    end = time.monotonic() + timeout
    n = 0
    while time.monotonic() < end:
        n = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        if n >= want:
            return n
        await asyncio.sleep(0.05)
    return n


@contextlib.asynccontextmanager
async def table_locked(dsn: str, table: str) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` from another connection until the block ends."""
    lock = await asyncpg.connect(dsn)
    try:
        async with lock.transaction():
            await lock.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await lock.close()


def xadd_all(client: redis.Redis, events: list[dict[str, Any]]) -> list[bytes]:
    """Publish events; return their entry ids."""
    pipe = client.pipeline(transaction=False)
    for ev in events:
        pipe.xadd(STREAM, {"event": json.dumps(ev)})
    return list(pipe.execute())


async def test_group_is_created_at_zero_so_earlier_entries_are_not_lost(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    xadd_all(rclient, [fx(i) for i in range(50)])  # published before ingestd ever ran
    async with Service(settings):
        assert await count(db, "fx_rates", 50) == 50
    assert rclient.xpending(STREAM, "ingestd")["pending"] == 0


async def test_own_pending_entries_are_reread_at_start(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    rclient.xgroup_create(STREAM, "ingestd", id="0", mkstream=True)
    xadd_all(rclient, [fx(i) for i in range(30)])
    # This consumer read them in an earlier life and died before XACK.
    rclient.xreadgroup("ingestd", settings.consumer_name, {STREAM: ">"}, count=100)
    assert rclient.xpending(STREAM, "ingestd")["pending"] == 30
    async with Service(settings) as service:
        assert await count(db, "fx_rates", 30) == 30
        assert service.stream is not None and service.stream.redelivered == 30
    assert rclient.xpending(STREAM, "ingestd")["pending"] == 0


async def test_idle_entries_of_a_dead_consumer_are_claimed(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    rclient.xgroup_create(STREAM, "ingestd", id="0", mkstream=True)
    xadd_all(rclient, [fx(i) for i in range(40)])
    rclient.xreadgroup("ingestd", "dead-replica", {STREAM: ">"}, count=100)
    fast = settings.replace(**{"stream.claim_idle_ms": 200, "stream.claim_interval_s": 0.2})
    async with Service(fast) as service:
        assert await count(db, "fx_rates", 40) == 40
        assert service.stream is not None and service.stream.claimed == 40
    assert rclient.xpending(STREAM, "ingestd")["pending"] == 0
    assert await db.fetchval("SELECT count(DISTINCT event_id) FROM fx_rates") == 40


async def test_redelivered_entries_and_republished_events_land_once(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    events = [fx(i) for i in range(100)]
    xadd_all(rclient, events)
    xadd_all(rclient, events[:60])  # a producer retried after a timeout
    bad = rclient.xadd(STREAM, {"event": b"{broken"})
    async with Service(settings):
        assert await count(db, "fx_rates", 100) == 100
        assert await count(db, "dead_letters", 1) == 1
    # Replaying the whole stream in a second consumer group changes nothing either.
    rclient.xgroup_create(STREAM, "replay", id="0")
    replay = settings.replace(**{"stream.group": "replay"})
    async with Service(replay):
        await asyncio.sleep(1.0)
        assert rclient.xpending(STREAM, "replay")["pending"] == 0
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 100
    dead = await db.fetch("SELECT dedup_key FROM dead_letters")
    bad_id = bad.decode() if isinstance(bad, bytes) else bad
    assert [r["dedup_key"] for r in dead] == [f"stream:{STREAM}:{bad_id}"]


async def test_acknowledged_entries_are_trimmed_and_unread_ones_kept(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    xadd_all(rclient, [fx(i) for i in range(20)])
    async with Service(settings) as service:
        assert await count(db, "fx_rates", 20) == 20
        assert service.stream is not None
        await asyncio.sleep(0.3)  # let the acks of the last batch go out
        removed = await service.stream.trim_acknowledged()
    assert removed == 20
    assert rclient.xlen(STREAM) == 0
    rclient.xgroup_create(STREAM, "other", id="0")  # a second group that has read nothing
    xadd_all(rclient, [fx(i) for i in range(20, 25)])
    async with Service(settings) as service:
        assert await count(db, "fx_rates", 25) == 25
        await asyncio.sleep(0.3)
        assert service.stream is not None
        assert await service.stream.trim_acknowledged() == 0  # "other" still needs them
    assert rclient.xlen(STREAM) == 5


async def test_submit_waits_for_commit_and_rejects_bad_input(
    settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    in_process = settings.replace(**{"stream.enabled": False})
    async with Service(in_process) as service:
        assert await service.submit(fx(1, rate="1385.123456789")) is Outcome.COMMITTED
        # Committed before submit returned: no waiting needed.
        assert await db.fetchval("SELECT rate FROM fx_rates") == Decimal("1385.12345679")
        with pytest.raises(InvalidEvent) as err:
            await service.submit({**fx(2), "timestamp": "2026-11-30T00:00:00"})
        assert err.value.field == "timestamp"
        dead = await db.fetchrow("SELECT * FROM dead_letters")
        assert dead is not None and dead["source"] == "submit" and dead["field"] == "timestamp"
        # Many producers at once: every call returns after its own commit.
        outcomes = await asyncio.gather(*(service.submit(fx(i)) for i in range(10, 2010)))
        assert set(outcomes) == {Outcome.COMMITTED}
        assert await db.fetchval("SELECT count(*) FROM fx_rates") == 2001
    assert rclient.exists(STREAM) == 0  # the stream intake was off


async def test_event_in_memory_and_in_the_spool_is_one_dead_letter_when_refused(
    settings: Settings, db: asyncpg.Connection, tmp_path: Any
) -> None:
    # An event that waits past spill_after_s is spooled while its in-memory copy goes on
    # retrying. If the database then refuses it for its data, both copies are rejected: they
    # must meet one dead-letter key, or the one bad event would be recorded twice.
    spilling = settings.replace(
        **{
            "stream.enabled": False,
            "spool.directory": str(tmp_path / "spool"),
            "spool.spill_after_s": 0.2,
        }
    )
    await db.execute("ALTER TABLE fx_rates ADD CONSTRAINT rate_below_2000 CHECK (rate < 2000)")
    async with Service(spilling) as service:
        assert service.spool is not None
        async with table_locked(spilling.storage.postgres.dsn, "fx_rates"):
            outcomes = await service.submit_many([fx(1, rate="2500"), fx(2)])
            # The lock outlasted spill_after_s: both are spooled, and still in memory too.
            assert outcomes == [Outcome.SPOOLED, Outcome.SPOOLED]
        deadline = time.monotonic() + 20
        while service.spool.pending_records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.spool.pending_records == 0  # replayed: both copies went through
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 1
    rows = await db.fetch("SELECT event_id, error FROM dead_letters")
    assert [r["event_id"] for r in rows] == ["fx-1"]
    assert "rate_below_2000" in rows[0]["error"]


async def test_backpressure_bounds_the_queue(settings: Settings, db: asyncpg.Connection) -> None:
    small = settings.replace(
        **{
            "stream.enabled": False,
            "pipeline.queue_max_events": 100,
            "pipeline.batch_max_rows": 50,
            "pipeline.writers": 1,
        }
    )
    async with Service(small) as service:
        assert service.pipeline is not None
        async with table_locked(small.storage.postgres.dsn, "fx_rates"):
            tasks = [asyncio.create_task(service.submit(fx(i))) for i in range(1000)]
            await asyncio.sleep(1.0)
            # The writer is stuck behind the lock: the queue stays within its bound (plus at
            # most one batch in flight), and the remaining producers wait instead of piling up.
            assert len(service.pipeline.queue) <= 100
            assert sum(t.done() for t in tasks) == 0
        await asyncio.gather(*tasks)
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 1000


async def test_submit_callers_are_failed_not_left_waiting_when_the_drain_times_out(
    settings: Settings,
) -> None:
    # The database refuses to take the batch in time (a table lock), and the grace period
    # ends: the callers hear ShuttingDown instead of waiting forever.
    service = Service(settings.replace(**{"pipeline.flush_timeout_s": 1.0}), stream_intake=False)
    await service.start()
    locker = await asyncpg.connect(settings.storage.postgres.dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE fx_rates IN ACCESS EXCLUSIVE MODE")
        waiting = asyncio.create_task(service.submit(fx(900)))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert await service.stop(grace_s=1.0) is False
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(waiting, timeout=5)
        await tx.rollback()
    finally:
        await locker.close()


async def test_a_failed_start_releases_its_connections(settings: Settings, pg_server: Any) -> None:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    name = f"ingestd_test_behind_{id(settings) % 100000}"
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = settings.storage.postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
        service = Service(settings.replace(**{"storage.postgres.dsn": dsn}))
        with pytest.raises(SchemaBehind, match="ingestd migrate"):
            await service.start()
        left = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name
        )
        assert left == 0  # the pool was closed although __aexit__ never ran
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
