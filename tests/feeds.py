"""Feeds and probes shared by the end-to-end and fault suites."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from typing import Any

import asyncpg
import redis

from ingestd.settings import Settings
from ingestd.tools.simulate import Simulator
from tests.e2e.conftest import run_cli

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
