"""RedisCacheStorage against real Redis: keys, values, TTLs, the mirror's versions."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from decimal import Decimal as D

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Publisher
from ingestd.clients import redis_async
from ingestd.commands.health import check_health
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.sinks.mirror import RedisMirror
from ingestd.errors import ConfigError, InvalidEvent
from ingestd.producer.storage import AsyncRedisCacheStorage, RedisCacheStorage
from ingestd.producer.storage.models import SpreadOpportunity
from ingestd.settings import Settings, load_settings
from ingestd.wire import events
from ingestd.wire.mirror_format import VERSION_KEY_PREFIX
from tests.private_servers import PrivateRedis, acl_denials, producer_url
from tests.samples import fx_rate, spread

pytestmark = pytest.mark.redis


@pytest.fixture
def cache(redis_url: str) -> Iterator[RedisCacheStorage]:
    """The usual construction: the storage.redis mapping of the config."""
    config = {"storage": {"redis": {"url": redis_url}}}
    storage = RedisCacheStorage(config.get("storage", {}).get("redis", {}))
    yield storage
    storage.close()


class Recent:
    """Recent event times (a value older than its TTL is not written): ``at(i)`` is i ms after
    a base 200 ms before the test; ``spread(i)`` is the sample spread ``i`` at ``at(i)``."""

    def __init__(self) -> None:
        self.base = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=200)

    def at(self, ms: float) -> dt.datetime:
        """The base plus ``ms`` milliseconds."""
        return self.base + dt.timedelta(milliseconds=ms)

    def spread(self, i: int, symbol: str = "BTC") -> SpreadOpportunity:
        """``samples.spread(i, symbol)`` dated ``at(i)``."""
        return dataclasses.replace(spread(i, symbol), timestamp=self.at(i))


@pytest.fixture
def recent() -> Recent:
    """Recent event times for this test."""
    return Recent()


def test_storage_calls_write_the_documented_keys_values_and_ttls(
    cache: RedisCacheStorage, rclient: redis.Redis
) -> None:
    assert cache.set_fx_rate("USDKRW", 1350.0, ttl=3)
    assert rclient.get("fx:usdkrw") == b"1350.0"  # the float's repr, never binary noise
    assert 0 < rclient.pttl("fx:usdkrw") <= 3000
    assert cache.get_fx_rate("USDKRW") == D("1350.0")

    assert cache.set_spread_snapshot("BTC", {"spread_pct": 0.8, "net_spread_pct": 0.5})
    stored = orjson.loads(rclient.get("spreads:BTC:last") or b"")
    assert stored["symbol"] == "BTC"
    assert (stored["spread_pct"], stored["net_spread_pct"]) == ("0.8", "0.5")
    assert stored["timestamp"].endswith("Z") and len(stored["timestamp"]) == 27
    assert 55_000 < rclient.pttl("spreads:BTC:last") <= 60_000
    snapshot = cache.get_spread_snapshot("BTC")
    assert snapshot is not None and snapshot["spread_pct"] == D("0.8")
    assert snapshot["timestamp"].tzinfo is not None

    before = dt.datetime.now(dt.UTC)
    for component in ("collector", "paper", "live"):
        assert cache.set_health_heartbeat(component)
        assert 9_000 < rclient.pttl(f"health:{component}") <= 10_000
    beat = cache.get_health_heartbeat("collector")
    assert beat is not None and beat >= before.replace(microsecond=0)
    assert cache.get_fx_rate("EURKRW") is None
    assert cache.get_spread_snapshot("ETH") is None


async def test_heartbeats_satisfy_ingestd_health(cache: RedisCacheStorage, redis_url: str) -> None:
    settings = load_settings(None, environ={}, overrides={"storage.redis.url": redis_url})
    cache.set_health_heartbeat("ingestd")
    cache.set_health_heartbeat("collector")
    ok, message = await check_health(settings, ["ingestd", "collector"], 10)
    assert ok, message
    ok, message = await check_health(settings, ["ingestd", "paper"], 10)
    assert not ok and "paper: no heartbeat" in message


async def test_full_snapshot_is_byte_for_byte_what_ingestds_mirror_writes(
    cache: RedisCacheStorage, redis_url: str, rclient: redis.Redis, recent: Recent
) -> None:
    event = recent.spread(3).to_event(event_id="c1-000042", producer="collector")
    client = redis_async(redis_url, socket_timeout_s=2)
    try:
        mirror = RedisMirror(client)
        ev = events.parse_event(event)
        mirror.stage_events([Item(ev, None, None, None, None, 0.0)], BatchOutcome())  # type: ignore[arg-type]
        assert await mirror.flush()
    finally:
        await client.aclose()
    by_mirror = rclient.get("spreads:BTC:last")
    rclient.delete("spreads:BTC:last", VERSION_KEY_PREFIX + "spreads:BTC:last")
    assert cache.set_spread_snapshot("BTC", event)
    assert rclient.get("spreads:BTC:last") == by_mirror
    rclient.delete("spreads:BTC:last", VERSION_KEY_PREFIX + "spreads:BTC:last")
    assert cache.set_spread_snapshot(
        "BTC", recent.spread(3)
    )  # the model itself: same, without the id
    from_model = orjson.loads(rclient.get("spreads:BTC:last") or b"")
    assert from_model == {**orjson.loads(by_mirror or b""), "event_id": None, "producer": None}


async def test_direct_writes_and_the_mirror_never_regress_each_other(
    cache: RedisCacheStorage, redis_url: str, rclient: redis.Redis, recent: Recent
) -> None:
    client = redis_async(redis_url, socket_timeout_s=2)
    try:
        mirror = RedisMirror(client)

        async def mirrored(i: int) -> None:
            ev = events.parse_event(recent.spread(i).to_event(event_id=f"m{i}"))
            mirror.stage_events([Item(ev, None, None, None, None, 0.0)], BatchOutcome())  # type: ignore[arg-type]
            assert await mirror.flush()

        await mirrored(10)
        # An older snapshot from a producer does not replace the mirror's newer one ...
        assert not cache.set_spread_snapshot("BTC", recent.spread(5))
        assert orjson.loads(rclient.get("spreads:BTC:last") or b"")["event_id"] == "m10"
        # ... a newer one does, and then the mirror's older event does not replace it.
        assert cache.set_spread_snapshot("BTC", recent.spread(20))
        await mirrored(15)
        snapshot = cache.get_spread_snapshot("BTC")
        assert snapshot is not None and snapshot["timestamp"] == recent.at(20)
    finally:
        await client.aclose()
    assert cache.set_fx_rate("USDKRW", "1390.1", timestamp=recent.at(100))
    assert not cache.set_fx_rate("USDKRW", "1300", timestamp=recent.at(50))
    assert cache.get_fx_rate("USDKRW") == D("1390.1")
    # The same event again refreshes its TTL (>=), as the mirror does on redelivery.
    assert cache.set_fx_rate("USDKRW", "1390.1", timestamp=recent.at(100))


def test_key_prefix_and_config_typos(redis_url: str, rclient: redis.Redis) -> None:
    with RedisCacheStorage({"url": redis_url, "key_prefix": "arb:"}) as cache:
        cache.set_fx_rate("EURKRW", D("1500.25"))
        assert rclient.get("arb:fx:eurkrw") == b"1500.25"
        assert rclient.exists(f"arb:{VERSION_KEY_PREFIX}fx:eurkrw")
        assert 0 < rclient.pttl(f"arb:{VERSION_KEY_PREFIX}fx:eurkrw") <= 3000  # the value's TTL
    with pytest.raises(ConfigError, match=r"storage\.redis\.urll"):
        RedisCacheStorage({"urll": redis_url})


def test_settings_carry_the_mirror_ttls(redis_url: str, rclient: redis.Redis) -> None:
    settings: Settings = load_settings(
        None,
        environ={},
        overrides={"storage.redis.url": redis_url, "fx.ttl_seconds": 7, "mirror.spread_ttl_s": 30},
    )
    with RedisCacheStorage(settings) as cache:
        cache.set_fx_rate("USDKRW", 1)
        cache.set_spread_snapshot("ETH", {"spread_pct": "1.5"})
    assert 6_000 < rclient.pttl("fx:usdkrw") <= 7_000
    assert 25_000 < rclient.pttl("spreads:ETH:last") <= 30_000


def test_a_float_with_an_exponent_is_written_as_its_exact_decimal(
    cache: RedisCacheStorage, rclient: redis.Redis
) -> None:
    assert cache.set_fx_rate("USDKRW", 1e-05)  # repr "1e-05"
    assert rclient.get("fx:usdkrw") == b"0.00001"
    assert cache.get_fx_rate("USDKRW") == D("0.00001")
    assert cache.set_spread_snapshot("BTC", {"spread_pct": 5e-05, "net_spread_pct": 1.5e1})
    stored = orjson.loads(rclient.get("spreads:BTC:last") or b"")
    assert (stored["spread_pct"], stored["net_spread_pct"]) == ("0.0001", "15.0")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.set_fx_rate("USDKRW", "abc"), "rate"),
        (lambda c: c.set_fx_rate("USDKRW", float("nan")), "rate"),
        (lambda c: c.set_fx_rate("", 1), "pair"),
        (lambda c: c.set_fx_rate("USDKRW", 1, ttl=0), "ttl"),
        (lambda c: c.set_spread_snapshot("BTC", {"colour": 1}), "colour"),
        (lambda c: c.set_spread_snapshot("BTC", {"spread_pct": "1e999999"}), "spread_pct"),
        (lambda c: c.set_spread_snapshot("BTC", {"symbol": "ETH"}), "symbol"),
        (lambda c: c.set_spread_snapshot("BTC", {"timestamp": "2025-11-15T03:40:15"}), "timestamp"),
        (lambda c: c.set_spread_snapshot("BTC", {"is_opportunity": "yes"}), "is_opportunity"),
        (lambda c: c.set_health_heartbeat("x" * 51), "component"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(
    cache: RedisCacheStorage, rclient: redis.Redis, call: object, field: str
) -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        call(cache)  # type: ignore[operator]
    assert excinfo.value.field == field
    assert rclient.dbsize() == 0


async def test_async_twin_same_keys_and_values(
    redis_url: str, rclient: redis.Redis, recent: Recent
) -> None:
    async with AsyncRedisCacheStorage({"url": redis_url}) as cache:
        assert await cache.set_fx_rate("USDKRW", 1350.0, ttl=3)
        assert await cache.get_fx_rate("USDKRW") == D("1350.0")
        s = recent.spread(1)
        assert await cache.set_spread_snapshot("BTC", s)
        assert not await cache.set_spread_snapshot("BTC", recent.spread(0))  # older
        snapshot = await cache.get_spread_snapshot("BTC")
        assert snapshot is not None and snapshot["upbit_price"] == s.upbit_price
        assert await cache.set_health_heartbeat("paper")
        assert await cache.get_health_heartbeat("paper") is not None
    assert rclient.get("fx:usdkrw") == b"1350.0"
    assert 0 < rclient.pttl("health:paper") <= 10_000


async def test_async_twin_accepts_a_client(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    cache = AsyncRedisCacheStorage(client=client)
    await cache.set_fx_rate("USDKRW", D("1385.12345678"))
    assert await cache.get_fx_rate("USDKRW") == D("1385.12345678")
    await cache.aclose()  # not its client: still open
    assert await client.ping()
    await client.aclose()


# --- under compose's ACL user `producer`, over TLS ----------------------------------------------


async def test_the_producer_acl_user_may_make_every_seed_call_and_nothing_else(
    compose_redis: PrivateRedis, recent: Recent
) -> None:
    url = producer_url(compose_redis)
    admin = compose_redis.admin()
    try:
        with RedisCacheStorage({"url": url}) as cache:
            assert cache.set_fx_rate("USDKRW", 1350.0, ttl=3)
            assert cache.get_fx_rate("USDKRW") == D("1350.0")
            older = recent.at(-1000)  # than the rate just written: its version is read
            assert not cache.set_fx_rate("USDKRW", 1, timestamp=older)
            admin.script_flush()  # a restarted Redis: NOSCRIPT, then SCRIPT LOAD and EVALSHA
            assert cache.set_spread_snapshot("BTC", {"spread_pct": 0.8, "net_spread_pct": 0.5})
            assert cache.set_spread_snapshot("ETH", recent.spread(0, symbol="ETH"))
            snapshot = cache.get_spread_snapshot("BTC")
            assert snapshot is not None and snapshot["spread_pct"] == D("0.8")
            for component in ("collector", "paper", "live"):
                assert cache.set_health_heartbeat(component)
            assert cache.get_health_heartbeat("collector") is not None
            assert cache.get_fx_rate("EURKRW") is None
        async with AsyncRedisCacheStorage({"url": url}) as acache:
            assert await acache.set_fx_rate("EURKRW", "1500.5")
            assert await acache.get_fx_rate("EURKRW") == D("1500.5")
            assert await acache.set_health_heartbeat("paper")
        # The same URL publishes events (one storage.redis section for both).
        publisher = Publisher.from_url(url, stream="ingestd:events")
        publisher.publish(fx_rate(0).to_event(event_id="acl-1", producer="collector"))
        publisher.close()
        assert acl_denials(compose_redis) == []
        assert admin.get("fx:usdkrw") == b"1350.0" and admin.xlen("ingestd:events") == 1

        # What it may not do: the commands reach only their own keys.
        raw = redis.Redis.from_url(url, socket_timeout=5)
        try:
            for refused in (
                lambda: raw.set("ingestd:events", "x"),  # overwrite the stream
                lambda: raw.xadd("fx:usdkrw", {"event": "x"}),
                lambda: raw.get("positions:BTC:open_count"),
                lambda: raw.set("health:ingestd", "forged"),  # the container health check's key
                lambda: raw.delete("fx:usdkrw"),
                lambda: raw.xreadgroup("ingestd", "c", {"ingestd:events": ">"}),
                raw.flushall,
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    refused()
        finally:
            raw.close()
        assert admin.type("ingestd:events") == b"stream"
    finally:
        admin.close()


# --- a key's expiry counts from its value's event time, as in the mirror -------------------------


def test_a_value_older_than_its_ttl_is_not_written(
    cache: RedisCacheStorage, rclient: redis.Redis, recent: Recent
) -> None:
    """A producer's catch-up after an outage: old values are refused, not served as fresh."""
    assert not cache.set_fx_rate("USDKRW", "1381", timestamp=recent.at(-34_000))
    assert rclient.get("fx:usdkrw") is None
    assert cache.get_fx_rate("USDKRW") is None
    ancient = dataclasses.replace(spread(1), timestamp=recent.at(-120 * 86_400_000))
    assert not cache.set_spread_snapshot("BTC", ancient)
    assert not cache.set_spread_snapshot(
        "ETH", {"spread_pct": "0.8", "timestamp": ancient.timestamp}
    )
    assert not cache.set_health_heartbeat("collector", timestamp=recent.at(-11_000))
    assert rclient.dbsize() == 0  # neither the values nor their version keys
    # Within its TTL: written with what is left of it, counted from the event time.
    assert cache.set_fx_rate("USDKRW", "1382", ttl=30, timestamp=recent.at(-20_000))
    assert 0 < rclient.pttl("fx:usdkrw") <= 10_000
    assert cache.set_spread_snapshot(
        "BTC", dataclasses.replace(spread(2), timestamp=recent.at(-40_000))
    )
    assert 0 < rclient.pttl("spreads:BTC:last") <= 20_000


def test_a_future_dated_value_lives_no_longer_than_its_ttl_from_now(
    cache: RedisCacheStorage, rclient: redis.Redis, recent: Recent
) -> None:
    assert cache.set_fx_rate("USDKRW", "1390", timestamp=recent.at(3_600_000))
    assert 0 < rclient.pttl("fx:usdkrw") <= 3_000
    assert cache.set_health_heartbeat("collector", timestamp=recent.at(60_000))
    assert 0 < rclient.pttl("health:collector") <= 10_000


async def test_the_async_twin_refuses_old_values_too(
    redis_url: str, rclient: redis.Redis, recent: Recent
) -> None:
    async with AsyncRedisCacheStorage({"url": redis_url}) as cache:
        assert not await cache.set_fx_rate("USDKRW", "1381", timestamp=recent.at(-34_000))
        assert await cache.set_fx_rate("EURKRW", "1500", ttl=10, timestamp=recent.at(-1_000))
    assert rclient.get("fx:usdkrw") is None
    assert 0 < rclient.pttl("fx:eurkrw") <= 9_000
