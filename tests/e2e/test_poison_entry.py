"""``ingestd run`` with entries no database write will take: intake goes on, SIGTERM is clean."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import asyncpg
import pytest
import redis

from ingestd.settings import Settings
from tests.daemons import StartDaemon
from tests.feeds import pending, wait_for_rows
from tests.refusals import NUL_FIELD_ENTRY, REFUSE_POISON, REFUSE_POISON_DEAD_LETTER
from tests.samples import fx_event as fx

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]

STREAM = "ingestd:events"


async def test_sigterm_with_an_unwritable_entry_pending_stops_clean_within_the_grace(
    settings: Settings,
    start_daemon: StartDaemon,
    rclient: redis.Redis,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    await db.execute(REFUSE_POISON)
    await db.execute(REFUSE_POISON_DEAD_LETTER)
    quarantine = tmp_path / "quarantine.jsonl"
    pipe = rclient.pipeline(transaction=False)
    for i in range(500):
        pipe.xadd(STREAM, {"event": json.dumps(fx(i))})
        if i == 100:
            pipe.xadd(STREAM, {"event": NUL_FIELD_ENTRY})
        if i == 300:
            pipe.xadd(STREAM, {"event": json.dumps(fx(9999, event_id="poison-e2e"))})
    pipe.execute()
    daemon = start_daemon(
        settings,
        config_yaml=(
            "stream:\n  block_ms: 200\n"
            "pipeline:\n  batch_max_age_ms: 50\n"
            f"  quarantine_path: {quarantine}\n"
            "shutdown:\n  grace_s: 15\n"
        ),
    )
    # The poison entry is being isolated from its batch: stop now, in the middle of it.
    await daemon.wait_for_log("action=batch_split", timeout=60)
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 20) == 0, daemon.log
    assert "(clean)" in daemon.log
    assert "action=quarantined" in daemon.log
    assert pending(rclient) == 0
    assert await wait_for_rows(settings.storage.postgres.dsn, "fx_rates", 500) == 500
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 1  # the NUL-named field
    text = await asyncio.to_thread(quarantine.read_text)
    (line,) = text.splitlines()
    assert json.loads(line)["event_id"] == "poison-e2e"
