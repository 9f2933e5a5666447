"""No entry is retried forever while others commit: isolation, dead letter, quarantine.

Against real PostgreSQL and Redis. An entry the database refuses for a reason other than being
unavailable is split out of its batch, tried alone ``pipeline.max_entry_attempts`` times, and
then becomes a dead letter; if even that cannot be written it is quarantined to a local file,
acknowledged and alarmed. While the database is unavailable (a lock that outlasts the flush
timeout, a read-only database) nothing is given up: everything waits and lands once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from ingestd import Outcome, Service
from ingestd.settings import Settings
from tests.feeds import wait_count, wait_until_acknowledged
from tests.http_client import get, scrape
from tests.private_servers import free_port
from tests.refusals import NUL_FIELD_ENTRY, REFUSE_POISON, REFUSE_POISON_DEAD_LETTER
from tests.samples import fx_event as fx

pytestmark = [pytest.mark.pg, pytest.mark.redis]

STREAM = "ingestd:events"


def entry_id(reply: Any) -> str:
    """An XADD reply as text."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


@pytest.fixture
def budget_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Quick retries, a quarantine file of this test's own."""
    return settings.replace(
        **{
            "pipeline.backoff_base_s": 0.05,
            "pipeline.backoff_cap_s": 0.2,
            "pipeline.quarantine_path": str(tmp_path / "quarantine" / "ingestd.jsonl"),
        }
    )


