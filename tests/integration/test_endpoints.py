"""The operations endpoint of a running Service, over real HTTP, against real servers."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from ingestd import Service, errors
from ingestd.daemon.batching import Item
from ingestd.daemon.metrics import Metrics
from ingestd.daemon.probes import sample_stream
from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from tests.http_client import by_label, get, scrape
from tests.mixed_feed import MALFORMED, mixed_feed, submit_all
from tests.private_servers import free_port

pytestmark = [pytest.mark.pg, pytest.mark.redis]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No retention: the sample history (tests/samples.py, from 2025) is older than the 90-day
    retention of spreads, and these tests are about the endpoints, not about refusing old events."""
    return settings.replace(
        **{"retention.spreads_days": 0, "retention.fx_rates_days": 0, "retention.orders_days": 0}
    )


@pytest.fixture
def ops_settings(settings: Settings) -> Settings:
    """The test settings with the endpoint on a free port."""
    return settings.replace(metrics_port=free_port())


@pytest.fixture
async def service(ops_settings: Settings) -> AsyncIterator[Service]:
    """A running Service (in-process intake only) with its endpoint."""
    async with Service(ops_settings, stream_intake=False) as svc:
        yield svc


async def test_metrics_count_what_was_submitted(service: Service, db: asyncpg.Connection) -> None:
    feed = mixed_feed(300)
    await submit_all(service, feed)
    sent = feed.events
    for payload in MALFORMED:
        with pytest.raises(errors.InvalidEvent):
            await service.submit(payload)
    samples = await scrape(service.settings.metrics_port)

    by_type = collections.Counter(ev["type"] for ev in sent)
    received = by_label(samples, "ingestd_events_received_total", "type")
    assert received == {**by_type, "invalid": len(MALFORMED)}
    assert by_label(samples, "ingestd_events_written_total", "type") == by_type
    assert by_label(samples, "ingestd_events_dead_lettered_total", "type") == {
        "invalid": len(MALFORMED)
    }
    rows = by_label(samples, "ingestd_rows_written_total", "table")
    for table in ("spreads", "fx_rates", "orders", "trades"):
        assert rows[table] == await db.fetchval(f"SELECT count(*) FROM {table}"), table
    assert samples[("ingestd_duplicates_total", ())] == 1  # the repeated FX event
    batches = samples[("ingestd_batches_total", ())]
    assert batches >= 1
    assert samples[("ingestd_batch_events_count", ())] == batches
    assert samples[("ingestd_batch_events_sum", ())] == len(sent) + len(MALFORMED)
    assert samples[("ingestd_flush_duration_seconds_count", ())] == batches
    assert samples[("ingestd_flush_duration_seconds_sum", ())] > 0
    latency_count = samples[("ingestd_commit_latency_seconds_count", ())]
    assert latency_count == len(sent) + len(MALFORMED)
    inf = samples[("ingestd_commit_latency_seconds_bucket", (("le", "+Inf"),))]
    assert inf == latency_count
    assert samples[("ingestd_queue_depth", ())] == 0
    assert samples[("ingestd_queue_capacity", ())] == service.settings.pipeline.queue_max_events
    assert samples[("ingestd_flush_retries_total", ())] == 0
    assert samples[("ingestd_mirror_errors_total", ())] == 0
    assert samples[("ingestd_healthy", ())] == 1
    assert samples[("ingestd_spool_bytes", ())] == 0
    info = [labels for (name, labels) in samples if name == "ingestd_build_info"]
    assert dict(info[0])["version"] not in ("", "unknown")


async def test_probes_and_http_edges(service: Service) -> None:
    port = service.settings.metrics_port
    healthz = await get(port, "/healthz")
    assert (healthz.status, healthz.text) == (200, "ok\n")
    readyz = await get(port, "/readyz?verbose=1")
    assert readyz.status == 200
    assert orjson.loads(readyz.body) == {
        "ready": True,
        "checks": {
            "database": "ok",
            "commit": "ok",
            "schema": "ok",
            "redis": "ok",
            "intake": "ok",
            "health": "ok",
        },
    }
    head = await get(port, "/metrics", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) > 0
    assert (await get(port, "/nothing-here")).status == 404
    post = await get(port, "/metrics", method="POST")
    assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"
    # Not HTTP at all, and a request line far too long: 400, and the server keeps serving.
    for garbage in (b"hello\r\n\r\n", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage)
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 400"), status_line
    assert (await get(port, "/healthz")).status == 200


