"""The delivery budget never gives up work because the database is unavailable.

With the budget at its tightest (one refusal alone makes a dead letter), the fault suite's own
PostgreSQL is shut down (its backends get admin_shutdown, then connections are refused) while
batches are in flight, one of them holding an entry a trigger refuses. Everything waits; after
the restart every valid event lands once, only the refused entry is a dead letter, and nothing
is quarantined.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from ingestd import Outcome, Service
from ingestd.settings import Settings
from tests.faults.conftest import FaultServers
from tests.refusals import REFUSE_POISON
from tests.samples import fx_event as fx

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]


async def test_a_database_shut_down_and_refusing_connections_gives_nothing_up(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    dsn = fault_settings.storage.postgres.dsn
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(REFUSE_POISON)
    finally:
        await conn.close()
    settings = fault_settings.replace(
        **{
            "pipeline.max_entry_attempts": 1,
            "pipeline.batch_max_rows": 100,
            "pipeline.quarantine_path": str(tmp_path / "quarantine.jsonl"),
        }
    )
    events = [fx(i) for i in range(2_000)]
    events.insert(1_500, fx(99_999, event_id="poison-fault"))
    async with Service(settings, stream_intake=False) as service:
        assert service.pipeline is not None
        await asyncio.to_thread(fault_servers.pg.stop, "fast")
        producing = asyncio.gather(
            *(service.submit_many(events[i : i + 100]) for i in range(0, len(events), 100))
        )
        pipeline = service.pipeline
        deadline = asyncio.get_running_loop().time() + 60
        while service.metrics.flush_retries < 10:
            assert asyncio.get_running_loop().time() < deadline, "no retries seen"
            await asyncio.sleep(0.05)
        assert pipeline.failing
        assert not producing.done()
        assert service.metrics.entries_given_up == 0
        await asyncio.to_thread(fault_servers.pg.start)
        outcomes = [o for part in await asyncio.wait_for(producing, 120) for o in part]
        assert service.metrics.quarantined == 0
        assert service.metrics.entries_given_up == 1
    assert outcomes.count(Outcome.DEAD_LETTER) == 1
    assert outcomes[1_500] is Outcome.DEAD_LETTER
    assert outcomes.count(Outcome.COMMITTED) == 2_000
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM fx_rates") == 2_000
        assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM fx_rates") == 2_000
        rows = await conn.fetch("SELECT event_id, error FROM dead_letters")
    finally:
        await conn.close()
    assert [r["event_id"] for r in rows] == ["poison-fault"]
    assert "SQLSTATE P0001" in rows[0]["error"]
    assert not (tmp_path / "quarantine.jsonl").exists()
