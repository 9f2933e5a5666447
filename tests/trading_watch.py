"""Watching ``trading:state`` in Redis as a trader's process does: poll until a state comes, or
record every distinct state written on the way to one."""

from __future__ import annotations

import asyncio
import time

import redis

from ingestd import trading
from ingestd.settings import Settings


async def wait_state(
    client: redis.Redis,
    want: trading.State,
    *,
    reason: str | None = None,
    timeout: float = 30.0,
) -> trading.TradingState:
    """Poll trading:state until it is ``want`` (with a reason containing ``reason``)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await asyncio.to_thread(trading.read_trading_state, client)
        if current.state is want and (reason is None or any(reason in r for r in current.reasons)):
            return current
        assert time.monotonic() < deadline, f"wanted {want.value} ({reason}), have {current}"
        await asyncio.sleep(0.05)


async def states_until(
    client: redis.Redis, want: trading.State, timeout: float = 30.0
) -> list[trading.TradingState]:
    """Every distinct state written (by state, since, and whether it is recovering) until
    ``want``; an absent key is left out (it says nothing about what the writer wrote)."""
    seen: list[trading.TradingState] = []
    deadline = time.monotonic() + timeout

    def shape(s: trading.TradingState) -> tuple[object, ...]:
        return (s.state, s.since, bool(s.reasons) and s.reasons[0].startswith("recovering"))

    while True:
        raw = await asyncio.to_thread(client.get, trading.STATE_KEY)
        current = trading.parse_state(raw)
        if raw is not None and (not seen or shape(current) != shape(seen[-1])):
            seen.append(current)
        if current.state is want:
            return seen
        assert time.monotonic() < deadline, f"never {want.value}; saw {seen}"
        await asyncio.sleep(0.02)


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.storage.redis.url, socket_timeout=2)