async def test_a_small_entry_whose_dead_letter_overflows_does_not_jam_the_stream(
    budget_settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    for i in range(20):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    assert len(NUL_FIELD_ENTRY.encode()) < 200
    poison_id = entry_id(rclient.xadd(STREAM, {"event": NUL_FIELD_ENTRY}))
    for i in range(20, 40):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    async with Service(budget_settings):
        assert await wait_count(db, "SELECT count(*) FROM fx_rates", 40) == 40
        assert await wait_count(db, "SELECT count(*) FROM dead_letters", 1) == 1
        await wait_until_acknowledged(rclient, timeout=20)
    dead = await db.fetchrow("SELECT * FROM dead_letters")
    assert dead is not None
    assert dead["dedup_key"] == f"stream:{STREAM}:{poison_id}"
    assert dead["field"] is not None and len(dead["field"]) <= 100
    assert dead["field"].startswith("\\x00")
    assert "unknown field" in dead["error"]


async def test_submit_many_returns_with_the_bad_one_dead_lettered(
    budget_settings: Settings, db: asyncpg.Connection
) -> None:
    # A type of 40 NULs and a field named by 100 lone surrogates: escaped, both are longer
    # than their columns (event_type VARCHAR(50), field VARCHAR(100)).
    nul_type = {**fx(1000), "type": "\x00" * 40}
    surrogate_key = {**fx(1001), "\udc80" * 100: "x"}
    batch = [fx(i) for i in range(10)] + [nul_type, surrogate_key] + [fx(i) for i in range(10, 20)]
    async with Service(budget_settings, stream_intake=False) as service:
        outcomes = await asyncio.wait_for(service.submit_many(batch), 60)
    assert outcomes[10:12] == [Outcome.DEAD_LETTER, Outcome.DEAD_LETTER]
    assert set(outcomes[:10] + outcomes[12:]) == {Outcome.COMMITTED}
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 20
    rows = await db.fetch("SELECT event_type, field FROM dead_letters ORDER BY id")
    assert len(rows) == 2
    for row in rows:
        assert row["event_type"] is None or len(row["event_type"]) <= 50
        assert row["field"] is None or len(row["field"]) <= 100


async def test_an_entry_the_database_refuses_is_isolated_then_dead_lettered(
    budget_settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    await db.execute(REFUSE_POISON)
    events = [fx(i) for i in range(30)]
    events.insert(17, fx(999, event_id="poison-1"))
    for ev in events:
        rclient.xadd(STREAM, {"event": json.dumps(ev)})
    async with Service(budget_settings.replace(**{"pipeline.max_entry_attempts": 2})) as service:
        assert await wait_count(db, "SELECT count(*) FROM dead_letters", 1) == 1
        assert await wait_count(db, "SELECT count(*) FROM fx_rates", 30) == 30
        await wait_until_acknowledged(rclient, timeout=20)
        assert service.metrics.quarantined == 0
    dead = await db.fetchrow("SELECT * FROM dead_letters")
    assert dead is not None
    assert dead["event_id"] == "poison-1"
    assert "SQLSTATE P0001" in dead["error"]
    assert "refused by a trigger: poison-1" in dead["error"]
    assert await db.fetchval("SELECT count(*) FROM fx_rates WHERE event_id LIKE 'poison%'") == 0


async def test_an_entry_whose_dead_letter_is_refused_too_is_quarantined_and_alarmed(
    budget_settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    await db.execute(REFUSE_POISON)
    await db.execute(REFUSE_POISON_DEAD_LETTER)
    poison = json.dumps(fx(999, event_id="poison-2"))
    for i in range(10):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    poison_id = entry_id(rclient.xadd(STREAM, {"event": poison}))
    for i in range(10, 20):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    ops = budget_settings.replace(metrics_port=free_port())
    quarantine = Path(ops.pipeline.quarantine_path)
    async with Service(ops) as service:
        port = ops.metrics_port
        assert await wait_count(db, "SELECT count(*) FROM fx_rates", 20) == 20
        deadline = time.monotonic() + 30
        while service.metrics.quarantined == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.metrics.quarantined == 1
        while rclient.xpending(STREAM, "ingestd")["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert rclient.xpending(STREAM, "ingestd")["pending"] == 0  # acknowledged
        samples = await scrape(port)
        assert samples[("ingestd_quarantined_total", ())] == 1
        assert samples[("ingestd_healthy", ())] == 0
        healthz = await get(port, "/healthz")
        assert healthz.status == 503
        assert "quarantined" in healthz.text
        readyz = await get(port, "/readyz")
        assert readyz.status == 503
        # The operator has replayed it and moves the file away: healthy again.
        await asyncio.to_thread(quarantine.rename, quarantine.with_suffix(".replayed"))
        assert (await get(port, "/healthz")).status == 200
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    (line,) = quarantine.with_suffix(".replayed").read_text().splitlines()
    record = json.loads(line)
    assert record["payload"] == poison
    assert record["encoding"] == "utf-8"
    assert record["source"] == "stream"
    assert record["key"] == f"stream:{STREAM}:{poison_id}"
    assert "P0001" in record["error"]
    assert dt.datetime.fromisoformat(record["time"]).tzinfo is not None


async def test_in_process_entry_refused_with_its_dead_letter_returns_and_is_quarantined(
    budget_settings: Settings, db: asyncpg.Connection
) -> None:
    await db.execute(REFUSE_POISON)
    await db.execute(REFUSE_POISON_DEAD_LETTER)
    batch = [fx(i) for i in range(5)] + [fx(999, event_id="poison-3")] + [fx(5), fx(6)]
    async with Service(budget_settings, stream_intake=False) as service:
        outcomes = await asyncio.wait_for(service.submit_many(batch), 60)
        assert service.metrics.quarantined == 1
        assert service.health_report()[0] is False
    assert outcomes[5] is Outcome.DEAD_LETTER
    assert outcomes[:5] + outcomes[6:] == [Outcome.COMMITTED] * 7
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 7
    text = await asyncio.to_thread(Path(budget_settings.pipeline.quarantine_path).read_text)
    (line,) = text.splitlines()
    assert orjson.loads(line)["source"] == "submit"


async def test_a_lock_that_outlasts_the_flush_timeout_is_waited_out_never_dead_lettered(
    budget_settings: Settings, db_dsn: str, db: asyncpg.Connection
) -> None:
    quick = budget_settings.replace(
        **{"pipeline.flush_timeout_s": 0.3, "pipeline.max_entry_attempts": 1}
    )
    async with Service(quick, stream_intake=False) as service:
        locker = await asyncpg.connect(db_dsn)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE fx_rates IN ACCESS EXCLUSIVE MODE")
            pending = asyncio.create_task(service.submit_many([fx(i) for i in range(50)]))
            deadline = time.monotonic() + 20
            while service.metrics.flush_retries < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert service.metrics.flush_retries >= 5  # timed out again and again
            assert not pending.done()
            await tx.rollback()
        finally:
            await locker.close()
        assert await asyncio.wait_for(pending, 30) == [Outcome.COMMITTED] * 50
        assert service.metrics.quarantined == 0
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 50
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_read_only_database_is_not_ready_and_gives_nothing_up(
    budget_settings: Settings, db_dsn: str, db: asyncpg.Connection
) -> None:
    # COPY fails with 25006 (read_only_sql_transaction), a class that is no connection error:
    # only the evidence (a probe write fails as well) says the database is unavailable.
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    ops = budget_settings.replace(**{"metrics_port": free_port(), "pipeline.max_entry_attempts": 1})
    async with Service(ops, stream_intake=False) as service:
        readyz = await get(ops.metrics_port, "/readyz")
        assert readyz.status == 503
        assert "read-only" in orjson.loads(readyz.body)["checks"]["commit"]
        pending = asyncio.create_task(service.submit_many([fx(i) for i in range(10)]))
        deadline = time.monotonic() + 20
        while service.metrics.flush_retries < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.metrics.flush_retries >= 5
        assert not pending.done()
        # Writable again: the pool's sessions read the setting at connect, so they are renewed.
        await db.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert await asyncio.wait_for(pending, 30) == [Outcome.COMMITTED] * 10
        assert service.metrics.quarantined == 0
        assert (await get(ops.metrics_port, "/readyz")).status == 200
    assert await db.fetchval("SELECT count(*) FROM fx_rates") == 10
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_bad_input_whose_dead_letter_is_refused_is_quarantined_and_the_rest_lands(
    budget_settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    # Bad input (an unknown type) goes to dead_letters in its batch's transaction; a trigger
    # refuses that one dead letter. It must not take its batch with it.
    await db.execute(REFUSE_POISON_DEAD_LETTER)
    for i in range(15):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    bad_id = entry_id(rclient.xadd(STREAM, {"event": '{"type": "poison"}'}))
    rclient.xadd(STREAM, {"event": '{"type": "nope"}'})  # bad input whose dead letter is fine
    for i in range(15, 30):
        rclient.xadd(STREAM, {"event": json.dumps(fx(i))})
    async with Service(budget_settings) as service:
        assert await wait_count(db, "SELECT count(*) FROM fx_rates", 30) == 30
        assert await wait_count(db, "SELECT count(*) FROM dead_letters", 1) == 1
        await wait_until_acknowledged(rclient, timeout=30)
        assert service.metrics.quarantined == 1
    assert await db.fetchval("SELECT payload FROM dead_letters") == '{"type": "nope"}'
    text = await asyncio.to_thread(Path(budget_settings.pipeline.quarantine_path).read_text)
    (line,) = text.splitlines()
    record = orjson.loads(line)
    assert record["payload"] == '{"type": "poison"}'
    assert record["key"] == f"stream:{STREAM}:{bad_id}"
