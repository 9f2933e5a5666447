"""trading:state end to end: the real ``ingestd run`` daemon fed by the real ``ingestd simulate``
(with a fault scenario, or with the database or Redis taken away under it), read as a trader reads
it. Short limits in the daemon's configuration keep each cycle (fault, HALTED or REDUCING, back to
ACTIVE) within seconds; every wait polls with a deadline and nothing asserts how long it took.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from ingestd import trading
from ingestd.producer.publisher import AsyncPublisher
from ingestd.settings import Settings
from tests.daemons import Daemon, ingestd_env
from tests.faults.conftest import FAULT_CONFIG, FaultServers
from tests.trading_watch import redis_client, states_until, wait_state

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]

# The daemon's configuration: the fault suite's short deadlines plus short trading limits.
DAEMON_CONFIG = (
    FAULT_CONFIG
    + """\
trading:
  interval_s: 0.2
  lease_s: 1.5
  state_ttl_s: 4
  recover_after_s: 1.5
  max_commit_failing_s: 1
  max_heartbeat_age_s: 3
  max_fx_age_s: 3
half_hedge:
  after_s: 1
  check_interval_s: 0.2
heartbeat_history:
  gap_s: 3
  flush_interval_s: 0.5
"""
)

Simulate = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def simulate(tmp_path: Path) -> Iterator[Simulate]:
    """Factory: start ``ingestd simulate`` subprocesses (paced to the wall clock, so event time
    is real time); every one is stopped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"simulate-{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "ingestd.cli", "simulate"),
                *("--rate", "100", "--duration", "300", *args),
            ],
            env=ingestd_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def scenario(name: str, *, after_s: int, for_s: int) -> tuple[str, ...]:
    """The simulator's arguments for fault scenario ``name``: from ``after_s`` for ``for_s``."""
    return (
        *("--scenario", name),
        *("--scenario-after", str(after_s)),
        *("--scenario-duration", str(for_s)),
    )


async def daemon_and_feed(
    start_daemon: Any, simulate: Simulate, settings: Settings, *simulate_args: str
) -> tuple[redis.Redis, Daemon, subprocess.Popen[bytes]]:
    """A client reading trading:state as a trader does, the daemon (started, with the short
    trading limits) and then the simulator's feed (with ``simulate_args``)."""
    client = redis_client(settings)
    run: Daemon = start_daemon(settings, "fault-1", config_yaml=DAEMON_CONFIG)
    await run.wait_for_log("ingestd started")
    return client, run, simulate(settings, *simulate_args)


async def test_collector_pause_halts_and_the_state_comes_back_active(
    fault_settings: Settings, start_daemon: Any, simulate: Simulate
) -> None:
    client, _, _ = await daemon_and_feed(
        start_daemon, simulate, fault_settings, *scenario("collector-pause", after_s=4, for_s=8)
    )
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    halted = await wait_state(client, trading.State.HALTED, reason="collector", timeout=60)
    assert any("heartbeat" in r for r in halted.reasons), halted
    seen = await states_until(client, trading.State.ACTIVE, timeout=60)
    assert any(s.reasons and s.reasons[0].startswith("recovering") for s in seen), seen
    # The pause is in the heartbeat history: the collector was alive, then not, then again.
    async with asyncio.timeout(30):
        while True:
            conn = await asyncpg.connect(fault_settings.storage.postgres.dsn)
            try:
                alive = await conn.fetch(
                    "SELECT alive_from, alive_until FROM component_liveness"
                    " WHERE component = 'collector' ORDER BY alive_from"
                )
            finally:
                await conn.close()
            if len(alive) >= 2:
                break
            await asyncio.sleep(0.5)
    pause = alive[1]["alive_from"] - alive[0]["alive_until"]
    assert dt.timedelta(seconds=6) <= pause <= dt.timedelta(seconds=12), alive
    client.close()


async def test_fx_stale_halts_on_the_rate_alone_and_comes_back_active(
    fault_settings: Settings, start_daemon: Any, simulate: Simulate
) -> None:
    client, _, _ = await daemon_and_feed(
        start_daemon, simulate, fault_settings, *scenario("fx-stale", after_s=4, for_s=6)
    )
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    halted = await wait_state(client, trading.State.HALTED, reason="USDKRW", timeout=60)
    assert not any("heartbeat" in r for r in halted.reasons), halted
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    client.close()


