"""Faults of PostgreSQL and of ingestd itself, injected for real, judged by the oracle ledger.

Every test publishes a known feed, injects its fault while ingestd works, lets it recover, and
then compares what landed with what was sent: per-table counts, numeric sums and event-id sets,
positions and PnL (tests/ledger.py). Each test also checks that its fault really hit work in
flight, so that none can pass on an idle service.
"""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Any

import asyncpg
import pytest
import redis

from ingestd.settings import Settings
from tests.daemons import Daemon, StartDaemon
from tests.faults.conftest import FAULT_CONFIG, FaultServers
from tests.feeds import (
    pending,
    publish_from_other_process,
    published_feed,
    simulated,
    wait_for_rows,
)
from tests.ledger import Expected, assert_landed_in

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]


def stream_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.storage.redis.url, socket_timeout=5)


def pending_by_consumer(client: redis.Redis) -> dict[bytes, int]:
    """Unacknowledged entries per consumer of the group."""
    infos: Any = client.xinfo_consumers("ingestd:events", "ingestd")
    return {c["name"]: int(c["pending"]) for c in infos}


async def finish_and_check(
    settings: Settings, daemon: Daemon, exp: Expected, *, timeout: float = 120.0
) -> None:
    """Wait for the whole feed, stop with SIGTERM (exit 0), and judge by the ledger."""
    dsn = settings.storage.postgres.dsn
    for table in ("spreads", "fx_rates", "orders", "trades"):
        await wait_for_rows(dsn, table, exp.counts[table], timeout=timeout)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.log
    await assert_landed_in(dsn, exp, no_dead_letters=True)
    assert pending(stream_client(settings)) == 0


async def test_postgres_restarted_mid_copy_loses_and_doubles_nothing(
    fault_settings: Settings, fault_servers: FaultServers, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 60_000, seed=21)
    exp = Expected.of(sent)
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    dsn = fault_settings.storage.postgres.dsn
    for target in (5_000, 20_000):
        await wait_for_rows(dsn, "spreads", target)
        # A crash of the server (no shutdown checkpoint), under load, twice.
        await asyncio.to_thread(fault_servers.pg.restart, "immediate")
    await finish_and_check(fault_settings, daemon, exp)
    assert "flush_retry" in daemon.log  # batches really failed and were retried
    assert "flush_recovered" in daemon.log


async def test_backends_terminated_mid_batch_are_retried_all_or_nothing(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 50_000, seed=22)
    exp = Expected.of(sent)
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    dsn = fault_settings.storage.postgres.dsn
    await wait_for_rows(dsn, "spreads", 2_000)
    killer = await asyncpg.connect(dsn)
    terminated = 0
    try:
        for _ in range(20):
            terminated += len(
                await killer.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'ingestd' AND pid <> pg_backend_pid()"
                )
            )
            await asyncio.sleep(0.2)
    finally:
        await killer.close()
    assert terminated > 0
    await finish_and_check(fault_settings, daemon, exp)
    assert "flush_retry" in daemon.log


async def test_database_down_keeps_entries_pending_and_memory_bounded(
    fault_settings: Settings, fault_servers: FaultServers, start_daemon: StartDaemon
) -> None:
    sent = simulated(40_000, seed=23)
    exp = Expected.of(sent)
    daemon = start_daemon(
        fault_settings, config_yaml=FAULT_CONFIG, QUEUE_MAX_EVENTS="4000", BATCH_MAX_ROWS="1000"
    )
    await daemon.wait_for_log("action=started")
    await asyncio.to_thread(fault_servers.pg.stop, "fast")
    publish_from_other_process(fault_settings, len(sent), seed=23)
    client = stream_client(fault_settings)
    # While the database is down ingestd reads only what its bounded queue holds: the rest
    # stays in the stream (its pending list and backlog are the buffer), not in memory.
    # The queue, one read's overshoot, and three batches (the batcher's and two writers'), each
    # of at most batch_max_rows per table: spreads fill theirs while fx_rates and others add more.
    bound = 4_000 + 2_000 + 3 * 2 * 1_000
    peak = 0
    for _ in range(30):
        peak = max(peak, pending(client))
        await asyncio.sleep(0.1)
    assert 0 < peak <= bound, peak
    assert client.xlen("ingestd:events") == len(sent)
    assert daemon.proc.poll() is None  # ingestd stays up through the outage
    await asyncio.to_thread(fault_servers.pg.start)
    await finish_and_check(fault_settings, daemon, exp)


