"""Paper and live apart (mode, position identity by producer) and stale spread inputs.

Against real PostgreSQL (and TimescaleDB where it runs) and Redis.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal as D
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from ingestd.clients import redis_async
from ingestd.daemon import migrations
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.sinks.mirror import RedisMirror
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.wire import decoding, events
from tests.conftest import PgServer, ingestd_pool
from tests.samples import POSITION_ENTRY, SPREAD_PRICES, position_exit

pytestmark = pytest.mark.pg

UTC = dt.UTC


class Source:
    """A stand-in intake source (acknowledges nothing)."""

    name = "test"

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Nothing to acknowledge."""

    def dead_letter_key(self, item: Item) -> str | None:
        """Dead letters keyed by event id."""
        return None if item.event is None else f"test:{item.event.event_id}"


SRC = Source()


def item(obj: dict[str, Any]) -> Item:
    raw = orjson.dumps(obj)
    return Item(decoding.decode_event(raw, max_bytes=1 << 20), None, SRC, None, raw, 0.0)


ENTRY = {"symbol": "BTC", **POSITION_ENTRY}


def with_identity(
    obj: dict[str, Any], *, producer: str | None = None, mode: str | None = None
) -> dict[str, Any]:
    """``obj`` with its producer and mode where given (an event without them is a test too)."""
    if producer is not None:
        obj["producer"] = producer
    if mode is not None:
        obj["mode"] = mode
    return obj


def opened(
    producer: str | None, key: str, mode: str | None = None, eid: str = ""
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "position_open",
        "event_id": eid or f"o-{producer}-{key}",
        "position_key": key,
        **ENTRY,
    }
    return with_identity(obj, producer=producer, mode=mode)


def closed(
    producer: str | None, key: str, pnl: str = "100.00", mode: str | None = None, eid: str = ""
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "position_close",
        "event_id": eid or f"c-{producer}-{key}",
        "position_key": key,
        **position_exit(pnl),
    }
    return with_identity(obj, producer=producer, mode=mode)


def order(producer: str, key: str, mode: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "order",
        "event_id": f"ord-{producer}-{key}",
        "producer": producer,
        "position_key": key,
        "symbol": "BTC",
        "venue": "upbit",
        "side": "sell",
        "qty": "0.01",
        "price_theoretical": "140000000",
        "leg_id": f"{key}_leg_0",
        "timestamp": "2025-11-15T03:00:01Z",
    }
    return with_identity(obj, mode=mode)


def trade(producer: str, key: str, mode: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "trade",
        "event_id": f"tr-{producer}-{key}",
        "producer": producer,
        "position_key": key,
        "symbol": "BTC",
        "direction": "upbit_short_binance_long",
        "size": "0.01",
        "side": "OPEN",
        "timestamp": "2025-11-15T03:00:02Z",
    }
    return with_identity(obj, mode=mode)


@pytest.fixture
async def empty_dsn(server: tuple[str, PgServer]) -> AsyncIterator[str]:
    """An empty (unmigrated) database on this parameter's server."""
    _, srv = server
    url = await srv.create_empty("ingestd_md")
    yield url
    await srv.drop(url)


async def rows_of(conn: asyncpg.Connection, key: str) -> dict[str | None, asyncpg.Record]:
    """The positions named ``key``, by producer."""
    rows = await conn.fetch("SELECT * FROM positions WHERE position_key = $1", key)
    return {r["producer"]: r for r in rows}


# --- position identity ---------------------------------------------------------------------------


