"""/healthz, /readyz and the heartbeat tell the truth about the stream intake.

A stream key of the wrong type, or an entry left pending too long, is no healthy service, even
while other work commits.
"""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Service
from ingestd.daemon.metrics import Metrics
from ingestd.daemon.probes import sample_stream
from ingestd.settings import Settings
from tests.http_client import get, scrape
from tests.private_servers import free_port

pytestmark = [pytest.mark.pg, pytest.mark.redis]

STREAM = "ingestd:events"


async def test_a_stream_key_of_the_wrong_type_is_unhealthy_and_not_ready(
    settings: Settings, rclient: redis.Redis
) -> None:
    rclient.set(STREAM, "not a stream")
    ops = settings.replace(metrics_port=free_port())
    async with Service(ops) as service:
        port = ops.metrics_port
        deadline = time.monotonic() + 20
        while service.metrics.stream_problem is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        healthz = await get(port, "/healthz")
        assert healthz.status == 503
        assert "holds another type, not a stream" in healthz.text
        readyz = await get(port, "/readyz")
        assert readyz.status == 503
        checks = orjson.loads(readyz.body)["checks"]
        assert "not a stream" in checks["stream"]
        samples = await scrape(port)
        assert samples[("ingestd_stream_usable", ())] == 0
        assert samples[("ingestd_healthy", ())] == 0
        # The heartbeat loop writes health:ingestd only while this says healthy.
        assert service.healthy() is False
        # Fixed by an operator: the next sample finds a stream, and the service is healthy.
        rclient.delete(STREAM)
        while service.metrics.stream_problem is not None and time.monotonic() < deadline + 10:
            await asyncio.sleep(0.1)
        assert (await get(port, "/healthz")).status == 200


async def test_an_entry_pending_too_long_is_unhealthy(
    settings: Settings, rclient: redis.Redis
) -> None:
    # An entry delivered to a consumer that died long ago (its id says when it was added) and
    # not yet claimed: the oldest pending entry is older than the limit.
    rclient.xgroup_create(STREAM, "ingestd", id="0", mkstream=True)
    moment = int(time.time() * 1000) - 600_000
    rclient.xadd(STREAM, {"event": json.dumps({"type": "nope"})}, id=f"{moment}-0")
    rclient.xreadgroup("ingestd", "gone", {STREAM: ">"})
    metrics = Metrics()
    await asyncio.wait_for(sample_stream_once(settings, metrics), 10)
    assert metrics.stream_oldest_pending_s is not None
    assert 590 < metrics.stream_oldest_pending_s < 700
    ops = settings.replace(**{"metrics_port": free_port(), "pipeline.max_pending_age_s": 60.0})
    async with Service(ops) as service:
        deadline = time.monotonic() + 20
        while service.metrics.stream_oldest_pending_s is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        healthz = await get(ops.metrics_port, "/healthz")
        assert healthz.status == 503
        assert "the oldest pending entry has waited" in healthz.text


async def sample_stream_once(settings: Settings, metrics: Metrics) -> None:
    """One sample through a client of our own."""
    client = aioredis.Redis.from_url(settings.storage.redis.url, protocol=2)
    try:
        await sample_stream(client, STREAM, "ingestd", metrics)
    finally:
        await client.aclose()
