"""The Redis mirror against a real Redis (and, for open counts, a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from ingestd import events
from ingestd.app import create_redis
from ingestd.batching import BatchOutcome, Item
from ingestd.db import create_pool
from ingestd.settings import load_settings
from ingestd.sinks.mirror import VERSION_KEY_PREFIX, RedisMirror
from ingestd.sinks.postgres import PostgresSink, fetch_all_open_counts

pytestmark = pytest.mark.redis

UTC = dt.UTC


class Source:
    """A test Acknowledger (the producer side)."""

    name = "test"

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Nothing to acknowledge here."""

    def dead_letter_key(self, item: Item) -> str | None:
        """No redeliveries in these tests."""
        return None


SRC = Source()


def item(obj: dict[str, Any] | bytes) -> Item:
    """An Item from a wire payload."""
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return Item(events.decode_event(raw, max_bytes=1 << 20), None, SRC, None, raw, 0.0)


def spread(eid: str, ts: str, symbol: str = "BTC", upbit: str = "140123456.12") -> dict[str, Any]:
    """A spread event."""
    return {
        "type": "spread",
        "event_id": eid,
        "producer": "collector",
        "symbol": symbol,
        "upbit_price": upbit,
        "binance_price": "98012.12345678",
        "binance_price_krw": "135800000.55",
        "spread_pct": "3.1836",
        "net_spread_pct": "-2.9836",
        "is_opportunity": True,
        "timestamp": ts,
    }


def fx(eid: str, ts: str, rate: str, pair: str = "USDKRW") -> dict[str, Any]:
    """An fx_rate event."""
    return {"type": "fx_rate", "event_id": eid, "pair": pair, "rate": rate, "timestamp": ts}


def heartbeat(component: str, ts: str) -> dict[str, Any]:
    """A heartbeat event."""
    return {"type": "heartbeat", "event_id": f"hb-{ts}", "component": component, "timestamp": ts}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """ingestd's own Redis client on the (flushed) test database."""
    c = create_redis(redis_url, socket_timeout_s=1.0)
    yield c
    await c.aclose()


@pytest.fixture
def mirror(client: aioredis.Redis) -> RedisMirror:
    """A mirror with the default TTLs."""
    return RedisMirror(client, fx_ttl_s=3.0, spread_ttl_s=60.0, health_ttl_s=10.0)


async def get(client: aioredis.Redis, key: str) -> str | None:
    """A key's value as text."""
    value: bytes | str | None = await client.get(key)
    return value.decode() if isinstance(value, bytes) else value


# --- keys, values and TTLs ---------------------------------------------------------------------


async def test_keys_values_and_ttls(mirror: RedisMirror, client: aioredis.Redis) -> None:
    items = [
        item(fx("f1", "2025-11-15T03:40:15.123Z", "1385.12345678")),
        item(fx("f2", "2025-11-15T03:40:15.123Z", "1500.5", pair="EURKRW")),
        item(spread("s1", "2025-11-15T12:40:15.123+09:00")),
        item(heartbeat("collector", "2025-11-15T12:40:15.5+09:00")),
    ]
    outcome = BatchOutcome(open_counts={"BTC": 2, "ETH": 0}, open_counts_version=1234)
    mirror.stage_events(items, outcome)
    assert await mirror.flush() is True
    assert mirror.pending == 0

    assert await get(client, "fx:usdkrw") == "1385.12345678"
    assert await get(client, "fx:eurkrw") == "1500.5"
    assert 0 < await client.pttl("fx:usdkrw") <= 3000

    snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
    assert snap["symbol"] == "BTC"
    for name, value in [
        ("upbit_price", "140123456.12"),
        ("binance_price", "98012.12345678"),
        ("binance_price_krw", "135800000.55"),
        ("spread_pct", "3.1836"),
        ("net_spread_pct", "-2.9836"),
    ]:
        assert snap[name] == value  # decimals as strings, every digit
    assert snap["is_opportunity"] is True
    assert snap["timestamp"].endswith("Z")
    assert dt.datetime.fromisoformat(snap["timestamp"]) == dt.datetime(
        2025, 11, 15, 3, 40, 15, 123000, tzinfo=UTC
    )
    assert 0 < await client.pttl("spreads:BTC:last") <= 60_000

    health = await get(client, "health:collector")
    assert health is not None
    assert health.endswith("Z")
    assert dt.datetime.fromisoformat(health) == dt.datetime(
        2025, 11, 15, 3, 40, 15, 500000, tzinfo=UTC
    )
    assert 0 < await client.pttl("health:collector") <= 10_000

    assert await get(client, "positions:BTC:open_count") == "2"
    assert await get(client, "positions:ETH:open_count") == "0"
    assert await client.ttl("positions:BTC:open_count") == -1


