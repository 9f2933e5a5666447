"""Feeds and probes shared by the suites: simulated events, producers feeding a Service, and
waits on rows, acknowledgements and conditions."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import redis

from ingestd import Outcome, Service
from ingestd.settings import Settings
from ingestd.tools.simulate import Simulator
from tests.daemons import run_cli

# A day back, to the hour: recent enough that no retention (90 days and more) ever applies to
# the test data, and fixed for the whole session so that producers and ledgers agree.
START = (
    (dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    .replace(minute=0, second=0, microsecond=0)
    .isoformat()
)


def simulated(count: int, seed: int) -> list[dict[str, Any]]:
    """The exact events ``ingestd simulate --count N --seed S --start START`` publishes."""
    sim = Simulator(
        seed=seed, symbols=("BTC", "ETH", "XRP"), start=dt.datetime.fromisoformat(START)
    )
    return list(itertools.islice(sim.events(), count))


def publish_from_other_process(settings: Settings, count: int, seed: int) -> None:
    """``ingestd simulate`` in its own process: XADDs ``count`` events and exits."""
    done = run_cli(
        settings,
        "simulate",
        "--count",
        str(count),
        "--seed",
        str(seed),
        "--rate",
        "0",
        "--start",
        START,
        # The feed is compared with simulated(): no trading:state may hold its positions back.
        "--ignore-trading-state",
    )
    assert done.returncode == 0, done.stderr


def published_feed(settings: Settings, count: int, seed: int) -> list[dict[str, Any]]:
    """The feed ``ingestd simulate`` publishes in its own process (``publish_from_other_process``):
    the events it sent, as ``simulated`` gives them, for the ledger to judge."""
    publish_from_other_process(settings, count, seed)
    return simulated(count, seed)


async def wait_for_rows(dsn: str, table: str, at_least: int, timeout: float = 120.0) -> int:
    """Poll until ``table`` has at least ``at_least`` rows."""
    conn = await asyncpg.connect(dsn)
    try:
        end = time.monotonic() + timeout
        while True:
            n = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            if n >= at_least:
                return n
            if time.monotonic() > end:
                raise AssertionError(f"{table}: {n} rows after {timeout}s, wanted {at_least}")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def wait_count(conn: asyncpg.Connection, sql: str, want: int, timeout: float = 30) -> int:
    """Poll ``sql`` (a count) until it reaches ``want``; return the last value."""
    end = time.monotonic() + timeout
    n = -1
    while time.monotonic() < end:
        n = int(await conn.fetchval(sql))
        if n >= want:
            return n
        await asyncio.sleep(0.05)
    return n


def pending(client: redis.Redis) -> int:
    """Entries delivered to the group but not acknowledged."""
    summary: Any = client.xpending("ingestd:events", "ingestd")
    return int(summary["pending"])


async def wait_until_acknowledged(client: redis.Redis, timeout: float) -> None:
    """Wait until the group has acknowledged every entry delivered to it; assert that it has
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pending(client) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pending(client) == 0


def chunks(events: Sequence[dict[str, Any]], n: int) -> list[Sequence[dict[str, Any]]]:
    """``events`` cut into consecutive slices of ``n`` (the last may be shorter)."""
    return [events[i : i + n] for i in range(0, len(events), n)]


async def produce(
    service: Service, events: Sequence[dict[str, Any]], *, producers: int = 4, chunk: int = 50
) -> collections.Counter[Outcome]:
    """Several producer tasks, each submitting its share a tick's worth at a time."""
    outcomes: collections.Counter[Outcome] = collections.Counter()
    parts = chunks(events, chunk)

    async def one(mine: list[Sequence[dict[str, Any]]]) -> None:
        for part in mine:
            outcomes.update(await service.submit_many(part))

    await asyncio.gather(*(one(parts[i::producers]) for i in range(producers)))
    return outcomes


async def watch_queue(service: Service, peak: list[int]) -> None:
    """Record the largest queue depth seen (the in-memory bound must hold)."""
    assert service.pipeline is not None
    while True:
        peak[0] = max(peak[0], len(service.pipeline.queue))
        await asyncio.sleep(0.005)


async def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    """Poll ``predicate()`` until it is true; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)
