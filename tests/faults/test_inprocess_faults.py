"""In-process producers through database outages: backpressure, the spool, and replay.

The producers here are ``Service.submit_many`` callers in the test process (and, for the crash
test, in a child process that is SIGKILLed with a spooled backlog). The database is the fault
suite's own PostgreSQL, stopped, frozen and locked for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from ingestd import Outcome, Service
from ingestd.daemon import migrations
from ingestd.settings import Settings
from ingestd.spool import DATABASE_FILE
from tests.commands import REPO_ROOT
from tests.faults.conftest import FaultServers
from tests.feeds import produce, simulated, wait_until, watch_queue
from tests.ledger import Expected, wait_until_landed_exactly_once

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]


async def test_long_outage_spills_to_the_spool_and_replays_exactly_once(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    settings = fault_settings.replace(
        **{
            "spool.directory": str(spool_dir),
            "spool.segment_bytes": 256 * 1024,
            "spool.spill_after_s": 0.5,
            "pipeline.queue_max_events": 2_000,
            "pipeline.batch_max_rows": 500,
        }
    )
    sent = simulated(20_000, seed=31)
    exp = Expected.of(sent)
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None and service.pipeline is not None
        peak = [0]
        watcher = asyncio.create_task(watch_queue(service, peak))
        await asyncio.to_thread(fault_servers.pg.stop, "fast")
        outcomes = await produce(service, sent)
        # Every event was accepted while the database was down: none waited for it.
        assert sum(outcomes.values()) == len(sent)
        assert outcomes[Outcome.SPOOLED] > len(sent) - 2_000
        assert service.spool.pending_records >= outcomes[Outcome.SPOOLED]
        # Several checkpoints' worth: the log was copied into the database file as it went.
        assert service.spool.size_bytes > 3 * 256 * 1024
        assert peak[0] <= 2_000 + 50  # the in-memory bound held (a chunk may overshoot it)
        await asyncio.to_thread(fault_servers.pg.start)
        await wait_until_landed_exactly_once(settings.storage.postgres.dsn, exp)
        await wait_until(lambda: service.spool is not None and service.spool.pending_records == 0)
        watcher.cancel()
        assert peak[0] <= 2_000 + 500  # the replay, too, goes through the bounded queue
    # Replayed and committed: the spool is empty again, on disk too.
    with contextlib.closing(sqlite3.connect(spool_dir / DATABASE_FILE)) as db:
        assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


async def test_spool_full_falls_back_to_backpressure_and_loses_nothing(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    settings = fault_settings.replace(
        **{
            "spool.directory": str(tmp_path / "spool"),
            "spool.max_bytes": 256 * 1024,  # room for a few hundred events only
            "spool.segment_bytes": 64 * 1024,
            "spool.spill_after_s": 0.2,
            "pipeline.queue_max_events": 1_000,
            "pipeline.batch_max_rows": 500,
        }
    )
    sent = simulated(6_000, seed=32)
    exp = Expected.of(sent)
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None and service.pipeline is not None
        await asyncio.to_thread(fault_servers.pg.stop, "fast")
        producing = asyncio.create_task(produce(service, sent, producers=2))
        await wait_until(
            lambda: service.pipeline is not None and service.pipeline.metrics.spool_rejections > 0
        )
        await asyncio.sleep(1.0)
        # The spool is full and memory is bounded: the producers wait (backpressure).
        assert not producing.done()
        assert service.spool.size_bytes <= 256 * 1024
        assert len(service.pipeline.queue) <= 1_000 + 50
        await asyncio.to_thread(fault_servers.pg.start)
        outcomes = await asyncio.wait_for(producing, timeout=120)
        assert sum(outcomes.values()) == len(sent)
        assert outcomes[Outcome.SPOOLED] > 0 and outcomes[Outcome.COMMITTED] > 0
        await wait_until_landed_exactly_once(settings.storage.postgres.dsn, exp)
        await wait_until(lambda: service.spool is not None and service.spool.pending_records == 0)


async def test_a_producer_started_during_an_outage_spools_at_once_and_replays_when_it_ends(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    # The database is down before the producer starts, and stays down across a restart of it:
    # the spool takes every event from the first moment, and the backlog of the earlier run is
    # found and kept; when the database answers, all of it lands, exactly once.
    spool_dir = tmp_path / "spool"
    settings = fault_settings.replace(
        **{
            "spool.directory": str(spool_dir),
            "spool.spill_after_s": 0.3,
            "pipeline.queue_max_events": 1_000,
            "pipeline.batch_max_rows": 250,
            "shutdown.grace_s": 2.0,
        }
    )
    sent = simulated(3_000, seed=35)
    first, second = sent[:1_500], sent[1_500:]
    await asyncio.to_thread(fault_servers.pg.stop, "fast")
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None and service.pool is None  # started without it
        outcomes = await produce(service, first)
        assert outcomes == {Outcome.SPOOLED: len(first)}
        assert service.spool.pending_records == len(first)
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None
        assert service.spool.pending_records == len(first)  # the earlier run's backlog
        outcomes = await produce(service, second)
        assert outcomes == {Outcome.SPOOLED: len(second)}
        await asyncio.to_thread(fault_servers.pg.start)
        await wait_until_landed_exactly_once(settings.storage.postgres.dsn, Expected.of(sent))
        await wait_until(lambda: service.spool is not None and service.spool.pending_records == 0)
        assert service.pool is not None  # connected in the background once it answered


async def test_before_the_database_ever_answered_events_go_to_the_spool_at_once(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    # An event is held in memory for spill_after_s only where a commit may come soon; before the
    # database has ever answered none can, so every event goes to the spool at once (with an
    # hour's spill_after_s here, waiting in memory would hold the producer for an hour).
    settings = fault_settings.replace(
        **{"spool.directory": str(tmp_path / "spool"), "spool.spill_after_s": 3600.0}
    )
    sent = simulated(300, seed=37)
    await asyncio.to_thread(fault_servers.pg.stop, "fast")
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None and service.pipeline is not None
        outcomes = await asyncio.wait_for(service.submit_many(sent), timeout=60)
        assert outcomes == [Outcome.SPOOLED] * len(sent)
        assert len(service.pipeline.queue) == 0  # nothing waits in memory meanwhile
        await asyncio.to_thread(fault_servers.pg.start)
        await wait_until_landed_exactly_once(settings.storage.postgres.dsn, Expected.of(sent))
        await wait_until(lambda: service.spool is not None and service.spool.pending_records == 0)


async def test_a_schema_behind_found_after_a_deferred_start_keeps_events_spooled(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    # A start that does not wait for the database cannot refuse a schema that is behind at
    # once: it finds it when the database answers, says so, and writes nothing until the
    # schema is current; the events wait on the spool meanwhile, and then land once.
    settings = fault_settings.replace(
        **{"spool.directory": str(tmp_path / "spool"), "spool.spill_after_s": 0.3}
    )
    dsn = settings.storage.postgres.dsn
    conn = await asyncpg.connect(dsn)
    try:
        # The newest migration's record taken away: the schema looks one migration behind.
        latest = await conn.fetchrow(
            f"DELETE FROM {migrations.LEDGER_TABLE} WHERE version = "
            f"(SELECT max(version) FROM {migrations.LEDGER_TABLE}) RETURNING *"
        )
    finally:
        await conn.close()
    assert latest is not None
    sent = simulated(400, seed=36)
    async with Service(settings, stream_intake=False) as service:
        assert service.spool is not None
        outcomes = await produce(service, sent)
        assert outcomes == {Outcome.SPOOLED: len(sent)}
        await wait_until(lambda: service.database_error is not None)
        assert "ingestd migrate" in str(service.database_error)
        assert service.pool is None and service.spool.pending_records == len(sent)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM spreads") == 0
            # The operator migrates (the schema objects are there: only the record was gone).
            await conn.execute(
                f"INSERT INTO {migrations.LEDGER_TABLE} (version, name, checksum, applied_at) "
                "VALUES ($1, $2, $3, $4)",
                *latest.values(),
            )
        finally:
            await conn.close()
        await wait_until_landed_exactly_once(dsn, Expected.of(sent))
        await wait_until(lambda: service.spool is not None and service.spool.pending_records == 0)
        assert service.database_error is None


# A producer process that spools a backlog while the database is down and is then SIGKILLed:
# what it was told is spooled must land after a restart, exactly once.
PRODUCER = textwrap.dedent(
    """
    import asyncio, collections, json, os, signal, sys
    from ingestd import Service, load_settings
    from tests.feeds import produce, simulated, wait_until, watch_queue

    async def main(spool_dir, phase):
        settings = load_settings(None, overrides={
            "spool.directory": spool_dir, "spool.segment_bytes": 128 * 1024,
            "spool.spill_after_s": 0.3, "pipeline.queue_max_events": 1000,
            "pipeline.batch_max_rows": 500,
            "pipeline.batch_max_age_ms": 50, "metrics_port": 0,
            "storage.postgres.command_timeout_s": 3.0, "pipeline.flush_timeout_s": 6.0,
            "pipeline.backoff_cap_s": 1.0})
        async with Service(settings, stream_intake=False) as service:
            if phase == "replay":
                while service.spool.pending_records:
                    await asyncio.sleep(0.05)
                print(json.dumps({"replayed": service.spool.replayed}), flush=True)
                return
            print("started", flush=True)
            sys.stdin.readline()  # the test stops the database, then says go
            outcomes = collections.Counter()
            events = simulated(8000, seed=33)
            for i in range(0, len(events), 100):
                for o in await service.submit_many(events[i:i + 100]):
                    outcomes[o.value] += 1
            print(json.dumps(outcomes), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # a crash with the backlog on the spool

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_spooled_backlog_survives_sigkill_and_lands_exactly_once(
    fault_settings: Settings, fault_servers: FaultServers, tmp_path: Path
) -> None:
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
        "DATABASE_URL": fault_settings.storage.postgres.dsn,
        "REDIS_URL": fault_settings.storage.redis.url,
        "PYTHONPATH": str(REPO_ROOT),
    }
    spool_dir = str(tmp_path / "spool")
    proc = subprocess.Popen(  # noqa: ASYNC220 - its pipes are read from a thread
        [sys.executable, str(script), spool_dir, "produce"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "started"
    await asyncio.to_thread(fault_servers.pg.stop, "fast")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    report = json.loads(await asyncio.to_thread(proc.stdout.readline))
    assert await asyncio.to_thread(proc.wait, 60) == -signal.SIGKILL
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    assert report["spooled"] > 6_000  # accepted while the database was down...
    assert sum(report.values()) == 8_000
    await asyncio.to_thread(fault_servers.pg.start)
    # ...and replayed by the next process on the same spool directory.
    replay = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), spool_dir, "replay"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["replayed"] >= report["spooled"]
    await wait_until_landed_exactly_once(
        fault_settings.storage.postgres.dsn, Expected.of(simulated(8_000, seed=33))
    )


async def test_without_a_spool_an_outage_is_backpressure_with_bounded_memory(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    settings = fault_settings.replace(
        **{"pipeline.queue_max_events": 1_000, "pipeline.batch_max_rows": 250}
    )
    sent = simulated(8_000, seed=34)
    exp = Expected.of(sent)
    async with Service(settings, stream_intake=False) as service:
        assert service.pipeline is not None
        peak = [0]
        watcher = asyncio.create_task(watch_queue(service, peak))
        await asyncio.to_thread(fault_servers.pg.stop, "fast")
        producing = asyncio.create_task(produce(service, sent))
        pipeline = service.pipeline
        await wait_until(lambda: pipeline.failing)
        await asyncio.sleep(1.5)
        assert not producing.done()  # producers wait rather than fill memory
        assert peak[0] <= 1_000 + 50
        await asyncio.to_thread(fault_servers.pg.start)
        outcomes = await asyncio.wait_for(producing, timeout=120)
        watcher.cancel()
        assert outcomes == {Outcome.COMMITTED: len(sent)}
        assert peak[0] <= 1_000 + 50
    await wait_until_landed_exactly_once(settings.storage.postgres.dsn, exp)