async def test_json_number_rate_keeps_every_digit(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    raw = (
        b'{"type":"fx_rate","event_id":"f","pair":"USDKRW",'
        b'"timestamp":"2025-11-15T03:40:15Z","rate":1234567890.12345678}'
    )
    mirror.stage_events([item(raw)], BatchOutcome())
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "1234567890.12345678"


async def test_rejected_and_dead_letter_items_are_not_mirrored(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    bad = item(fx("bad", "2025-11-15T03:40:16Z", "9"))
    good = item(fx("good", "2025-11-15T03:40:15Z", "1"))
    dead = Item(None, None, SRC, None, b"x", 0.0)
    mirror.stage_events([good, bad, dead], BatchOutcome(rejected={id(bad): "no"}))
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "1"


async def test_open_count_without_ttl_even_after_a_ttl_was_set(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    await client.set("positions:BTC:open_count", "7", px=5000)
    mirror.stage_open_counts({"BTC": 1}, 10)
    assert await mirror.flush()
    assert await get(client, "positions:BTC:open_count") == "1"
    assert await client.ttl("positions:BTC:open_count") == -1
    # An older count (smaller transaction id) written later does not replace it.
    mirror.stage_open_counts({"BTC": 5}, 9)
    assert await mirror.flush()
    assert await get(client, "positions:BTC:open_count") == "1"


# --- newest wins ---------------------------------------------------------------------------


async def test_coalescing_keeps_only_the_newest_per_key(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    batch = [
        item(fx("f1", "2025-11-15T03:40:15Z", "1")),
        item(fx("f3", "2025-11-15T03:40:17Z", "3")),
        item(fx("f2", "2025-11-15T03:40:16Z", "2")),
        item(spread("b2", "2025-11-15T03:40:17Z", upbit="2")),
        item(spread("b1", "2025-11-15T03:40:16Z", upbit="1")),
        item(spread("e1", "2025-11-15T03:40:10Z", symbol="ETH", upbit="5")),
        item(heartbeat("paper", "2025-11-15T03:40:20Z")),
        item(heartbeat("paper", "2025-11-15T03:40:19Z")),
    ]
    mirror.stage_events(batch[:4], BatchOutcome())
    mirror.stage_events(batch[4:], BatchOutcome())
    # One pending write per key, whatever the number of events.
    assert mirror.pending == 4
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "3"
    assert orjson.loads(await client.get("spreads:BTC:last") or b"null")["upbit_price"] == "2"
    assert orjson.loads(await client.get("spreads:ETH:last") or b"null")["upbit_price"] == "5"
    assert await get(client, "health:paper") == "2025-11-15T03:40:20.000000Z"
    versions = await mirror.read_versions(["fx:usdkrw", "spreads:BTC:last", "health:paper"])
    assert versions == [
        int(dt.datetime(2025, 11, 15, 3, 40, s, tzinfo=UTC).timestamp()) * 1_000_000
        for s in (17, 17, 20)
    ]


async def test_older_event_flushed_later_never_replaces_newer(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    mirror.stage_events(
        [
            item(spread("new", "2025-11-15T03:40:17Z", upbit="2")),
            item(fx("new", "2025-11-15T03:40:17Z", "2")),
        ],
        BatchOutcome(),
    )
    assert await mirror.flush()
    mirror.stage_events(
        [
            item(spread("old", "2025-11-15T03:40:16.999999Z", upbit="1")),
            item(fx("old", "2025-11-15T03:40:16Z", "1")),
        ],
        BatchOutcome(),
    )
    assert await mirror.flush()
    snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
    assert (snap["upbit_price"], snap["event_id"]) == ("2", "new")
    assert await get(client, "fx:usdkrw") == "2"


async def test_two_replicas_never_regress(redis_url: str, client: aioredis.Redis) -> None:
    other_client = create_redis(redis_url, socket_timeout_s=1.0)
    try:
        a = RedisMirror(client)
        b = RedisMirror(other_client)
        a.stage_events([item(spread("new", "2025-11-15T03:40:17Z", upbit="2"))], BatchOutcome())
        b.stage_events([item(spread("old", "2025-11-15T03:40:16Z", upbit="1"))], BatchOutcome())
        assert await a.flush()
        assert await b.flush()
        snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
        assert snap["event_id"] == "new"
        # The newer one wins whichever replica flushes it, and in whatever order.
        b.stage_events([item(spread("newest", "2025-11-15T03:40:18Z", upbit="3"))], BatchOutcome())
        assert await b.flush()
        a.stage_events([item(spread("mid", "2025-11-15T03:40:17.5Z", upbit="9"))], BatchOutcome())
        assert await a.flush()
        snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
        assert snap["event_id"] == "newest"
        # Open counts: the version is the writing transaction's id.
        a.stage_open_counts({"BTC": 3}, 200)
        b.stage_open_counts({"BTC": 4}, 150)
        assert await b.flush()
        assert await a.flush()
        assert await b.flush()
        assert await get(client, "positions:BTC:open_count") == "3"
    finally:
        await other_client.aclose()


async def test_same_event_again_refreshes_the_ttl(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    ev = item(fx("f", "2025-11-15T03:40:17Z", "2"))
    mirror.stage_events([ev], BatchOutcome())
    assert await mirror.flush()
    await client.pexpire("fx:usdkrw", 50)
    mirror.stage_events([ev], BatchOutcome())  # a redelivery, or a catch-up after an outage
    assert await mirror.flush()
    assert await client.pttl("fx:usdkrw") > 1000


async def test_key_prefix_applies_to_every_key(redis_url: str, client: aioredis.Redis) -> None:
    a = RedisMirror(client, key_prefix="replA:")
    b = RedisMirror(client, key_prefix="replB:")
    batch = [
        item(fx("f", "2025-11-15T03:40:17Z", "2")),
        item(spread("s", "2025-11-15T03:40:17Z")),
        item(heartbeat("collector", "2025-11-15T03:40:17Z")),
    ]
    a.stage_events(batch, BatchOutcome(open_counts={"BTC": 1}, open_counts_version=5))
    a.stage_heartbeat("ingestd", dt.datetime.now(UTC))
    assert await a.flush()
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in await client.keys("*"))
    assert keys == sorted(
        "replA:" + k
        for k in (
            "fx:usdkrw",
            "spreads:BTC:last",
            "health:collector",
            "health:ingestd",
            "positions:BTC:open_count",
        )
        for k in (k, VERSION_KEY_PREFIX + k)  # each key and, beside it, its version
    )
    assert a.key("fx:usdkrw") == "replA:fx:usdkrw"
    # Another prefix is another namespace: its versions do not block it.
    b.stage_events([item(fx("old", "2025-11-15T03:40:10Z", "1"))], BatchOutcome())
    assert await b.flush()
    assert await get(client, "replB:fx:usdkrw") == "1"
    assert await get(client, "replA:fx:usdkrw") == "2"
    assert await client.get("fx:usdkrw") is None


# --- Redis unreachable -------------------------------------------------------------------------


async def test_unreachable_redis_keeps_pending_values() -> None:
    dead = create_redis("redis://127.0.0.1:1/0", socket_timeout_s=0.2)
    try:
        m = RedisMirror(dead)
        m.stage_events(
            [
                item(fx("f1", "2025-11-15T03:40:15Z", "1")),
                item(spread("s", "2025-11-15T03:40:15Z")),
            ],
            BatchOutcome(open_counts={"BTC": 1}, open_counts_version=3),
        )
        started = time.monotonic()
        assert await m.flush() is False
        assert time.monotonic() - started < 5
        assert m.pending == 3
        assert m.errors == 1
        # Newer values keep arriving while Redis is down: the newest per key is kept.
        m.stage_events([item(fx("f2", "2025-11-15T03:40:16Z", "2"))], BatchOutcome())
        assert await m.flush() is False
        assert m.pending == 3
        assert m.errors == 2
    finally:
        await dead.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, target_host: str, target_port: int) -> AsyncIterator[None]:
    """A plain TCP relay on ``port`` to the real Redis: a way to make Redis come and go."""
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        writers.extend((writer, up_writer))
        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for w in writers:
            w.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_mirror_catches_up_when_redis_returns(redis_url: str, client: aioredis.Redis) -> None:
    url = urllib.parse.urlsplit(redis_url)
    port = _free_port()
    flaky = create_redis(f"redis://127.0.0.1:{port}{url.path}", socket_timeout_s=0.2)
    try:
        m = RedisMirror(flaky)
        m.stage_events([item(fx("f1", "2025-11-15T03:40:15Z", "1"))], BatchOutcome())
        assert await m.flush() is False
        m.stage_events(
            [
                item(fx("f2", "2025-11-15T03:40:16Z", "2")),
                item(heartbeat("collector", "2025-11-15T03:40:16Z")),
            ],
            BatchOutcome(),
        )
        assert await m.flush() is False
        assert m.pending == 2
        async with tcp_proxy(port, url.hostname or "127.0.0.1", url.port or 6379):
            assert await m.flush() is True
            assert m.pending == 0
        assert await get(client, "fx:usdkrw") == "2"
        assert await get(client, "health:collector") == "2025-11-15T03:40:16.000000Z"
    finally:
        await flaky.aclose()


# --- open counts from the real database -----------------------------------------------------


@pytest.mark.pg
async def test_open_counts_from_the_sink_match_the_database(
    db_dsn: str, db: asyncpg.Connection, mirror: RedisMirror, client: aioredis.Redis
) -> None:
    settings = load_settings(None, environ={}, overrides={"storage.postgres.dsn": db_dsn})
    pool = await create_pool(settings.storage.postgres)
    try:
        sink = PostgresSink(pool)
        entry = {
            "type": "position_open",
            "producer": "paper",
            "direction": "d",
            "size": "1",
            "entry_upbit_price": "1",
            "entry_binance_price": "1",
            "entry_spread_pct": "1",
            "timestamp_open": "2025-11-15T03:00:00Z",
        }
        close = {
            "type": "position_close",
            "producer": "paper",  # a position is its producer's
            "exit_upbit_price": "1",
            "exit_binance_price": "1",
            "exit_spread_pct": "1",
            "pnl_krw": "1",
            "pnl_pct": "1",
            "timestamp_close": "2025-11-15T04:00:00Z",
        }
        opens = [
            item({**entry, "event_id": f"o{i}", "position_key": f"p{i}", "symbol": "BTC"})
            for i in range(3)
        ]
        first_items = [
            *opens,
            item({**entry, "event_id": "e", "position_key": "pe", "symbol": "ETH"}),
        ]
        first = await sink.write(first_items)
        second_items = [
            item({**close, "event_id": "c0", "position_key": "p0"}),
            item({**close, "event_id": "ce", "position_key": "pe"}),
        ]
        second = await sink.write(second_items)

        # The later commit is mirrored first, the earlier one after it (another writer was slow).
        mirror.stage_events(second_items, second)
        assert await mirror.flush()
        mirror.stage_events(first_items, first)
        assert await mirror.flush()
        db_counts = {
            r["symbol"]: r["n"]
            for r in await db.fetch(
                "SELECT symbol, count(*) FILTER (WHERE status = 'OPEN')::int AS n"
                " FROM positions GROUP BY symbol"
            )
        }
        assert db_counts == {"BTC": 2, "ETH": 0}
        for symbol, n in db_counts.items():
            assert await get(client, f"positions:{symbol}:open_count") == str(n)
            assert await client.ttl(f"positions:{symbol}:open_count") == -1

        # The reconciliation read agrees and is not older than what is there.
        await client.delete("positions:ETH:open_count")
        async with pool.acquire() as conn:
            counts, version = await fetch_all_open_counts(conn)
        mirror.stage_open_counts(counts, version)
        assert await mirror.flush()
        assert await get(client, "positions:ETH:open_count") == "0"
        assert await get(client, "positions:BTC:open_count") == "2"
    finally:
        await pool.close()


# --- edge of the version scheme -----------------------------------------------------------


async def test_event_time_before_1970_is_mirrored(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    ev = item(heartbeat("collector", "1969-12-31T23:59:59Z"))
    mirror.stage_events([ev], BatchOutcome())
    assert await mirror.flush()
    assert await get(client, "health:collector") == "1969-12-31T23:59:59.000000Z"


async def test_an_event_dated_in_the_future_holds_its_key_for_one_ttl_only(
    client: aioredis.Redis,
) -> None:
    mirror = RedisMirror(client, spread_ttl_s=0.3)
    mirror.stage_events([item(spread("future", "2099-01-01T00:00:00Z"))], BatchOutcome())
    assert await mirror.flush()
    mirror.stage_events([item(spread("now", "2026-12-01T00:00:00Z"))], BatchOutcome())
    assert await mirror.flush()
    snap = orjson.loads(await get(client, "spreads:BTC:last") or "{}")
    assert snap["event_id"] == "future"  # newest by event time, while it lives
    await asyncio.sleep(0.5)  # its TTL passes: the value and its version expire together
    mirror.stage_events([item(spread("later", "2026-12-01T00:00:01Z"))], BatchOutcome())
    assert await mirror.flush()
    snap = orjson.loads(await get(client, "spreads:BTC:last") or "{}")
    assert snap["event_id"] == "later"