async def test_readyz_reports_a_schema_from_a_newer_ingestd(
    service: Service, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO ingestd_migrations (version, name, checksum) VALUES (999, 'future', $1)",
        "0" * 64,
    )
    resp = await get(service.settings.metrics_port, "/readyz")
    assert resp.status == 503
    checks = orjson.loads(resp.body)["checks"]
    assert checks["database"] == "ok"
    assert "newer ingestd" in checks["schema"]


async def test_readyz_fails_while_redis_is_unreachable(ops_settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once the socket is closed
    broken = ops_settings.replace(
        **{
            "storage.redis.url": f"redis://:hunter2@127.0.0.1:{dead}/0",
            "storage.redis.socket_timeout_s": 0.5,
            "stream.block_ms": 100,
        }
    )
    async with Service(broken, stream_intake=False) as svc:
        resp = await get(svc.settings.metrics_port, "/readyz")
        assert resp.status == 503
        checks = orjson.loads(resp.body)["checks"]
        assert checks["database"] == "ok"
        assert checks["redis"] != "ok"
        assert "hunter2" not in resp.text
        # Alive all the same: the database path works without Redis.
        assert (await get(svc.settings.metrics_port, "/healthz")).status == 200


async def test_readyz_says_draining_once_intake_stops(service: Service) -> None:
    assert service.pipeline is not None
    await service.pipeline.drain()
    resp = await get(service.settings.metrics_port, "/readyz")
    assert resp.status == 503
    assert orjson.loads(resp.body)["checks"]["intake"] == "draining: shutting down"


async def test_healthz_fails_while_batches_cannot_commit(
    ops_settings: Settings, db: asyncpg.Connection
) -> None:
    fast = ops_settings.replace(**{"pipeline.flush_timeout_s": 0.2, "pipeline.backoff_cap_s": 0.1})
    async with Service(fast, stream_intake=False) as svc:
        port = svc.settings.metrics_port
        lock = db.transaction()
        await lock.start()
        await db.execute("LOCK TABLE fx_rates IN ACCESS EXCLUSIVE MODE")
        event = {
            "type": "fx_rate",
            "event_id": "blocked-1",
            "pair": "USDKRW",
            "rate": "1390.5",
            "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
        }
        pending = asyncio.create_task(svc.submit(event))
        try:
            for _ in range(200):
                resp = await get(port, "/healthz")
                if resp.status == 503:
                    break
                await asyncio.sleep(0.05)
            assert resp.status == 503
            assert resp.text.startswith("unhealthy: batches failing to commit for")
            samples = await scrape(port)
            assert samples[("ingestd_healthy", ())] == 0
            assert samples[("ingestd_flush_retries_total", ())] > 0
        finally:
            await lock.rollback()
        await asyncio.wait_for(pending, 30)
        assert (await get(port, "/healthz")).status == 200


async def test_a_taken_port_fails_the_start(ops_settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", ops_settings.metrics_port))
        s.listen()
        svc = Service(ops_settings, stream_intake=False)
        with pytest.raises(errors.ConfigError, match="cannot serve metrics"):
            await svc.start()


async def test_no_endpoint_when_the_port_is_zero(settings: Settings) -> None:
    assert settings.metrics_port == 0
    async with Service(settings, stream_intake=False) as svc:
        assert svc.ops is None
        assert b"ingestd_batches_total" in generate_latest(svc.registry)


async def test_stream_sample_reads_pending_lag_and_length(
    rclient: redis.Redis, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    m = Metrics()
    try:
        await sample_stream(client, "ops:stream", "g", m)
        assert (m.stream_pending, m.stream_lag, m.stream_length) == (0, 0, 0)
        for i in range(5):
            rclient.xadd("ops:stream", {"event": str(i)})
        await sample_stream(client, "ops:stream", "g", m)
        assert (m.stream_pending, m.stream_lag, m.stream_length) == (0, 5, 5)
        rclient.xgroup_create("ops:stream", "g", id="0")
        rclient.xreadgroup("g", "c", {"ops:stream": ">"}, count=2)
        await sample_stream(client, "ops:stream", "g", m)
        assert (m.stream_pending, m.stream_lag, m.stream_length) == (2, 3, 5)
    finally:
        await client.aclose()


class _PoisonEvent:
    """Not an ingestd Event: the batching loop fails on it as on any unexpected bug."""

    type = "spread"

    @property
    def spec(self) -> Any:
        raise RuntimeError("injected failure in the batching loop")


async def test_healthz_fails_when_the_batching_loop_dies(ops_settings: Settings) -> None:
    svc = Service(ops_settings, stream_intake=False)
    await svc.start()
    try:
        port = svc.settings.metrics_port
        assert (await get(port, "/healthz")).status == 200
        assert svc.pipeline is not None
        poison = Item(cast(Any, _PoisonEvent()), None, cast(Any, None), None, None, 0.0)
        await svc.pipeline.put([poison])
        for _ in range(100):
            resp = await get(port, "/healthz")
            if resp.status == 503:
                break
            await asyncio.sleep(0.02)
        assert (resp.status, resp.text) == (503, "unhealthy: the batching loop has stopped\n")
        assert (await scrape(port))[("ingestd_healthy", ())] == 0
    finally:
        assert await svc.stop() is False  # not clean, but it does stop


async def test_healthz_fails_when_stream_intake_ends(ops_settings: Settings) -> None:
    svc = Service(ops_settings)
    await svc.start()
    try:
        port = svc.settings.metrics_port
        assert (await get(port, "/healthz")).status == 200
        assert svc.stream is not None
        svc.stream.stop()  # intake ends while the service goes on: nothing would be read any more
        for _ in range(200):
            resp = await get(port, "/healthz")
            if resp.status == 503:
                break
            await asyncio.sleep(0.02)
        assert (resp.status, resp.text) == (503, "unhealthy: stream intake has stopped\n")
    finally:
        assert await svc.stop() is True


async def test_stream_sample_ages_the_oldest_entry_not_delivered_yet(
    rclient: redis.Redis, redis_url: str
) -> None:
    """Ingest lag counts the entries no replica has read yet (a backlog the replicas do not keep
    up with), not only those read and not yet acknowledged."""
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    m = Metrics()
    now_ms = int(time.time() * 1000)
    try:
        await sample_stream(client, "ops:lagging", "g", m, now_ms=now_ms)
        assert m.stream_oldest_undelivered_s is None  # no stream: nothing waits
        # Entry ids carry the time they were added: 60 s, 45 s and 30 s ago.
        for age_s in (60, 45, 30):
            rclient.xadd("ops:lagging", {"event": "x"}, id=f"{now_ms - age_s * 1000}-0")
        await sample_stream(client, "ops:lagging", "g", m, now_ms=now_ms)
        assert m.stream_oldest_undelivered_s == 60.0  # no group yet: all undelivered
        rclient.xgroup_create("ops:lagging", "g", id="0")
        rclient.xreadgroup("g", "c", {"ops:lagging": ">"}, count=1)
        await sample_stream(client, "ops:lagging", "g", m, now_ms=now_ms)
        assert m.stream_oldest_pending_s == 60.0 and m.stream_oldest_undelivered_s == 45.0
        rclient.xreadgroup("g", "c", {"ops:lagging": ">"}, count=2)
        await sample_stream(client, "ops:lagging", "g", m, now_ms=now_ms)
        assert m.stream_oldest_undelivered_s is None  # all delivered (pending, not lagging)
    finally:
        await client.aclose()
