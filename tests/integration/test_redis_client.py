"""The redis-py client ingestd builds: hiredis command packing, timeouts, real commands."""

from __future__ import annotations

from typing import Any

import pytest

from ingestd.clients import redis_async
from ingestd.redis_packing import _HiredisPacking

pytestmark = [pytest.mark.redis]


async def test_commands_are_packed_by_hiredis_and_work(redis_url: str) -> None:
    client = redis_async(redis_url, socket_timeout_s=2.0)
    try:
        assert issubclass(client.connection_pool.connection_class, _HiredisPacking)
        ids = [await client.xadd("s", {"event": b"x" * 10}) for _ in range(3000)]
        # Two-word commands are split as redis-py does ("XGROUP CREATE", "XINFO GROUPS").
        await client.xgroup_create("s", "g", id="0")
        groups = await client.xinfo_groups("s")
        assert [g["name"] for g in groups] == [b"g"]
        read: Any = await client.xreadgroup("g", "c", {"s": ">"}, count=5000)
        assert len(read[0][1]) == 3000
        assert await client.xack("s", "g", *ids) == 3000
        assert (await client.xpending("s", "g"))["pending"] == 0
    finally:
        await client.aclose()
