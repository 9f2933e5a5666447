"""trading:state through real outages: the database refusing connections, Redis stopped, an
operator's halt through the real CLI, two replicas, and heartbeats that do not wait on the
database. Every wait polls with a deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Service, trading
from ingestd.producer.storage import RedisCacheStorage
from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from tests.commands import run_ingestd, servers_env
from tests.faults.conftest import FaultServers
from tests.trading_watch import redis_client, states_until, wait_state

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]

# Short limits so that the whole cycle (HALTED, recovering, ACTIVE) takes seconds.
SHORT = {
    "trading.interval_s": 0.2,
    # Generous against a loaded machine: a writer late by a lease is replaced, not wrong.
    "trading.lease_s": 1.5,
    "trading.state_ttl_s": 4.0,
    "trading.recover_after_s": 1.5,
    "trading.max_commit_failing_s": 1.0,
    "trading.max_heartbeat_age_s": 3.0,
    "trading.max_fx_age_s": 3.0,
}

_ids = itertools.count()


def short(settings: Settings, **more: Any) -> Settings:
    return settings.replace(**{**SHORT, **more})


async def feed_collector(
    url: str,
    stream: str,
    stop: asyncio.Event,
    *,
    fx: Callable[[], bool] = lambda: True,
    every_s: float = 0.1,
) -> None:
    """A live collector: a heartbeat and (while ``fx()``) a USDKRW rate every ``every_s``,
    published to the stream until ``stop`` is set; publishing errors (Redis down) are ridden
    out. It ends on ``stop``, not on a cancellation: redis-py can turn a cancellation that
    arrives during a command into a ConnectionError, which this loop rides out like any other,
    so a cancelled feed could go on forever and the test that awaited it hang."""
    client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        while not stop.is_set():
            now = utc_iso(dt.datetime.now(dt.UTC))
            n = next(_ids)
            batch = [
                {
                    "type": "heartbeat",
                    "event_id": f"hb-{os.getpid()}-{n}",
                    "producer": "collector",
                    "component": "collector",
                    "timestamp": now,
                }
            ]
            if fx():
                batch.append(
                    {
                        "type": "fx_rate",
                        "event_id": f"fx-{os.getpid()}-{n}",
                        "producer": "collector",
                        "pair": "USDKRW",
                        "rate": "1385.50",
                        "timestamp": now,
                    }
                )
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                for ev in batch:
                    await client.xadd(stream, {"event": orjson.dumps(ev)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def collector(settings: Settings, **kwargs: Any) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        feed_collector(settings.storage.redis.url, settings.stream.key, stop, **kwargs)
    )
    try:
        yield
    finally:
        stop.set()
        # Bounded: one publish (socket timeouts of 1 s) and the close.
        await asyncio.wait_for(task, timeout=10)


async def test_database_refusing_connections_halts_and_hysteresis_brings_back_active(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    settings = short(fault_settings)
    client = redis_client(settings)
    async with Service(settings) as service, collector(settings):
        await wait_state(client, trading.State.ACTIVE)
        await asyncio.to_thread(fault_servers.pg.stop)
        halted = await wait_state(client, trading.State.HALTED, reason="commits failing")
        assert any("fault-1" in r for r in halted.reasons)
        # The database is down, yet the collector is visibly alive: health:collector moves on.
        first = client.get("health:collector")
        assert first is not None
        deadline = time.monotonic() + 10
        while client.get("health:collector") == first:
            assert time.monotonic() < deadline, "health:collector did not move during the outage"
            await asyncio.sleep(0.05)
        beat = dt.datetime.fromisoformat(client.get("health:collector").decode())  # type: ignore[union-attr]
        assert dt.datetime.now(dt.UTC) - beat < dt.timedelta(seconds=3)
        assert service.pipeline is not None and service.pipeline.failing
        await asyncio.to_thread(fault_servers.pg.start)
        seen = await states_until(client, trading.State.ACTIVE)
        # Back through hysteresis: HALTED with "recovering" first, never a jump straight back.
        assert any(
            s.state is trading.State.HALTED and s.reasons[0].startswith("recovering") for s in seen
        ), seen
        assert service.trading is not None
        assert service.trading.transitions[("HALTED", "ACTIVE")] >= 1
        assert service.trading.transitions[("ACTIVE", "HALTED")] >= 1
    client.close()


async def test_ingest_lag_past_its_limit_halts(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    settings = short(
        fault_settings,
        **{"trading.max_commit_failing_s": 3600.0, "trading.max_ingest_lag_s": 1.0},
    )
    client = redis_client(settings)
    async with Service(settings), collector(settings):
        await wait_state(client, trading.State.ACTIVE)
        await asyncio.to_thread(fault_servers.pg.stop)
        current = await wait_state(client, trading.State.HALTED, reason="ingest lag")
        assert not any("commits failing" in r for r in current.reasons)
        await asyncio.to_thread(fault_servers.pg.start)
        await wait_state(client, trading.State.ACTIVE)
    client.close()


async def test_redis_stopped_the_key_expires_readers_see_halted_and_it_comes_back(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    settings = short(fault_settings)
    client = redis_client(settings)
    cache = RedisCacheStorage(settings)
    async with Service(settings) as service, collector(settings):
        await wait_state(client, trading.State.ACTIVE)
        assert cache.trading_state().state is trading.State.ACTIVE
        assert not cache.is_trading_halted()
        await asyncio.to_thread(fault_servers.redis.stop)
        # Unreachable counts as halted for a producer.
        assert cache.is_trading_halted()
        assert "cannot read" in cache.trading_state().reasons[0]
        # Down longer than the key's TTL: when Redis returns, the key has expired.
        await asyncio.sleep(SHORT["trading.state_ttl_s"] + 0.5)
        await asyncio.to_thread(fault_servers.redis.start)
        seen = await states_until(client, trading.State.ACTIVE)
        # The writer starts again from HALTED (absent = HALTED) and waits out the hysteresis.
        assert seen[0].state is trading.State.HALTED, seen
        assert any(s.reasons and s.reasons[0].startswith("recovering") for s in seen), seen
        assert service.trading is not None and service.trading.leader
    cache.close()
    client.close()


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ingestd(servers_env(settings), *args, timeout=60)


async def test_operator_halt_through_the_cli_survives_a_restart_until_resume(
    fault_settings: Settings,
) -> None:
    settings = short(fault_settings)
    client = redis_client(settings)
    async with collector(settings):
        async with Service(settings):
            await wait_state(client, trading.State.ACTIVE)
            done = await asyncio.to_thread(run_cli, settings, "halt", "--reason", "exchange audit")
            assert done.returncode == 0, done.stderr
            halted = await wait_state(client, trading.State.HALTED, reason="exchange audit")
            assert any("halted by operator" in r for r in halted.reasons)
            shown = await asyncio.to_thread(run_cli, settings, "trading-state")
            assert shown.returncode == 3, shown
            assert "exchange audit" in shown.stdout
        # ingestd stopped: the key expires (absent = HALTED), and after a start it is still
        # the operator's halt that holds it.
        await wait_state(client, trading.State.HALTED, reason="absent")
        async with Service(settings):
            await wait_state(client, trading.State.HALTED, reason="exchange audit")
            done = await asyncio.to_thread(run_cli, settings, "resume")
            assert done.returncode == 0, done.stderr
            assert "exchange audit" in done.stdout
            await wait_state(client, trading.State.ACTIVE)
            shown = await asyncio.to_thread(run_cli, settings, "trading-state")
            assert shown.returncode == 0, shown
            assert shown.stdout.startswith("ACTIVE")
            again = await asyncio.to_thread(run_cli, settings, "resume")
            assert again.returncode == 0 and "nothing changed" in again.stdout
    client.close()


async def test_two_replicas_one_writer_and_a_takeover_keeps_the_state(
    fault_settings: Settings,
) -> None:
    one = short(fault_settings)
    two = one.replace(**{"stream.consumer": "fault-2"})
    client = redis_client(one)
    async with collector(one):
        first = Service(one)
        await first.start()
        try:
            async with Service(two) as second:
                active = await wait_state(client, trading.State.ACTIVE)
                # One state, not two replicas fighting over the key: while both run, the state
                # and its since stay as they are, read after read.
                for _ in range(40):
                    current = trading.read_trading_state(client)
                    assert (current.state, current.since) == (active.state, active.since)
                    await asyncio.sleep(0.05)
                holder = client.get(trading.LEADER_KEY)
                assert holder in (b"fault-1", b"fault-2")
                leader, follower = (first, second) if holder == b"fault-1" else (second, first)
                # A replica that does not hold the lease cannot write, whatever it computes.
                outsider_client = aioredis.Redis.from_url(one.storage.redis.url)
                outsider = trading.StateKeeper(
                    outsider_client,
                    trading.Limits(interval_s=0.2, lease_s=1.5, state_ttl_s=4.0),
                    replica="fault-3",
                    local=lambda: trading.LocalReport(failing_s=None, lag_s=None),
                )
                assert await outsider.tick() is None
                assert not outsider.leader
                await outsider_client.aclose()
                client.hdel(trading.REPORTS_KEY, "fault-3")
                await leader.stop()
                deadline = time.monotonic() + 30
                while client.get(trading.LEADER_KEY) != follower.settings.consumer_name.encode():
                    assert time.monotonic() < deadline, "no takeover"
                    await asyncio.sleep(0.05)
                # The successor adopted the state: still ACTIVE since the same moment, and it
                # made no transition of its own.
                deadline = time.monotonic() + 30
                while not (follower.trading and follower.trading.published_state):
                    assert time.monotonic() < deadline, "the successor never wrote"
                    await asyncio.sleep(0.05)
                current = await wait_state(client, trading.State.ACTIVE)
                assert current.since == active.since
                assert follower.trading is not None
                assert sum(follower.trading.transitions.values()) == 0
        finally:
            await first.stop()
    client.close()


async def test_a_follower_with_failing_commits_halts_the_state_the_leader_writes(
    fault_settings: Settings,
) -> None:
    one = short(fault_settings)
    client = redis_client(one)
    async with collector(one), Service(one) as leader:
        await wait_state(client, trading.State.ACTIVE)
        assert leader.trading is not None and leader.trading.leader
        # A second replica reports commit failures (what its own keeper reports each tick).
        follower_client = aioredis.Redis.from_url(one.storage.redis.url)
        follower = trading.StateKeeper(
            follower_client,
            trading.Limits(interval_s=0.2, lease_s=1.5, state_ttl_s=4.0),
            replica="fault-2",
            local=lambda: trading.LocalReport(failing_s=5.0, lag_s=None),
        )
        await follower.tick()
        assert not follower.leader
        await wait_state(client, trading.State.HALTED, reason="commits failing for 5s on fault-2")
        # Once it stops reporting (gone), its report no longer counts.
        await wait_state(client, trading.State.ACTIVE)
        await follower_client.aclose()
    client.close()


async def test_half_hedge_alert_keys_make_it_reducing(fault_settings: Settings) -> None:
    settings = short(fault_settings)
    client = redis_client(settings)
    async with Service(settings), collector(settings):
        await wait_state(client, trading.State.ACTIVE)
        client.set("alerts:half_hedge:pos-1", b'{"position_key": "pos-1"}')
        client.set("alerts:half_hedge:pos-2", b'{"position_key": "pos-2"}')
        current = await wait_state(client, trading.State.REDUCING)
        assert current.reasons == ("2 half-hedged position(s) open",)
        client.delete("alerts:half_hedge:pos-1", "alerts:half_hedge:pos-2")
        await wait_state(client, trading.State.ACTIVE)
    client.close()


async def test_stale_usdkrw_or_collector_heartbeat_halts(fault_settings: Settings) -> None:
    settings = short(fault_settings)
    client = redis_client(settings)
    fx_on = True
    async with Service(settings), collector(settings, fx=lambda: fx_on):
        await wait_state(client, trading.State.ACTIVE)
        fx_on = False
        current = await wait_state(client, trading.State.HALTED, reason="USDKRW rate")
        assert not any("heartbeat" in r for r in current.reasons)
        fx_on = True
        await wait_state(client, trading.State.ACTIVE)
    # The collector has stopped: its heartbeat goes stale.
    async with Service(settings):
        await wait_state(client, trading.State.HALTED, reason="collector")
    client.close()