async def test_a_dropped_hedge_leg_makes_it_reducing_until_the_leg_is_logged(
    fault_settings: Settings, start_daemon: Any, simulate: Simulate
) -> None:
    client, _, _ = await daemon_and_feed(
        start_daemon, simulate, fault_settings, *scenario("drop-hedge-leg", after_s=3, for_s=30)
    )
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    reducing = await wait_state(client, trading.State.REDUCING, reason="half-hedged", timeout=60)
    assert reducing.reasons == ("1 half-hedged position(s) open",), reducing
    (key,) = client.keys("alerts:half_hedge:*")
    alert = orjson.loads(client.get(key) or b"null")
    # The simulator's paper trader: whose position it is, in which book.
    assert alert["producer"] == "paper" and alert["mode"] == "paper", alert
    assert alert["filled_venue"] == "upbit" and alert["other_venue"] == "binance_futures"
    # The trader logs the missing leg, as docs/for-traders.md says: the alert clears.
    publisher = AsyncPublisher.from_url(
        fault_settings.storage.redis.url, stream=fault_settings.stream.key
    )
    try:
        await publisher.publish_many(
            [
                {
                    "type": "order",
                    "event_id": f"fix-{alert['position_key']}",
                    "producer": "paper",
                    "mode": "paper",
                    "position_key": alert["position_key"],
                    "symbol": alert["symbol"],
                    "venue": "binance_futures",
                    "side": "buy",
                    # What the other venue lacks (the position may have closed meanwhile: its
                    # closing legs are on both venues).
                    "qty": str(Decimal(alert["quantity"]) - Decimal(alert["other_quantity"])),
                    "price_theoretical": "100",
                    "price_effective": "100",
                    "leg_id": f"{alert['position_key']}_leg_1_fix",
                    "timestamp": dt.datetime.now(dt.UTC).isoformat(),
                }
            ]
        )
    finally:
        await publisher.aclose()
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    assert client.get(key) is None
    client.close()


async def test_the_database_refusing_connections_under_the_daemon_and_the_simulator(
    fault_settings: Settings,
    fault_servers: FaultServers,
    start_daemon: Any,
    simulate: Simulate,
) -> None:
    client, _, _ = await daemon_and_feed(start_daemon, simulate, fault_settings)
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    await asyncio.to_thread(fault_servers.pg.stop)
    down_at = dt.datetime.now(dt.UTC)
    halted = await wait_state(client, trading.State.HALTED, reason="commits failing", timeout=60)
    assert any("fault-1" in r for r in halted.reasons), halted
    # The collector stays visibly alive meanwhile (its heartbeat is written at intake).
    assert not any("collector" in r for r in halted.reasons), halted
    await asyncio.sleep(3)  # heartbeats taken in while the database is down
    up_at = dt.datetime.now(dt.UTC)
    await asyncio.to_thread(fault_servers.pg.start)
    seen = await states_until(client, trading.State.ACTIVE, timeout=90)
    assert any(s.reasons and s.reasons[0].startswith("recovering") for s in seen), seen
    # The heartbeat history has the collector alive throughout the outage: the heartbeats taken
    # in meanwhile waited in memory and were written when the database came back.
    conn = await asyncpg.connect(fault_settings.storage.postgres.dsn)
    try:
        covering = await conn.fetchval(
            "SELECT count(*) FROM component_liveness WHERE component = 'collector'"
            " AND alive_from <= $1 AND alive_until >= $2",
            down_at,
            up_at,
        )
    finally:
        await conn.close()
    assert covering == 1
    client.close()


async def test_redis_stopped_under_the_daemon_and_the_simulator(
    fault_settings: Settings,
    fault_servers: FaultServers,
    start_daemon: Any,
    simulate: Simulate,
) -> None:
    client, run, feed = await daemon_and_feed(start_daemon, simulate, fault_settings)
    await wait_state(client, trading.State.ACTIVE, timeout=60)
    await asyncio.to_thread(fault_servers.redis.stop)
    # A trader cannot read the state: HALTED, as the producer API says.
    assert trading.read_trading_state(client).halted
    await asyncio.sleep(5)  # longer than the key's TTL: it is gone when Redis returns
    await asyncio.to_thread(fault_servers.redis.start)
    if feed.poll() is not None:
        # The simulator gives up when its Redis goes away (a producer would reconnect): the feed
        # starts again, as it would in production.
        simulate(fault_settings, "--seed", "2")
    seen = await states_until(client, trading.State.ACTIVE, timeout=90)
    assert seen[0].state is trading.State.HALTED, seen
    assert run.proc.poll() is None, run.log
    client.close()
