"""The Redis mirror against a real Redis (and, for open counts, a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from ingestd import Outcome, Service
from ingestd.clients import redis_async
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.db import create_pool
from ingestd.daemon.sinks.mirror import RedisMirror
from ingestd.daemon.sinks.postgres import PostgresSink, fetch_all_open_counts
from ingestd.settings import Settings, load_settings
from ingestd.wire import decoding, events
from ingestd.wire.mirror_format import VERSION_KEY_PREFIX, version_micros
from tests.http_client import by_label, scrape
from tests.private_servers import free_port

pytestmark = pytest.mark.redis

UTC = dt.UTC
KST = dt.timezone(dt.timedelta(hours=9))


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
    return Item(decoding.decode_event(raw, max_bytes=1 << 20), None, SRC, None, raw, 0.0)


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
    c = redis_async(redis_url, socket_timeout_s=1.0)
    yield c
    await c.aclose()


class RecentTimes:
    """Event times near the test's start: ``t(17)`` is 17 ms after a base 100 ms before it.

    A value older than its TTL is never mirrored, so every event here must be recent; the
    milliseconds keep the order the tests need.
    """

    def __init__(self) -> None:
        self.base = dt.datetime.now(UTC) - dt.timedelta(milliseconds=100)

    def moment(self, ms: float) -> dt.datetime:
        """The aware datetime ``ms`` milliseconds after the base."""
        return self.base + dt.timedelta(microseconds=round(ms * 1000))

    def __call__(self, ms: float, tz: dt.tzinfo = UTC) -> str:
        """The same as ISO-8601 text with ``tz``'s offset."""
        return self.moment(ms).astimezone(tz).isoformat()


@pytest.fixture
def t() -> RecentTimes:
    """Recent event times for this test."""
    return RecentTimes()


@pytest.fixture
def mirror(client: aioredis.Redis) -> RedisMirror:
    """A mirror with the default TTLs."""
    return RedisMirror(client, fx_ttl_s=3.0, spread_ttl_s=60.0, health_ttl_s=10.0)


async def get(client: aioredis.Redis, key: str) -> str | None:
    """A key's value as text."""
    value: bytes | str | None = await client.get(key)
    return value.decode() if isinstance(value, bytes) else value


# --- keys, values and TTLs ---------------------------------------------------------------------