@pytest.mark.parametrize("point", ["before_copy", "before_commit", "after_commit", "before_ack"])
async def test_sigkill_at_each_crash_point_then_restart_is_exactly_once(
    fault_settings: Settings, start_daemon: StartDaemon, point: str
) -> None:
    sent = published_feed(fault_settings, 20_000, seed=24)
    exp = Expected.of(sent)
    first = start_daemon(fault_settings, config_yaml=FAULT_CONFIG, failpoints=f"{point}=3")
    assert await asyncio.to_thread(first.wait, 60) == -signal.SIGKILL, first.log
    assert f"failpoint {point}: SIGKILL" in first.log
    assert pending(stream_client(fault_settings)) > 0  # the kill hit entries in flight
    second = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)  # same consumer name
    await finish_and_check(fault_settings, second, exp)
    assert "re-read" in second.log  # its own pending entries were delivered again


async def test_sigkill_at_random_moments_is_exactly_once(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 60_000, seed=25)
    exp = Expected.of(sent)
    rng = random.Random(25)
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    client = stream_client(fault_settings)
    redelivered = 0
    for _ in range(3):
        await daemon.wait_for_log("action=started")
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        daemon.signal(signal.SIGKILL)
        assert await asyncio.to_thread(daemon.wait, 10) == -signal.SIGKILL
        redelivered += pending(client)
        daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    assert redelivered > 0
    await daemon.wait_for_log("action=started")  # a SIGTERM before its handlers would kill it
    await finish_and_check(fault_settings, daemon, exp)


async def test_replica_killed_its_entries_are_claimed_by_the_others(
    fault_settings: Settings, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 60_000, seed=26)
    exp = Expected.of(sent)
    claim = {"CLAIM_IDLE_MS": "2000", "CLAIM_INTERVAL_S": "1"}
    replicas = [
        start_daemon(fault_settings, name, config_yaml=FAULT_CONFIG, **claim)
        for name in ("r1", "r2", "r3")
    ]
    dsn = fault_settings.storage.postgres.dsn
    await wait_for_rows(dsn, "spreads", 5_000)
    victim = replicas[1]
    victim.signal(signal.SIGKILL)
    assert await asyncio.to_thread(victim.wait, 10) == -signal.SIGKILL
    client = stream_client(fault_settings)
    consumers = {
        c["name"]: c["pending"] for c in client.xinfo_consumers("ingestd:events", "ingestd")
    }
    assert consumers.get(b"r2", 0) > 0, consumers  # the dead replica held entries in flight
    for table in ("spreads", "fx_rates", "orders", "trades"):
        await wait_for_rows(dsn, table, exp.counts[table])
    # The survivors took over what r2 held.
    for _ in range(100):
        left = {
            c["name"]: c["pending"] for c in client.xinfo_consumers("ingestd:events", "ingestd")
        }
        if left.get(b"r2", 0) == 0:
            break
        await asyncio.sleep(0.1)
    assert left.get(b"r2", 0) == 0, left
    assert any("action=entries_claimed" in r.log for r in (replicas[0], replicas[2]))
    for r in (replicas[0], replicas[2]):
        r.signal(signal.SIGTERM)
    for r in (replicas[0], replicas[2]):
        assert await asyncio.to_thread(r.wait, 30) == 0, r.log
    await assert_landed_in(dsn, exp)
    assert pending(client) == 0
