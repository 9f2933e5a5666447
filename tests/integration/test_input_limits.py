"""Input limits: event size before parsing, stream reads and batches bounded, names never input."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Service, errors
from ingestd.daemon.pipeline import Pipeline
from ingestd.daemon.sources.stream import StreamSource
from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from ingestd.wire.tables import APPEND_TABLES
from tests.unused_sink import UnusedSink

pytestmark = [pytest.mark.pg, pytest.mark.redis]

LIMIT = 300
# Within every table's retention (older events are refused).
RECENT = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)


def _spread(i: int) -> dict[str, object]:
    return {
        "type": "spread",
        "event_id": f"lim-{i}",
        "symbol": "BTC",
        "upbit_price": "140000000.00",
        "binance_price": "98000.00000000",
        "binance_price_krw": "135800000.55",
        "spread_pct": "3.1836",
        "net_spread_pct": "2.9836",
        "timestamp": utc_iso(RECENT + dt.timedelta(seconds=i)),
    }


async def test_oversize_events_are_refused_before_they_are_parsed(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    small = settings.replace(**{"pipeline.max_event_bytes": LIMIT})
    # Not JSON at all: had it been parsed, the reason would be a JSON error.
    oversize = b"{" * (LIMIT + 1)
    at_limit = b"{" * LIMIT
    rclient.xadd("ingestd:events", {"event": oversize})
    rclient.xadd("ingestd:events", {"event": at_limit})
    async with Service(small) as service:
        with pytest.raises(errors.InvalidEvent, match=f"larger than max_event_bytes={LIMIT}"):
            await service.submit(oversize + b"x")
        # Multi-byte text is measured in UTF-8 bytes, as it travels.
        with pytest.raises(errors.InvalidEvent, match="larger than max_event_bytes"):
            await service.submit("가" * (LIMIT // 3 + 1))
        for _ in range(200):
            if service.metrics.acks == 2:
                break
            await asyncio.sleep(0.05)
    rows = await db.fetch("SELECT source, error, payload_bytes FROM dead_letters ORDER BY id")
    reasons = {(r["source"], r["payload_bytes"]): r["error"] for r in rows}
    assert "larger than max_event_bytes" in reasons[("stream", LIMIT + 1)]
    assert "not valid JSON" in reasons[("stream", LIMIT)]  # at the limit it is parsed
    assert "larger than max_event_bytes" in reasons[("submit", LIMIT + 2)]


async def test_one_stream_read_returns_at_most_read_count_entries(
    settings: Settings, rclient: redis.Redis, redis_url: str
) -> None:
    for _ in range(25):
        rclient.xadd("ingestd:events", {"event": b"{}"})
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    bounded = settings.replace(**{"stream.read_count": 7})
    source = StreamSource(
        client,
        Pipeline(UnusedSink(), None, bounded.pipeline),
        bounded.stream,
        consumer="limit-test",
        max_event_bytes=LIMIT,
    )
    try:
        await source.ensure_group()
        sizes = [len(await source._read(">", None)) for _ in range(4)]
    finally:
        await client.aclose()
    assert sizes == [7, 7, 7, 4]


async def test_batches_never_exceed_batch_max_rows(settings: Settings) -> None:
    small = settings.replace(**{"pipeline.batch_max_rows": 10, "pipeline.batch_max_age_ms": 1000})
    async with Service(small, stream_intake=False) as service:
        await asyncio.gather(*(service.submit(_spread(i)) for i in range(95)))
        h = service.metrics.batch_events
    assert h.count >= 10
    assert h.sum == 95
    cumulative = dict(h.cumulative())
    assert cumulative["10.0"] == h.count  # every batch held at most 10 events


async def test_identifiers_never_come_from_input(
    settings: Settings, db: asyncpg.Connection
) -> None:
    hostile = {
        'symbol" text); DROP TABLE spreads; --': "x",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    async with Service(settings, stream_intake=False) as service:
        with pytest.raises(errors.InvalidEvent, match="unknown field"):
            await service.submit({**_spread(1), **hostile})
        with pytest.raises(errors.InvalidEvent, match="unknown event type"):
            await service.submit({**_spread(2), "type": "spreads; DROP TABLE spreads"})
        # Text that looks like SQL is data: it lands verbatim, in its column.
        await service.submit({**_spread(3), "producer": "'); DROP TABLE x;--"})
    assert await db.fetchval("SELECT producer FROM spreads") == "'); DROP TABLE x;--"
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 2
    # Every table ingestd writes is in the allow-list, and exists with exactly those columns.
    for table in APPEND_TABLES:
        cols = await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
            table.name,
        )
        assert set(table.column_names) <= {c["column_name"] for c in cols}
