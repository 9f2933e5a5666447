"""The producer's disk outbox against a real Redis it stops and starts, and a real ingestd
(``Service``, the daemon's core) consuming the stream into PostgreSQL.

A producer killed (SIGKILL) during a Redis outage loses nothing that ``log_*`` returned from; a
full outbox refuses loudly and drops nothing; ``log_*`` never waits for Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest
import redis

from ingestd import Service
from ingestd.producer.storage import (
    AsyncPostgresStorage,
    OutboxFull,
    PostgresStorage,
    create_async_storage,
    create_storage,
)
from ingestd.settings import Settings
from tests.commands import REPO_ROOT
from tests.feeds import wait_count
from tests.private_servers import OwnRedis
from tests.samples import position, spread

pytestmark = [pytest.mark.pg, pytest.mark.redis]


@pytest.fixture
def outbox_settings(settings: Settings, own_redis: OwnRedis, tmp_path: Path) -> Settings:
    """Backend ``postgres`` through the throwaway Redis, outboxes under tmp_path/outbox."""
    return settings.replace(
        **{
            # The samples (2025-11-15) are older than the retention of spreads: neither refused
            # at intake nor deleted by a retention round here (this is about the outbox).
            "maintenance.enabled": False,
            "retention.spreads_days": 0,
            "retention.fx_rates_days": 0,
            "retention.orders_days": 0,
            "storage.backend": "postgres",
            "storage.redis.url": own_redis.url,
            "storage.outbox.dir": str(tmp_path / "outbox"),
        }
    )


def stream_event_ids(url: str, stream: str) -> list[str]:
    """The event ids in the stream, in stream order."""
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrange(stream) or []
        ids: list[str] = []
        for _, fields in entries:
            assert fields is not None
            ids.append(json.loads(fields[b"event"])["event_id"])
        return ids
    finally:
        client.close()


# The producer, in its own process so that the test can SIGKILL it. ``outage``: log N events
# while Redis is down, report their ids, and wait to be killed. ``restart``: open the same
# outbox (with Redis up), log 10 more, flush and close.
PRODUCER = textwrap.dedent(
    """
    import json, sys, time
    from ingestd.settings import load_settings
    from ingestd.producer.storage import create_storage
    from tests.samples import position, spread

    overrides, phase, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    settings = load_settings(None, environ={}, overrides=overrides)
    storage = create_storage(settings, producer="paper")
    if phase == "outage":
        ids = [storage.log_position_open(position("pos_k9"))]
        ids += [storage.log_spread(spread(i)) for i in range(n)]
        print(json.dumps({"ids": ids, "state": storage.outbox_state().pending_events}), flush=True)
        time.sleep(3600)  # SIGKILLed here
    else:
        ids = [storage.log_spread(spread(n + i)) for i in range(10)]
        storage.flush(60)
        storage.close()
        print(json.dumps({"ids": ids}), flush=True)
    """
)


def producer_overrides(settings: Settings) -> dict[str, object]:
    """What the producer process needs to find the same Redis, stream and outbox."""
    return {
        "storage.backend": "postgres",
        "storage.redis.url": settings.storage.redis.url,
        "storage.outbox.dir": settings.storage.outbox.dir,
        # No fsync within the test: a SIGKILL loses nothing that was written before log_*
        # returned, because the written pages belong to the kernel, not the process.
        "storage.outbox.fsync_interval_s": 3600,
        "stream.key": settings.stream.key,
    }


@pytest.mark.parametrize("outage", [True, False], ids=["redis-down", "redis-up"])
async def test_a_killed_producer_loses_nothing_it_logged(
    outbox_settings: Settings,
    own_redis: OwnRedis,
    db: asyncpg.Connection,
    tmp_path: Path,
    outage: bool,
) -> None:
    n = 2000
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    args = [sys.executable, str(script), json.dumps(producer_overrides(outbox_settings))]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if outage:
        own_redis.stop()
    child = subprocess.Popen(  # noqa: ASYNC220 - starting it does not wait for it
        [*args, "outage", str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line, (child.stderr.read() if child.stderr else b"").decode()
        first = json.loads(line)
        if outage:
            assert first["state"] == n + 1  # all pending: nothing could be published
    finally:
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait, 30)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
    assert child.returncode == -signal.SIGKILL
    if outage:
        own_redis.start()
    async with Service(outbox_settings):
        done = await asyncio.to_thread(
            subprocess.run,
            [*args, "restart", str(n)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        second = json.loads(done.stdout)["ids"]
        assert await wait_count(db, "SELECT count(*) FROM spreads", n + 10) == n + 10
        await asyncio.sleep(0.5)  # a duplicate would land with the rest
        assert await db.fetchval("SELECT count(*) FROM spreads") == n + 10
        ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM spreads")}
        assert ids == set(first["ids"][1:]) | set(second)
        assert await db.fetchval("SELECT count(*) FROM positions") == 1
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    published = stream_event_ids(own_redis.url, outbox_settings.stream.key)
    if outage:
        # Replayed in the order of the log_* calls, the killed run's first, each published once.
        assert published == first["ids"] + second
    else:
        # Killed while publishing: what it had not confirmed is published again by the restart
        # (at-least-once into the stream; the database above has each once), and the first
        # publication of every event is in the order of the log_* calls.
        assert list(dict.fromkeys(published)) == first["ids"] + second


async def test_a_full_outbox_refuses_loudly_drops_nothing_and_recovers(
    outbox_settings: Settings,
    own_redis: OwnRedis,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ingestd.producer.storage")
    settings = outbox_settings.replace(
        **{
            "storage.outbox.max_bytes": 16 * 1024,
            "storage.outbox.segment_bytes": 4096,
            # A memory bound far below the outage: the disk outbox, not memory, holds the events.
            "storage.buffer_max_events": 5,
        }
    )
    storage = create_storage(settings, producer="paper")
    assert isinstance(storage, PostgresStorage)
    own_redis.stop()
    accepted: list[str] = []
    refused: list[OutboxFull] = []
    for i in range(500):
        try:
            accepted.append(storage.log_spread(spread(i)))
        except OutboxFull as exc:
            refused.append(exc)
    assert accepted and len(refused) == 500 - len(accepted)
    assert "max_bytes=16384" in str(refused[0])
    notes = getattr(refused[0], "__notes__", [])
    assert any(note.startswith("event_id paper-") and "not logged" in note for note in notes)
    state = storage.outbox_state()
    assert state.alarm and state.refused == len(refused)
    for _ in range(600):  # the publisher has met the outage (it tried at the first event)
        if not storage.outbox_state().publishing:
            break
        await asyncio.sleep(0.05)
    assert not storage.outbox_state().publishing
    assert state.pending_events == len(accepted) and state.disk_bytes <= 16 * 1024
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "nothing is dropped" in errors[0].getMessage()  # once
    own_redis.start()
    async with Service(settings):
        await asyncio.to_thread(storage.flush, 60)
        assert not storage.outbox_state().alarm and storage.outbox_state().publishing
        accepted.append(storage.log_spread(spread(1000)))  # taken again
        await asyncio.to_thread(storage.close)
        want = len(accepted)
        assert await wait_count(db, "SELECT count(*) FROM spreads", want) == want
        await asyncio.sleep(0.3)
        ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM spreads")}
        assert ids == set(accepted)  # every accepted event once, no refused one
    assert stream_event_ids(own_redis.url, settings.stream.key) == accepted


async def test_async_storage_keeps_an_outage_on_disk_across_a_close(
    outbox_settings: Settings,
    own_redis: OwnRedis,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ingestd.producer.storage")
    own_redis.stop()
    # fsync before every log_* returns: the asyncio storage does it off the event loop.
    outbox_settings = outbox_settings.replace(**{"storage.outbox.fsync_interval_s": 0})
    storage = create_async_storage(outbox_settings, producer="live")
    assert isinstance(storage, AsyncPostgresStorage)
    ids = [await storage.log_position_open(position("pos_a1"))]
    ids += [await storage.log_spread(spread(i)) for i in range(300)]
    await storage.aclose(grace_s=0.5)  # not raised: the events are on disk, not lost
    assert any("kept in outbox" in r.getMessage() for r in caplog.records)
    own_redis.start()
    async with Service(outbox_settings):
        again = create_async_storage(outbox_settings, producer="live")
        await again.flush()  # the earlier run's events first
        await again.aclose()
        assert await wait_count(db, "SELECT count(*) FROM spreads", 300) == 300
        await asyncio.sleep(0.3)
        assert await db.fetchval("SELECT count(*) FROM spreads") == 300
        assert await db.fetchval("SELECT count(*) FROM positions") == 1
    assert stream_event_ids(own_redis.url, outbox_settings.stream.key) == ids