async def test_two_producers_with_the_same_key_stay_two_positions(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write(
        [
            item(opened("paper", "pos_001", "paper")),
            item(opened("live", "pos_001", "live")),
            item(opened(None, "pos_001")),
            item(order("paper", "pos_001", "paper")),
            item(order("live", "pos_001", "live")),
            item(trade("live", "pos_001", "live")),
        ]
    )
    # Only the live producer's close: the paper position stays open.
    await sink.write([item(closed("live", "pos_001", "500.00", "live"))])
    rows = await rows_of(conn, "pos_001")
    assert set(rows) == {"paper", "live", None}
    assert (rows["paper"]["status"], rows["paper"]["mode"]) == ("OPEN", "paper")
    assert (rows["live"]["status"], rows["live"]["mode"]) == ("CLOSED", "live")
    assert rows["live"]["pnl_krw"] == D("500.00")
    assert (rows[None]["status"], rows[None]["mode"]) == ("OPEN", None)
    # Each order and trade is linked to its own producer's position.
    links = {
        (r["t"], r["producer"]): (r["position_id"], r["mode"])
        for r in await conn.fetch(
            "SELECT 'orders' AS t, producer, position_id, mode FROM orders "
            "UNION ALL SELECT 'trades', producer, position_id, mode FROM trades"
        )
    }
    assert links == {
        ("orders", "paper"): (rows["paper"]["id"], "paper"),
        ("orders", "live"): (rows["live"]["id"], "live"),
        ("trades", "live"): (rows["live"]["id"], "live"),
    }


async def test_write_once_and_close_before_open_hold_per_producer(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # A close before its open, for each of two producers under one key: each waits for its own.
    await sink.write([item(closed("paper", "k", "1.00")), item(closed("live", "k", "2.00"))])
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 2
    await sink.write([item(opened("live", "k", "live"))])
    rows = await rows_of(conn, "k")
    assert set(rows) == {"live"}
    assert (rows["live"]["status"], rows["live"]["pnl_krw"]) == ("CLOSED", D("2.00"))
    parked = await conn.fetch("SELECT producer FROM position_closes_pending")
    assert [r["producer"] for r in parked] == ["paper"]
    await sink.write([item(opened("paper", "k", "paper"))])
    rows = await rows_of(conn, "k")
    assert (rows["paper"]["status"], rows["paper"]["pnl_krw"]) == ("CLOSED", D("1.00"))
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0
    # A second open of the paper position is a conflict; the live one is untouched by it.
    late = item({**opened("paper", "k", "paper", eid="o-again"), "size": "9"})
    outcome = await sink.write([late])
    assert outcome.rejected == {id(late): "conflict: position k already opened by event o-paper-k"}
    after = await rows_of(conn, "k")
    assert after == rows


async def test_a_close_names_the_mode_when_its_open_did_not(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(opened("bot", "m1"))])
    await sink.write([item(closed("bot", "m1", mode="live"))])
    assert (await rows_of(conn, "m1"))["bot"]["mode"] == "live"


# --- PnL by mode ---------------------------------------------------------------------------------


async def test_pnl_by_mode_never_mixes_paper_with_live(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    batch = []
    for producer, mode, pnl in [
        ("paper", "paper", "100.00"),
        ("paper2", "paper", "10.00"),
        ("live", "live", "1000.00"),
        ("old", None, "7.00"),
    ]:
        batch += [item(opened(producer, "same", mode)), item(closed(producer, "same", pnl))]
    await sink.write(batch)
    by_mode = {
        r["mode"]: r
        for r in await conn.fetch(
            "SELECT * FROM daily_pnl_summary_by_mode WHERE trade_date = '2025-11-15'"
        )
    }
    assert set(by_mode) == {"paper", "live", None}
    assert (by_mode["paper"]["trade_count"], by_mode["paper"]["total_pnl_krw"]) == (2, D("110.00"))
    assert (by_mode["live"]["trade_count"], by_mode["live"]["total_pnl_krw"]) == (1, D("1000.00"))
    assert by_mode["live"]["max_pnl_krw"] == by_mode["live"]["min_pnl_krw"] == D("1000.00")
    assert (by_mode[None]["trade_count"], by_mode[None]["total_pnl_krw"]) == (1, D("7.00"))
    # daily_pnl_summary keeps its definition: every book together.
    await conn.execute("SELECT ingestd_refresh_aggregate('daily_pnl_summary')")
    total = await conn.fetchrow("SELECT * FROM daily_pnl_summary WHERE trade_date = '2025-11-15'")
    assert total is not None
    assert (total["trade_count"], total["total_pnl_krw"]) == (4, D("1117.00"))


# --- migration 0008 over existing data -----------------------------------------------------------


async def test_0008_applies_over_existing_positions_and_keeps_them_working(
    empty_dsn: str,
) -> None:
    known = migrations.load_migrations()
    before_0008 = [m for m in known if m.version < 8]
    conn = await asyncpg.connect(empty_dsn)
    try:
        await migrations.migrate(conn, before_0008)
        await conn.execute(
            """
            INSERT INTO positions (position_key, producer, symbol, direction, size,
                entry_upbit_price, entry_binance_price, entry_spread_pct, timestamp_open,
                open_event_id)
            VALUES ('old_open', 'paper', 'BTC', 'd', 1, 1, 1, 1, '2025-11-15T03:00:00Z', 'o1'),
                   ('old_null', NULL, 'ETH', 'd', 1, 1, 1, 1, '2025-11-15T03:00:00Z', 'o2');
            INSERT INTO positions (position_key, producer, symbol, direction, size,
                entry_upbit_price, entry_binance_price, entry_spread_pct, timestamp_open,
                exit_upbit_price, pnl_krw, pnl_pct, timestamp_close, status, open_event_id,
                close_event_id)
            VALUES ('old_closed', 'paper', 'BTC', 'd', 1, 1, 1, 1, '2025-11-15T03:00:00Z',
                    2, 50.5, 1, '2025-11-15T05:00:00Z', 'CLOSED', 'o3', 'c3');
            INSERT INTO position_closes_pending (position_key, event_id, producer, pnl_krw,
                timestamp_close)
            VALUES ('old_parked', 'c4', 'paper', 9, '2025-11-15T05:00:00Z');
            INSERT INTO spreads (event_id, producer, symbol, upbit_price, binance_price,
                binance_price_krw, spread_pct, net_spread_pct, timestamp)
            VALUES ('s1', 'collector', 'BTC', 1, 1, 1, 1, 1, now());
            SELECT ingestd_refresh_aggregate('daily_pnl_summary');
            """
        )
        view_sql = "SELECT pg_get_viewdef('daily_pnl_summary'::regclass)"
        seed_view = await conn.fetchval(view_sql)
        seed_rows = [tuple(r) for r in await conn.fetch("SELECT * FROM daily_pnl_summary")]

        assert await migrations.migrate(conn) == [f"{m.version:04d}_{m.name}" for m in known[7:]]

        assert await conn.fetchval(view_sql) == seed_view
        await conn.execute("SELECT ingestd_refresh_aggregate('daily_pnl_summary')")
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM daily_pnl_summary")] == seed_rows
        modes = await conn.fetch("SELECT DISTINCT mode FROM positions")
        assert [r["mode"] for r in modes] == [None]
        assert await conn.fetchval("SELECT is_stale FROM spreads") is False
    finally:
        await conn.close()

    # The sink goes on with the old rows: a close of an old open, a NULL producer's close, the
    # parked close's open, and another producer's open under an old key is a new position.
    pool = await ingestd_pool(empty_dsn)
    try:
        sink = PostgresSink(pool)
        outcome = await sink.write(
            [
                item(closed("paper", "old_open", "1.00")),
                item(closed(None, "old_null", "2.00")),
                item(opened("paper", "old_parked", "paper")),
                item(opened("live", "old_open", "live")),
                item(order("paper", "old_open")),
            ]
        )
        assert not outcome.rejected
        late = item(closed("paper", "old_closed", "3.00", eid="c-other"))
        outcome = await sink.write([late])
        assert outcome.rejected == {
            id(late): "conflict: position old_closed already closed by event c3"
        }
        conn = await asyncpg.connect(empty_dsn)
        try:
            old_open = await rows_of(conn, "old_open")
            assert set(old_open) == {"paper", "live"}
            assert old_open["paper"]["status"] == "CLOSED"
            assert old_open["live"]["status"] == "OPEN"
            assert (await rows_of(conn, "old_null"))[None]["status"] == "CLOSED"
            parked = (await rows_of(conn, "old_parked"))["paper"]
            assert (parked["status"], parked["pnl_krw"]) == ("CLOSED", D("9.00"))
            linked = await conn.fetchval("SELECT position_id FROM orders")
            assert linked == old_open["paper"]["id"]
        finally:
            await conn.close()
    finally:
        await pool.close()


# --- stale spreads -------------------------------------------------------------------------------


def spread(eid: str, at: dt.datetime, **times: dt.datetime) -> dict[str, Any]:
    return {
        "type": "spread",
        "event_id": eid,
        "producer": "collector",
        **SPREAD_PRICES,
        "symbol": eid.split("-", maxsplit=1)[0],
        "timestamp": at.isoformat(),
        **{name: t.isoformat() for name, t in times.items()},
    }


async def test_stale_spreads_are_stored_flagged_and_mirrored(
    sink: PostgresSink, conn: asyncpg.Connection, redis_url: str
) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    s = dt.timedelta(seconds=1)
    batch = [
        item(spread("FRESH-1", now, upbit_ts=now - s, binance_ts=now - 2 * s, fx_ts=now - 3 * s)),
        item(spread("SKEW-1", now, upbit_ts=now, binance_ts=now - 2.5 * s, fx_ts=now)),
        item(spread("FXOLD-1", now, upbit_ts=now, binance_ts=now, fx_ts=now - 3.5 * s)),
        item(spread("NOTIMES-1", now)),
        item(spread("ONLYFX-1", now, fx_ts=now - 10 * s)),
    ]
    outcome = await sink.write(batch)
    assert outcome.inserted == {"spreads": 5}
    stored = {
        r["symbol"]: r
        for r in await conn.fetch("SELECT symbol, is_stale, upbit_ts, fx_ts FROM spreads")
    }
    assert {k: r["is_stale"] for k, r in stored.items()} == {
        "FRESH": False,
        "SKEW": True,
        "FXOLD": True,
        "NOTIMES": False,
        "ONLYFX": True,
    }
    assert stored["FRESH"]["upbit_ts"] == now - s
    assert stored["NOTIMES"]["upbit_ts"] is None

    client: aioredis.Redis = redis_async(redis_url, socket_timeout_s=1.0)
    try:
        mirror = RedisMirror(client, fx_ttl_s=3.0, spread_ttl_s=60.0, health_ttl_s=10.0)
        mirror.stage_events(batch, outcome)
        assert await mirror.flush() is True
        skew = orjson.loads(await client.get("spreads:SKEW:last") or b"null")
        assert skew["is_stale"] is True
        assert dt.datetime.fromisoformat(skew["binance_ts"]) == now - 2.5 * s
        assert skew["binance_ts"].endswith("Z")
        fresh = orjson.loads(await client.get("spreads:FRESH:last") or b"null")
        assert fresh["is_stale"] is False
        assert dt.datetime.fromisoformat(fresh["fx_ts"]) == now - 3 * s
        none = orjson.loads(await client.get("spreads:NOTIMES:last") or b"null")
        assert (none["is_stale"], none["upbit_ts"], none["binance_ts"], none["fx_ts"]) == (
            False,
            None,
            None,
            None,
        )
    finally:
        await client.aclose()


async def test_a_redelivered_spread_judged_under_other_limits_is_a_duplicate(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # is_stale is ingestd's judgement, not the producer's content: after a restart with another
    # skew the same event is still a redelivery, not a conflict.
    now = dt.datetime.now(UTC).replace(microsecond=0)
    obj = spread("BTC-1", now, upbit_ts=now, binance_ts=now - dt.timedelta(seconds=3))
    await sink.write([item(obj)])
    try:
        events.configure_staleness(max_skew_s=10.0, fx_ttl_s=3.0)
        again = item(obj)
        assert again.event is not None and again.event.values["is_stale"] == "false"
        outcome = await sink.write([again])
    finally:
        events.configure_staleness(max_skew_s=2.0, fx_ttl_s=3.0)
    assert (outcome.duplicates, outcome.rejected) == (1, {})
    assert await conn.fetchval("SELECT is_stale FROM spreads") is True