async def test_keys_values_and_ttls(
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    items = [
        item(fx("f1", t(15.123), "1385.12345678")),
        item(fx("f2", t(15.123), "1500.5", pair="EURKRW")),
        item(spread("s1", t(15.123, KST))),
        item(heartbeat("collector", t(15.5, KST))),
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
    assert dt.datetime.fromisoformat(snap["timestamp"]) == t.moment(15.123)
    assert 0 < await client.pttl("spreads:BTC:last") <= 60_000

    health = await get(client, "health:collector")
    assert health is not None
    assert health.endswith("Z")
    assert dt.datetime.fromisoformat(health) == t.moment(15.5)
    assert 0 < await client.pttl("health:collector") <= 10_000

    assert await get(client, "positions:BTC:open_count") == "2"
    assert await get(client, "positions:ETH:open_count") == "0"
    assert await client.ttl("positions:BTC:open_count") == -1


async def test_json_number_rate_keeps_every_digit(
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    raw = (
        '{"type":"fx_rate","event_id":"f","pair":"USDKRW",'
        f'"timestamp":"{t(15)}","rate":1234567890.12345678}}'
    ).encode()
    mirror.stage_events([item(raw)], BatchOutcome())
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "1234567890.12345678"


async def test_rejected_and_dead_letter_items_are_not_mirrored(
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    bad = item(fx("bad", t(16), "9"))
    good = item(fx("good", t(15), "1"))
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
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    batch = [
        item(fx("f1", t(15), "1")),
        item(fx("f3", t(17), "3")),
        item(fx("f2", t(16), "2")),
        item(spread("b2", t(17), upbit="2")),
        item(spread("b1", t(16), upbit="1")),
        item(spread("e1", t(10), symbol="ETH", upbit="5")),
        item(heartbeat("paper", t(20))),
        item(heartbeat("paper", t(19))),
    ]
    mirror.stage_events(batch[:4], BatchOutcome())
    mirror.stage_events(batch[4:], BatchOutcome())
    # One pending write per key, whatever the number of events.
    assert mirror.pending == 4
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "3"
    assert orjson.loads(await client.get("spreads:BTC:last") or b"null")["upbit_price"] == "2"
    assert orjson.loads(await client.get("spreads:ETH:last") or b"null")["upbit_price"] == "5"
    assert await get(client, "health:paper") == events.utc_iso(t.moment(20))
    versions = await mirror.read_versions(["fx:usdkrw", "spreads:BTC:last", "health:paper"])
    assert versions == [version_micros(t.moment(ms)) for ms in (17, 17, 20)]


async def test_older_event_flushed_later_never_replaces_newer(
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    mirror.stage_events(
        [
            item(spread("new", t(17), upbit="2")),
            item(fx("new", t(17), "2")),
        ],
        BatchOutcome(),
    )
    assert await mirror.flush()
    mirror.stage_events(
        [
            item(spread("old", t(16.999), upbit="1")),
            item(fx("old", t(16), "1")),
        ],
        BatchOutcome(),
    )
    assert await mirror.flush()
    snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
    assert (snap["upbit_price"], snap["event_id"]) == ("2", "new")
    assert await get(client, "fx:usdkrw") == "2"


async def test_two_replicas_never_regress(
    redis_url: str, client: aioredis.Redis, t: RecentTimes
) -> None:
    other_client = redis_async(redis_url, socket_timeout_s=1.0)
    try:
        a = RedisMirror(client)
        b = RedisMirror(other_client)
        a.stage_events([item(spread("new", t(17), upbit="2"))], BatchOutcome())
        b.stage_events([item(spread("old", t(16), upbit="1"))], BatchOutcome())
        assert await a.flush()
        assert await b.flush()
        snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
        assert snap["event_id"] == "new"
        # The newer one wins whichever replica flushes it, and in whatever order.
        b.stage_events([item(spread("newest", t(18), upbit="3"))], BatchOutcome())
        assert await b.flush()
        a.stage_events([item(spread("mid", t(17.5), upbit="9"))], BatchOutcome())
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
    mirror: RedisMirror, client: aioredis.Redis, t: RecentTimes
) -> None:
    ev = item(fx("f", t(17), "2"))
    mirror.stage_events([ev], BatchOutcome())
    assert await mirror.flush()
    await client.pexpire("fx:usdkrw", 50)
    mirror.stage_events([ev], BatchOutcome())  # a redelivery, or a catch-up after an outage
    assert await mirror.flush()
    assert await client.pttl("fx:usdkrw") > 1000


async def test_key_prefix_applies_to_every_key(
    redis_url: str, client: aioredis.Redis, t: RecentTimes
) -> None:
    a = RedisMirror(client, key_prefix="replA:")
    b = RedisMirror(client, key_prefix="replB:")
    batch = [
        item(fx("f", t(17), "2")),
        item(spread("s", t(17))),
        item(heartbeat("collector", t(17))),
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
    b.stage_events([item(fx("old", t(10), "1"))], BatchOutcome())
    assert await b.flush()
    assert await get(client, "replB:fx:usdkrw") == "1"
    assert await get(client, "replA:fx:usdkrw") == "2"
    assert await client.get("fx:usdkrw") is None


# --- Redis unreachable -------------------------------------------------------------------------


async def test_unreachable_redis_keeps_pending_values(t: RecentTimes) -> None:
    dead = redis_async("redis://127.0.0.1:1/0", socket_timeout_s=0.2)
    try:
        m = RedisMirror(dead)
        m.stage_events(
            [
                item(fx("f1", t(15), "1")),
                item(spread("s", t(15))),
            ],
            BatchOutcome(open_counts={"BTC": 1}, open_counts_version=3),
        )
        started = time.monotonic()
        assert await m.flush() is False
        assert time.monotonic() - started < 5
        assert m.pending == 3
        assert m.errors == 1
        # Newer values keep arriving while Redis is down: the newest per key is kept.
        m.stage_events([item(fx("f2", t(16), "2"))], BatchOutcome())
        assert await m.flush() is False
        assert m.pending == 3
        assert m.errors == 2
    finally:
        await dead.aclose()


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


async def test_mirror_catches_up_when_redis_returns(
    redis_url: str, client: aioredis.Redis, t: RecentTimes
) -> None:
    url = urllib.parse.urlsplit(redis_url)
    port = free_port()
    flaky = redis_async(f"redis://127.0.0.1:{port}{url.path}", socket_timeout_s=0.2)
    try:
        m = RedisMirror(flaky)
        m.stage_events([item(fx("f1", t(15), "1"))], BatchOutcome())
        assert await m.flush() is False
        m.stage_events(
            [
                item(fx("f2", t(16), "2")),
                item(heartbeat("collector", t(16))),
            ],
            BatchOutcome(),
        )
        assert await m.flush() is False
        assert m.pending == 2
        async with tcp_proxy(port, url.hostname or "127.0.0.1", url.port or 6379):
            assert await m.flush() is True
            assert m.pending == 0
        assert await get(client, "fx:usdkrw") == "2"
        assert await get(client, "health:collector") == events.utc_iso(t.moment(16))
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


async def test_an_event_time_before_1970_is_too_old_to_mirror(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    ev = item(heartbeat("collector", "1969-12-31T23:59:59Z"))  # a negative version
    mirror.stage_events([ev], BatchOutcome())
    assert await mirror.flush()
    assert await client.get("health:collector") is None
    assert mirror.stale_skipped == {"health": 1}


async def test_an_event_dated_in_the_future_holds_its_key_for_one_ttl_only(
    client: aioredis.Redis,
) -> None:
    mirror = RedisMirror(client, spread_ttl_s=0.3)
    mirror.stage_events([item(spread("future", "2099-01-01T00:00:00Z"))], BatchOutcome())
    assert await mirror.flush()
    mirror.stage_events([item(spread("now", ago(0)))], BatchOutcome())
    assert await mirror.flush()
    snap = orjson.loads(await get(client, "spreads:BTC:last") or "{}")
    assert snap["event_id"] == "future"  # newest by event time, while it lives
    await asyncio.sleep(0.5)  # its TTL passes: the value and its version expire together
    mirror.stage_events([item(spread("later", ago(0)))], BatchOutcome())
    assert await mirror.flush()
    snap = orjson.loads(await get(client, "spreads:BTC:last") or "{}")
    assert snap["event_id"] == "later"


# --- a key's expiry counts from its value's event time ----------------------------------------


def ago(seconds: float) -> str:
    """An event time ``seconds`` before now (negative: in the future), ISO-8601 UTC."""
    return events.utc_iso(dt.datetime.now(UTC) - dt.timedelta(seconds=seconds))


async def test_catch_up_after_an_outage_never_serves_old_values_as_fresh(
    redis_url: str, client: aioredis.Redis
) -> None:
    """Events taken in during a 35 s Redis outage: only what is still within its TTL is written."""
    url = urllib.parse.urlsplit(redis_url)
    port = free_port()
    flaky = redis_async(f"redis://127.0.0.1:{port}{url.path}", socket_timeout_s=0.2)
    try:
        m = RedisMirror(flaky, fx_ttl_s=10.0, spread_ttl_s=60.0, health_ttl_s=10.0)
        # Committed while the mirror could not write: USDKRW last moved 34 s ago, EURKRW 4 s
        # ago; the collector's last heartbeat and BTC spread are 34 s old, ETH's 4 s.
        m.stage_events(
            [
                item(fx("u-old", ago(35), "1380")),
                item(fx("u-last", ago(34), "1381")),
                item(fx("e-last", ago(4), "1500.5", pair="EURKRW")),
                item(heartbeat("collector", ago(34))),
                item(spread("b-last", ago(34))),
                item(spread("e-last", ago(4), symbol="ETH")),
            ],
            BatchOutcome(),
        )
        assert await m.flush() is False
        assert m.pending == 5
        async with tcp_proxy(port, url.hostname or "127.0.0.1", url.port or 6379):
            assert await m.flush() is True
            assert m.pending == 0  # the old values are dropped, not retried
        # Older than their TTL: not written at all (nor their versions).
        assert await client.get("fx:usdkrw") is None
        assert await client.get("health:collector") is None
        for key in ("fx:usdkrw", "health:collector"):
            assert await client.get(VERSION_KEY_PREFIX + key) is None
        # Recent ones: written with what is left of their TTL counted from the event time.
        assert await get(client, "fx:eurkrw") == "1500.5"
        assert 0 < await client.pttl("fx:eurkrw") <= 6_000
        assert 0 < await client.pttl(VERSION_KEY_PREFIX + "fx:eurkrw") <= 6_000
        snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
        assert snap["event_id"] == "b-last"
        assert 0 < await client.pttl("spreads:BTC:last") <= 26_000
        assert 0 < await client.pttl("spreads:ETH:last") <= 56_000
        assert m.stale_skipped == {"fx": 1, "health": 1}
    finally:
        await flaky.aclose()


async def test_a_spread_older_than_its_ttl_never_becomes_last(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    # The key has expired (or was never written): a 120-day-old spread does not fill it.
    mirror.stage_events([item(spread("ancient", ago(120 * 86_400)))], BatchOutcome())
    assert await mirror.flush()
    assert await client.get("spreads:BTC:last") is None
    assert await mirror.read_versions(["spreads:BTC:last"]) == [None]
    # Nor one just past its 60 s TTL; one just within it is written, with what is left.
    mirror.stage_events([item(spread("s61", ago(61), symbol="ETH"))], BatchOutcome())
    mirror.stage_events([item(spread("s30", ago(30), symbol="XRP"))], BatchOutcome())
    assert await mirror.flush()
    assert await client.get("spreads:ETH:last") is None
    assert orjson.loads(await client.get("spreads:XRP:last") or b"null")["event_id"] == "s30"
    assert 0 < await client.pttl("spreads:XRP:last") <= 30_000
    assert mirror.stale_skipped == {"spread": 2}


async def test_a_future_dated_event_lives_no_longer_than_its_ttl_from_now(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    """A producer clock running ahead cannot keep a key alive past its TTL from now."""
    mirror.stage_events(
        [
            item(fx("f", ago(-3600), "1390")),
            item(spread("s", ago(-86_400))),
            item(heartbeat("collector", ago(-30))),
        ],
        BatchOutcome(),
    )
    assert await mirror.flush()
    assert await get(client, "fx:usdkrw") == "1390"
    for key, ttl_ms in (("fx:usdkrw", 3_000), ("spreads:BTC:last", 60_000)):
        assert 0 < await client.pttl(key) <= ttl_ms
        assert 0 < await client.pttl(VERSION_KEY_PREFIX + key) <= ttl_ms
    assert 0 < await client.pttl("health:collector") <= 10_000
    assert mirror.stale_skipped == {}


async def test_the_remaining_ttl_tells_a_value_s_age(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    """A 2 s-old heartbeat and a 20 s-old spread keep at most TTL minus their age."""
    mirror.stage_events(
        [item(heartbeat("collector", ago(2))), item(spread("s", ago(20)))], BatchOutcome()
    )
    assert await mirror.flush()
    assert 0 < await client.pttl("health:collector") <= 8_000
    assert 0 < await client.pttl("spreads:BTC:last") <= 40_000
    # And the version key holds the event time itself, in microseconds since 1970.
    [version] = await mirror.read_versions(["spreads:BTC:last"])
    snap = orjson.loads(await client.get("spreads:BTC:last") or b"null")
    assert version == version_micros(dt.datetime.fromisoformat(snap["timestamp"]))


async def redis_now_ms(client: aioredis.Redis) -> int:
    """The Redis server's clock, in milliseconds since 1970."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_key_expires_at_its_event_time_plus_its_ttl_on_redis_s_clock(
    mirror: RedisMirror, client: aioredis.Redis
) -> None:
    """PEXPIRETIME (absolute, Redis's clock) is the event time plus the TTL, however late the
    write; for an event dated in the future it is the write time plus the TTL."""
    past = dt.datetime.now(UTC) - dt.timedelta(seconds=7)
    future = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    mirror.stage_events(
        [
            item(spread("s", events.utc_iso(past))),
            item(fx("f", events.utc_iso(future), "1390")),
        ],
        BatchOutcome(),
    )
    before = await redis_now_ms(client)
    assert await mirror.flush()
    after = await redis_now_ms(client)
    # To the millisecond or two: the script rounds what is left of the TTL down to whole ms, and
    # Redis's millisecond clock may tick between its TIME and its SET.
    want = version_micros(past) // 1000 + 60_000
    for key in ("spreads:BTC:last", VERSION_KEY_PREFIX + "spreads:BTC:last"):
        assert want - 2 <= await client.pexpiretime(key) <= want + 2
    for key in ("fx:usdkrw", VERSION_KEY_PREFIX + "fx:usdkrw"):
        assert before + 3_000 <= await client.pexpiretime(key) <= after + 3_000


@pytest.mark.pg
async def test_a_batch_committed_late_serves_no_old_rate_and_is_counted(
    settings: Settings, client: aioredis.Redis
) -> None:
    """After a database outage the events taken in meanwhile commit late; the mirror, written
    right after that commit, leaves out the rate older than its TTL and counts it on /metrics."""
    ops = settings.replace(metrics_port=free_port(), **{"fx.ttl_seconds": 10.0})
    async with Service(ops, stream_intake=False) as service:
        outcomes = await service.submit_many(
            [fx("late", ago(34), "1381"), fx("recent", ago(2), "1500.5", pair="EURKRW")]
        )
        assert outcomes == [Outcome.COMMITTED] * 2
        # Another task's flush may still be writing what this batch staged: wait for it.
        assert service.mirror is not None
        for _ in range(200):
            if sum(service.mirror.stale_skipped.values()) and await client.exists("fx:eurkrw"):
                break
            await asyncio.sleep(0.02)
        samples = await scrape(ops.metrics_port)
    assert by_label(samples, "ingestd_mirror_stale_skipped_total", "key_kind") == {
        "fx": 1,
        "spread": 0,
        "health": 0,
    }
    assert await client.get("fx:usdkrw") is None
    assert await get(client, "fx:eurkrw") == "1500.5"
