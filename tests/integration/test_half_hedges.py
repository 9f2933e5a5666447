"""Half-hedge alerts (ingestd.daemon.hedges) on real PostgreSQL and Redis.

Legs are inserted with explicit event and arrival times, so "older than after_s" is decided by
the data, never by how fast the machine is; the end-to-end test polls with a deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ingestd.daemon.app import Service
from ingestd.daemon.hedges import HalfHedgeMonitor, legs_match
from ingestd.daemon.metrics import Metrics
from ingestd.errors import ConfigError
from ingestd.settings import HalfHedgeSettings, Settings, load_settings

pytestmark = pytest.mark.pg

D = Decimal
AFTER_S = 60.0
_ids = itertools.count()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def monitor(
    pool: asyncpg.Pool, aredis: aioredis.Redis, metrics: Metrics | None = None, **changes: object
) -> HalfHedgeMonitor:
    settings = HalfHedgeSettings(**{"after_s": AFTER_S, **changes})  # type: ignore[arg-type]
    return HalfHedgeMonitor(pool, aredis, metrics or Metrics(), settings=settings)


async def leg(
    db: asyncpg.Connection,
    key: str,
    venue: str,
    qty: str,
    *,
    age_s: float,
    producer: str = "live",
    filled: bool = True,
) -> None:
    """One order leg whose event time and arrival are both ``age_s`` ago (database clock)."""
    await db.execute(
        """
        INSERT INTO orders (event_id, producer, position_key, symbol, venue, side, qty,
                            price_theoretical, price_effective, leg_id, timestamp, created_at)
        VALUES ($1, $2, $3, 'BTC', $4, 'buy', $5::numeric, 100, $6::numeric, $1,
                now() - make_interval(secs => $7), now() - make_interval(secs => $7))
        """,
        f"o-{next(_ids)}",
        producer,
        key,
        venue,
        qty,
        "100" if filled else None,
        age_s,
    )


async def open_alerts(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM alerts WHERE cleared_at IS NULL ORDER BY key")


def test_legs_match_is_exact_at_the_tolerance() -> None:
    tol = D("0.001")
    assert legs_match(D("1000"), D("999"), tol)  # exactly 0.1 % apart
    assert not legs_match(D("1000"), D("998.99999999"), tol)  # one satoshi more
    assert legs_match(D("0.00000000"), D("0"), tol)
    assert not legs_match(D("0.01"), D("0"), tol)  # one leg only
    assert legs_match(D("0.5"), D("0.5"), D("0"))


async def test_raised_after_the_time_and_cleared_when_the_leg_lands(
    db_pool: asyncpg.Pool, aredis: aioredis.Redis, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    metrics = Metrics()
    m = monitor(db_pool, aredis, metrics)
    await leg(db, "pos_1", "upbit", "0.01", age_s=AFTER_S / 2)
    await leg(db, "pos_ok", "upbit", "0.02", age_s=AFTER_S * 2)
    await leg(db, "pos_ok", "binance_futures", "0.02", age_s=AFTER_S * 2)
    first = await m.run_once()
    assert first is not None and first.raised == [] and first.open == 0
    assert rclient.keys("alerts:*") == []

    # The same lone leg, now older than after_s.
    await db.execute(
        "UPDATE orders SET timestamp = timestamp - interval '40 s', created_at = "
        "created_at - interval '40 s' WHERE position_key = 'pos_1'"
    )
    second = await m.run_once()
    assert second is not None and second.raised == ["pos_1"] and second.open == 1
    raw = rclient.get("alerts:half_hedge:pos_1")
    assert raw is not None
    value = orjson.loads(raw)
    assert value["position_key"] == "pos_1" and value["producer"] == "live"
    assert value["symbol"] == "BTC" and value["filled_venue"] == "upbit"
    assert value["quantity"] == "0.01000000" and value["other_quantity"] == "0"
    assert value["since"].endswith("Z") and value["raised_at"].endswith("Z")
    (row,) = await open_alerts(db)
    assert row["kind"] == "half_hedge" and row["key"] == "pos_1"
    assert metrics.half_hedges_open == 1 and metrics.half_hedges_raised == 1

    # Another round raises nothing new.
    third = await m.run_once()
    assert third is not None and third.raised == [] and third.open == 1
    assert metrics.half_hedges_raised == 1

    # The missing leg lands (just now: matching legs clear at once, whatever their age).
    await leg(db, "pos_1", "binance_futures", "0.01", age_s=0)
    fourth = await m.run_once()
    assert fourth is not None and fourth.cleared == ["pos_1"] and fourth.open == 0
    assert rclient.get("alerts:half_hedge:pos_1") is None
    closed = await db.fetchrow("SELECT * FROM alerts WHERE key = 'pos_1'")
    assert closed is not None and closed["cleared_at"] is not None
    assert closed["cleared_at"] >= closed["raised_at"]
    assert metrics.half_hedges_open == 0 and metrics.half_hedges_cleared == 1


async def test_tolerance_edges_are_exact(
    db_pool: asyncpg.Pool, aredis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    old = AFTER_S * 2
    # 1 BTC against 0.999 BTC: exactly 0.1 % apart, a match.
    await leg(db, "edge_in", "upbit", "1", age_s=old)
    await leg(db, "edge_in", "binance_futures", "0.999", age_s=old)
    # One satoshi further apart: not a match, the heavier venue is binance_futures.
    await leg(db, "edge_out", "upbit", "0.99899999", age_s=old)
    await leg(db, "edge_out", "binance_futures", "1", age_s=old)
    # Two partial fills on one venue that sum to the other venue's one fill: a match.
    await leg(db, "partial", "upbit", "0.3", age_s=old)
    await leg(db, "partial", "upbit", "0.7", age_s=old)
    await leg(db, "partial", "binance_futures", "1", age_s=old)
    # An order without an effective price has not filled: it hedges nothing.
    await leg(db, "unfilled", "upbit", "0.5", age_s=old)
    await leg(db, "unfilled", "binance_futures", "0.5", age_s=old, filled=False)
    # A different producer's leg under the same key never completes this one's hedge.
    await leg(db, "two_producers", "upbit", "0.5", age_s=old, producer="paper")
    await leg(db, "two_producers", "binance_futures", "0.5", age_s=old, producer="live")
    result = await monitor(db_pool, aredis).run_once()
    assert result is not None
    # Each producer's position under the key is half-hedged: two alerts.
    assert sorted(result.raised) == ["edge_out", "two_producers", "two_producers", "unfilled"]
    details = {r["key"]: orjson.loads(r["details"]) for r in await open_alerts(db)}
    assert details["edge_out"]["filled_venue"] == "binance_futures"
    assert details["edge_out"]["quantity"] == "1.00000000"
    assert details["edge_out"]["other_quantity"] == "0.99899999"

    # With a zero tolerance, the exact 0.1 % pair is a half hedge too.
    strict = await monitor(db_pool, aredis, quantity_tolerance=0.0).run_once()
    assert strict is not None and strict.raised == ["edge_in"]


async def test_two_producers_with_one_position_key_never_clear_each_others_alert(
    db_pool: asyncpg.Pool, aredis: aioredis.Redis, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    """A paper and a live trader both counting from pos_7: one alert each, raised and cleared on
    its own legs; the one Redis key stays while either is open and says whose it is (before, the
    second producer's half hedge was folded into the first one's alert and kept it open)."""
    old = AFTER_S * 2
    await leg(db, "pos_7", "upbit", "0.5", age_s=old, producer="paper")
    await db.execute("UPDATE orders SET mode = 'paper' WHERE producer = 'paper'")
    await leg(db, "pos_7", "binance_futures", "0.2", age_s=old, producer="live")
    await db.execute("UPDATE orders SET mode = 'live' WHERE producer = 'live'")
    metrics = Metrics()
    m = monitor(db_pool, aredis, metrics)
    first = await m.run_once()
    assert first is not None and first.raised == ["pos_7", "pos_7"] and first.open == 2
    rows = await db.fetch("SELECT producer, key FROM alerts WHERE cleared_at IS NULL")
    assert sorted(tuple(r) for r in rows) == [("live", "pos_7"), ("paper", "pos_7")]
    value = orjson.loads(rclient.get("alerts:half_hedge:pos_7") or b"null")
    by_producer = {a["producer"]: a for a in value["alerts"]}
    assert set(by_producer) == {"paper", "live"}
    assert by_producer["paper"]["mode"] == "paper" and by_producer["live"]["mode"] == "live"
    assert by_producer["paper"]["quantity"] == "0.5" or by_producer["paper"]["quantity"].startswith(
        "0.5"
    )
    assert by_producer["live"]["filled_venue"] == "binance_futures"
    assert value["producer"] in {"paper", "live"} and "mode" in value

    # The live trader's missing leg lands: only its alert clears; the key stays for paper's.
    await leg(db, "pos_7", "upbit", "0.2", age_s=0, producer="live")
    second = await m.run_once()
    assert second is not None and second.cleared == ["pos_7"] and second.open == 1
    cleared = await db.fetchrow("SELECT producer FROM alerts WHERE cleared_at IS NOT NULL")
    assert cleared is not None and cleared["producer"] == "live"
    value = orjson.loads(rclient.get("alerts:half_hedge:pos_7") or b"null")
    assert value["producer"] == "paper" and value["mode"] == "paper"
    assert [a["producer"] for a in value["alerts"]] == ["paper"]

    # Then paper's: no open alert under the key, the key goes.
    await leg(db, "pos_7", "binance_futures", "0.5", age_s=0, producer="paper")
    third = await m.run_once()
    assert third is not None and third.cleared == ["pos_7"] and third.open == 0
    assert rclient.get("alerts:half_hedge:pos_7") is None
    assert metrics.half_hedges_raised == 2 and metrics.half_hedges_cleared == 2


async def test_the_time_counts_from_a_late_legs_arrival(
    db_pool: asyncpg.Pool, aredis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """A leg whose event is old but which has only just arrived (catch-up) gets the full time."""
    await db.execute(
        """
        INSERT INTO orders (event_id, producer, position_key, symbol, venue, side, qty,
                            price_theoretical, price_effective, leg_id, timestamp)
        VALUES ('late', 'live', 'late_pos', 'BTC', 'upbit', 'sell', 1, 100, 100, 'l0',
                now() - interval '5 minutes')
        """
    )
    result = await monitor(db_pool, aredis).run_once()
    assert result is not None and result.raised == [] and result.open == 0


async def test_two_replicas_raise_one_alert(
    db_pool: asyncpg.Pool,
    db_dsn: str,
    aredis: aioredis.Redis,
    db: asyncpg.Connection,
    rclient: redis.Redis,
) -> None:
    await leg(db, "pos_a", "binance_futures", "0.25", age_s=AFTER_S * 2)
    other_pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    assert other_pool is not None
    try:
        metrics_a, metrics_b = Metrics(), Metrics()
        a = monitor(db_pool, aredis, metrics_a)
        b = monitor(other_pool, aredis, metrics_b)
        for _ in range(5):
            await asyncio.gather(a.run_once(), b.run_once())
        # One row, one raise; and the table itself refuses a second open alert for the key.
        (row,) = await db.fetch("SELECT * FROM alerts")
        assert row["key"] == "pos_a" and row["cleared_at"] is None
        assert metrics_a.half_hedges_raised + metrics_b.half_hedges_raised == 1
        assert metrics_a.half_hedges_open == metrics_b.half_hedges_open == 1
        assert rclient.keys("alerts:half_hedge:*") == [b"alerts:half_hedge:pos_a"]
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute(
                "INSERT INTO alerts (kind, producer, key, details)"
                " VALUES ('half_hedge', 'live', 'pos_a', '{}')"
            )
    finally:
        await other_pool.close()


async def test_redis_follows_the_table(
    db_pool: asyncpg.Pool, aredis: aioredis.Redis, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    """A key left behind (a crash between commit and Redis) goes; a lost key comes back."""
    await leg(db, "pos_x", "upbit", "1", age_s=AFTER_S * 2)
    rclient.set("alerts:half_hedge:gone", b"{}")
    m = monitor(db_pool, aredis)
    assert await m.run_once() is not None
    assert rclient.keys("alerts:half_hedge:*") == [b"alerts:half_hedge:pos_x"]
    rclient.delete("alerts:half_hedge:pos_x")
    assert await m.run_once() is not None
    assert rclient.exists("alerts:half_hedge:pos_x")


async def test_service_raises_and_clears_from_events(
    settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    fast = settings.replace(
        **{
            "stream.enabled": False,
            "half_hedge.after_s": 0.2,
            "half_hedge.check_interval_s": 0.1,
        }
    )

    def order(n: int, venue: str, when: dt.datetime) -> dict[str, object]:
        return {
            "type": "order",
            "event_id": f"svc-{n}",
            "producer": "paper",
            "position_key": "svc_pos",
            "symbol": "ETH",
            "venue": venue,
            "side": "sell" if venue == "upbit" else "long",
            "qty": "0.5",
            "price_theoretical": "100",
            "price_effective": "100",
            "leg_id": f"svc_pos_leg_{n}",
            "timestamp": when.isoformat(),
        }

    async def wait_for(check: Callable[[], object]) -> None:
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    now = dt.datetime.now(dt.UTC)
    async with Service(fast) as service:
        await service.submit(order(0, "upbit", now))
        await wait_for(lambda: rclient.exists("alerts:half_hedge:svc_pos"))
        await service.submit(order(1, "binance_futures", now))
        await wait_for(lambda: not rclient.exists("alerts:half_hedge:svc_pos"))
        assert service.metrics.half_hedges_raised == 1
    row = await db.fetchrow("SELECT * FROM alerts WHERE key = 'svc_pos'")
    assert row is not None and row["cleared_at"] is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"half_hedge.quantity_tolerance": 1.0}, "quantity_tolerance"),
        ({"half_hedge.quantity_tolerance": -0.1}, "quantity_tolerance"),
        ({"half_hedge.venues": "upbit"}, "half_hedge.venues"),
        ({"half_hedge.venues": "upbit,upbit"}, "half_hedge.venues"),
        ({"half_hedge.after_s": 0}, "half_hedge.after_s"),
    ],
)
def test_settings_refuse_what_cannot_work(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ={}, overrides=changes)


def test_tolerance_is_read_as_written(tmp_path: Path) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text("half_hedge:\n  quantity_tolerance: 0.003\n  venues: upbit, bithumb\n")
    settings = load_settings(config, environ={})
    assert settings.half_hedge.tolerance == Decimal("0.003")
    assert settings.half_hedge.venue_pair == ("upbit", "bithumb")
