"""The PostgreSQL sink against a real server (plain PostgreSQL, and TimescaleDB where it runs)."""

from __future__ import annotations

import asyncio
import decimal
import hashlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from ingestd.daemon.batching import Item
from ingestd.daemon.deadletters import PAYLOAD_PREFIX_CHARS
from ingestd.daemon.sinks.postgres import PostgresSink, fetch_all_open_counts, sweep_parked_closes
from ingestd.errors import InvalidEvent
from ingestd.wire import decoding, events, tables
from tests.conftest import PgServer, ingestd_pool
from tests.sink_items import (
    ENTRY,
    EXIT,
    EXIT_B,
    MAX_BYTES,
    SRC,
    T0,
    dead_item,
    fx,
    heartbeat,
    item,
    order,
    pos_close,
    pos_open,
    spread,
    tampered,
    trade,
    wire,
)

pytestmark = pytest.mark.pg

D = decimal.Decimal


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def dsn(server: tuple[str, PgServer]) -> AsyncIterator[str]:
    """A migrated database for this test on the server of this parameter: a clone of the
    template on plain PostgreSQL, migrated here on TimescaleDB (its scheduler keeps a session on
    the template), with the policy jobs held (the samples are older than the retention)."""
    kind, srv = server
    url = await (
        srv.clone() if kind == "postgres" else srv.create_migrated("ingestd_it", hold_jobs=True)
    )
    yield url
    await srv.drop(url)


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Row counts of every table ingestd writes."""
    out = {}
    for t in (
        "spreads",
        "fx_rates",
        "orders",
        "trades",
        "positions",
        "dead_letters",
        "position_closes_pending",
    ):
        out[t] = await conn.fetchval(f"SELECT count(*) FROM {t}")
    return out


# --- append-only tables ----------------------------------------------------------------------


async def test_mixed_batch_commits(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    batch = [
        item(spread("s1", "BTC", "2025-11-15T12:40:15.123+09:00")),
        item(spread("s2", "ETH")),
        item(spread("s3", "BTC", "2025-11-15T03:40:16Z", is_opportunity=False)),
        item(fx("f1")),
        item(fx("f2", pair="EURKRW", rate="1500.5")),
        item(order("o1", None)),
        item(trade("t1", None)),
        item(heartbeat()),
        item(pos_open("pos_001")),
    ]
    outcome = await sink.write(batch)
    assert outcome.inserted == {"spreads": 3, "fx_rates": 2, "orders": 1, "trades": 1}
    assert outcome.duplicates == 0
    assert outcome.rejected == {}
    assert outcome.dead_letters == 0
    assert outcome.open_counts == {"BTC": 1}
    assert await counts(conn) == {
        "spreads": 3,
        "fx_rates": 2,
        "orders": 1,
        "trades": 1,
        "positions": 1,
        "dead_letters": 0,
        "position_closes_pending": 0,
    }
    row = await conn.fetchrow(
        "SELECT event_id, producer, symbol, is_opportunity, timestamp FROM spreads"
        " WHERE event_id = 's1'"
    )
    assert row is not None
    assert (row["producer"], row["symbol"], row["is_opportunity"]) == ("collector", "BTC", True)
    assert (
        row["timestamp"]
        == decoding.decode_event(
            orjson.dumps(spread("s1", "BTC", "2025-11-15T12:40:15.123+09:00")), max_bytes=MAX_BYTES
        ).time
    )
    assert await conn.fetchval("SELECT is_opportunity FROM spreads WHERE event_id='s3'") is False
    orow = await conn.fetchrow("SELECT position_key, position_id, order_id FROM orders")
    assert orow is not None
    assert tuple(orow) == (None, None, None)


async def test_numeric_values_are_exact(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    # JSON numbers with more digits than a double holds, digits beyond the scale (rounded half
    # away from zero, as PostgreSQL rounds), exponents, and decimal strings.
    s_raw = wire(
        {
            "type": "spread",
            "event_id": "n1",
            "symbol": "BTC",
            "is_opportunity": False,
            "timestamp": T0,
        },
        upbit_price="1234567890123456.785",
        binance_price="1234567890.123456785",
        binance_price_krw="-1234567890123456.785",
        spread_pct="3.18365",
        net_spread_pct="-2.98365",
    )
    f_raw = wire(
        {"type": "fx_rate", "event_id": "n2", "pair": "USDKRW", "timestamp": T0},
        rate="1234567890.12345678",
    )
    f2_raw = wire(
        {"type": "fx_rate", "event_id": "n3", "pair": "USDKRW", "timestamp": T0},
        rate="1.5E-7",
    )
    f3 = fx("n4", rate="0.000000005")
    f4 = fx("n5", rate="-0.000000005")
    f5 = fx("n6", rate="9999999999.99999999")
    o_raw = wire(
        {
            "type": "order",
            "event_id": "n7",
            "symbol": "BTC",
            "venue": "binance_futures",
            "side": "short",
            "leg_id": "l",
            "timestamp": T0,
        },
        qty="12",
        price_theoretical="98012.12345678",
        slippage_bps="123456.785",
    )
    outcome = await sink.write(
        [item(s_raw), item(f_raw), item(f2_raw), item(f3), item(f4), item(f5), item(o_raw)]
    )
    assert outcome.rejected == {}
    s = await conn.fetchrow("SELECT * FROM spreads WHERE event_id = 'n1'")
    assert s is not None
    assert s["upbit_price"] == D("1234567890123456.79")
    assert s["binance_price"] == D("1234567890.12345679")
    assert s["binance_price_krw"] == D("-1234567890123456.79")
    assert s["spread_pct"] == D("3.1837")
    assert s["net_spread_pct"] == D("-2.9837")
    rates = {
        r["event_id"]: r["rate"] for r in await conn.fetch("SELECT event_id, rate FROM fx_rates")
    }
    assert rates == {
        "n2": D("1234567890.12345678"),
        "n3": D("0.00000015"),
        "n4": D("0.00000001"),
        "n5": D("-0.00000001"),
        "n6": D("9999999999.99999999"),
    }
    o = await conn.fetchrow("SELECT qty, price_theoretical, slippage_bps FROM orders")
    assert o is not None
    assert tuple(o) == (D("12"), D("98012.12345678"), D("123456.79"))
    # ingestd's rounding is PostgreSQL's own: the same literals cast by the server agree.
    for literal, stored, typ in [
        ("1234567890123456.785", s["upbit_price"], "numeric(18,2)"),
        ("-2.98365", s["net_spread_pct"], "numeric(8,4)"),
        ("123456.785", o["slippage_bps"], "numeric(8,2)"),
        ("-0.000000005", rates["n5"], "numeric(18,8)"),
    ]:
        assert await conn.fetchval(f"SELECT $1::text::{typ}", literal) == stored


async def test_redelivered_batch_inserts_nothing(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    batch = [item(spread(f"s{i}", "BTC", f"2025-11-15T03:40:{i:02d}Z")) for i in range(20)] + [
        item(fx("f1")),
        item(order("o1", None)),
        item(trade("t1", None)),
    ]
    first = await sink.write(batch)
    assert first.inserted == {"spreads": 20, "fx_rates": 1, "orders": 1, "trades": 1}
    before = await counts(conn)

    again = await sink.write(batch)  # the merge path: COPY meets a unique violation
    assert again.inserted == {"spreads": 0, "fx_rates": 0, "orders": 0, "trades": 0}
    assert again.duplicates == len(batch)
    assert again.rejected == {}
    assert await counts(conn) == before

    # Half old, half new: only the new rows land.
    mixed = [item(spread(f"s{i}", "BTC", f"2025-11-15T03:40:{i:02d}Z")) for i in range(10, 30)]
    third = await sink.write(mixed)
    assert third.inserted == {"spreads": 10}
    assert third.duplicates == 10
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 30
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM spreads") == 30


async def test_same_event_twice_in_one_batch_lands_once(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # The same instant written with two offsets is the same event time.
    a = spread("dup", "BTC", "2025-11-15T12:40:15.123+09:00")
    b = spread("dup", "BTC", "2025-11-15T03:40:15.123Z")
    outcome = await sink.write([item(a), item(b), item(spread("other"))])
    assert outcome.inserted == {"spreads": 2}
    assert outcome.duplicates == 1
    assert await conn.fetchval("SELECT count(*) FROM spreads WHERE event_id='dup'") == 1
    # Same event_id at another event time is another event (the key is (event_id, time)).
    outcome = await sink.write([item(spread("dup", "BTC", "2025-11-15T03:40:16Z"))])
    assert outcome.inserted == {"spreads": 1}


async def test_concurrent_redelivery_from_two_replicas(dsn: str, conn: asyncpg.Connection) -> None:
    pools = [await ingestd_pool(dsn), await ingestd_pool(dsn)]
    try:
        sinks = [PostgresSink(p) for p in pools]
        batch = [
            item(spread(f"c{i}", "BTC", f"2025-11-15T03:{i // 60:02d}:{i % 60:02d}Z"))
            for i in range(300)
        ]
        outcomes = await asyncio.gather(*(s.write(batch) for s in sinks))
        assert sum(o.inserted.get("spreads", 0) for o in outcomes) == 300
        assert sum(o.duplicates for o in outcomes) == 300
        assert await conn.fetchval("SELECT count(*) FROM spreads") == 300
    finally:
        for p in pools:
            await p.close()


# --- rows the database rejects -------------------------------------------------------------


async def test_row_the_database_rejects_becomes_the_only_dead_letter(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    good = [item(spread(f"g{i}", "BTC", f"2025-11-15T03:41:{i:02d}Z")) for i in range(12)]
    too_long = tampered(spread("bad-symbol"), symbol="ABCDEFGHIJK")  # VARCHAR(10)
    bad_time = tampered(fx("bad-time"), timestamp="2025-02-30T00:00:00Z")
    # Valid RFC 3339, accepted by the validator, refused by PostgreSQL (offset beyond 15:59).
    far_offset = item(fx("far-offset", ts="2025-11-15T03:40:15+20:00"))
    bad_open = tampered(pos_open("pos_bad"), symbol="ABCDEFGHIJK")
    batch = [
        *good[:5],
        too_long,
        *good[5:9],
        bad_time,
        item(fx("f-ok")),
        far_offset,
        *good[9:],
        bad_open,
        item(pos_open("pos_ok")),
        item(order("o-ok", "pos_ok")),
    ]
    outcome = await sink.write(batch)

    bad = {id(too_long), id(bad_time), id(far_offset), id(bad_open)}
    assert set(outcome.rejected) == bad
    assert "character varying(10)" in outcome.rejected[id(too_long)]
    assert "out of range" in outcome.rejected[id(bad_time)]
    assert "time zone" in outcome.rejected[id(far_offset)]
    assert "character varying(10)" in outcome.rejected[id(bad_open)]
    assert outcome.inserted == {"spreads": 12, "fx_rates": 1, "orders": 1}
    assert outcome.dead_letters == 4
    assert outcome.open_counts == {"BTC": 1}

    c = await counts(conn)
    assert (c["spreads"], c["fx_rates"], c["orders"], c["positions"], c["dead_letters"]) == (
        12,
        1,
        1,
        1,
        4,
    )
    rows = {
        r["event_id"]: r
        for r in await conn.fetch(
            "SELECT event_id, event_type, producer, source, error, payload, payload_bytes,"
            " payload_sha256 FROM dead_letters"
        )
    }
    assert set(rows) == {"bad-symbol", "bad-time", "far-offset", "open-pos_bad"}
    assert rows["bad-symbol"]["event_type"] == "spread"
    assert rows["bad-symbol"]["source"] == "test"
    assert "character varying(10)" in rows["bad-symbol"]["error"]
    assert "SQLSTATE 22001" in rows["bad-symbol"]["error"]
    assert "time zone" in rows["far-offset"]["error"]
    assert rows["open-pos_bad"]["event_type"] == "position_open"
    raw = far_offset.raw
    assert isinstance(raw, bytes)
    assert rows["far-offset"]["payload"] == raw.decode()
    assert rows["far-offset"]["payload_bytes"] == len(raw)
    assert rows["far-offset"]["payload_sha256"].strip() == hashlib.sha256(raw).hexdigest()


async def test_a_refused_in_process_event_is_dead_lettered_as_its_wire_form(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    """An in-process event has no raw payload: its dead letter must still be the event as a
    producer would send it (replayable JSON that decodes back to the same event), as the
    pipeline's own dead letters are, not a Python repr of its values."""
    far_offset = item(fx("far-offset", ts="2025-11-15T03:40:15+20:00"))
    in_process = Item(far_offset.event, None, SRC, None, None, time.monotonic())
    outcome = await sink.write([in_process])
    assert outcome.dead_letters == 1
    payload = await conn.fetchval("SELECT payload FROM dead_letters WHERE event_id = 'far-offset'")
    assert far_offset.event is not None
    assert orjson.loads(payload) == events.to_wire(far_offset.event)
    again = decoding.decode_event(payload.encode(), max_bytes=MAX_BYTES, default_event_id=None)
    assert again.values == far_offset.event.values


async def test_rejected_redelivery_is_one_dead_letter(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    def batch() -> list[Item]:
        bad = item(spread("bad", ts="2025-11-15T03:40:15+20:00"), token="1-0")
        return [bad, item(spread("ok"), token="2-0")]

    first = await sink.write(batch())
    second = await sink.write(batch())
    assert len(first.rejected) == len(second.rejected) == 1
    assert second.duplicates == 1
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1
    assert await conn.fetchval("SELECT dedup_key FROM dead_letters") == "test:1-0"


async def test_rejected_rows_in_the_merge_path(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # Redelivered rows and a bad row in one batch: duplicates merge, the bad row is isolated.
    old = [item(spread(f"m{i}", "BTC", f"2025-11-15T03:42:{i:02d}Z")) for i in range(6)]
    await sink.write(old)
    bad = tampered(spread("m-bad"), symbol="ABCDEFGHIJK")
    new = [item(spread(f"n{i}", "BTC", f"2025-11-15T03:43:{i:02d}Z")) for i in range(3)]
    outcome = await sink.write([*old[:3], bad, *new, *old[3:]])
    assert set(outcome.rejected) == {id(bad)}
    assert outcome.inserted == {"spreads": 3}
    assert outcome.duplicates == 6
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 9


# --- dead letters given as items -----------------------------------------------------------


async def test_dead_letter_items_are_stored_with_payload_size_and_digest(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    raw = b'{"type": "spread", "oops"'
    outcome = await sink.write(
        [
            dead_item(raw, "not valid JSON", dedup_key="stream:ingestd:events:1-0"),
            item(spread("s1")),
        ]
    )
    assert outcome.dead_letters == 1
    assert outcome.inserted == {"spreads": 1}
    row = await conn.fetchrow("SELECT * FROM dead_letters")
    assert row is not None
    assert row["payload"] == raw.decode()
    assert row["payload_bytes"] == len(raw)
    assert row["payload_sha256"].strip() == hashlib.sha256(raw).hexdigest()
    assert row["error"] == "not valid JSON"
    assert row["source"] == "test"
    assert row["dedup_key"] == "stream:ingestd:events:1-0"
    assert row["received_at"] is not None


async def test_dead_letter_with_same_dedup_key_is_stored_once(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    raw = b"not json"
    await sink.write([dead_item(raw, "bad", dedup_key="k1"), dead_item(raw, "bad", dedup_key="k1")])
    await sink.write([dead_item(raw, "bad", dedup_key="k1")])
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1
    # Without a key nothing can tell a redelivery apart: each one is recorded.
    await sink.write([dead_item(raw, "bad", dedup_key=None)])
    await sink.write([dead_item(raw, "bad", dedup_key=None)])
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 3


async def test_dead_letter_payload_with_invalid_utf8_and_nul_is_escaped(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    raw_bytes = b'{"symbol": "\xff\xfe\xc3"}\x00tail'
    raw_text = '{"symbol": "\ud800"}\x00'  # a lone surrogate, as Python's json lets through
    await sink.write(
        [
            dead_item(raw_bytes, "not valid JSON", dedup_key="b"),
            dead_item(raw_text, "lone surrogate \ud800", dedup_key="t"),
        ]
    )
    rows = {r["dedup_key"]: r for r in await conn.fetch("SELECT * FROM dead_letters")}
    b = rows["b"]
    assert b["payload"] == '{"symbol": "\\xff\\xfe\\xc3"}\\x00tail'
    assert b["payload_bytes"] == len(raw_bytes)
    assert b["payload_sha256"].strip() == hashlib.sha256(raw_bytes).hexdigest()
    t = rows["t"]
    assert t["payload"] == '{"symbol": "\\ud800"}\\x00'
    assert "\\ud800" in t["error"]
    data = raw_text.encode("utf-8", errors="surrogatepass")
    assert t["payload_bytes"] == len(data)
    assert t["payload_sha256"].strip() == hashlib.sha256(data).hexdigest()


async def test_oversize_dead_letter_keeps_a_prefix(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    raw = b'{"type": "spread", "pad": "' + b"x" * (2 * MAX_BYTES) + b'"}'
    with pytest.raises(InvalidEvent, match="larger than max_event_bytes"):
        decoding.decode_event(raw, max_bytes=MAX_BYTES)
    await sink.write([dead_item(raw, "too large", dedup_key="big")])
    row = await conn.fetchrow("SELECT payload, payload_bytes, payload_sha256 FROM dead_letters")
    assert row is not None
    assert len(row["payload"]) == PAYLOAD_PREFIX_CHARS
    assert raw.decode().startswith(row["payload"])
    assert row["payload_bytes"] == len(raw)
    assert row["payload_sha256"].strip() == hashlib.sha256(raw).hexdigest()


# --- positions ---------------------------------------------------------------------------


async def position(conn: asyncpg.Connection, key: str) -> asyncpg.Record:
    """The one positions row of ``key``."""
    rows = await conn.fetch("SELECT * FROM positions WHERE position_key = $1", key)
    assert len(rows) == 1, rows
    return rows[0]


def assert_closed_with_exit(row: asyncpg.Record) -> None:
    """The row is CLOSED and carries EXIT's values."""
    assert row["status"] == "CLOSED"
    assert row["exit_upbit_price"] == D(EXIT["exit_upbit_price"])
    assert row["exit_binance_price"] == D(EXIT["exit_binance_price"])
    assert row["exit_spread_pct"] == D(EXIT["exit_spread_pct"])
    assert row["pnl_krw"] == D(EXIT["pnl_krw"])
    assert row["pnl_pct"] == D(EXIT["pnl_pct"])
    assert row["timestamp_close"].isoformat() == "2025-11-15T04:00:00+00:00"
    assert row["entry_upbit_price"] == D(ENTRY["entry_upbit_price"])
    assert row["timestamp_open"].isoformat() == "2025-11-15T03:00:00+00:00"


async def test_open_then_close(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    first = await sink.write([item(pos_open("pos_001"))])
    assert first.open_counts == {"BTC": 1}
    row = await position(conn, "pos_001")
    assert row["status"] == "OPEN"
    assert row["exit_upbit_price"] is None
    assert row["open_event_id"] == "open-pos_001"
    assert row["producer"] == "paper"

    second = await sink.write([item(pos_close("pos_001"))])
    assert second.open_counts == {"BTC": 0}
    assert second.open_counts_version is not None
    assert first.open_counts_version is not None
    assert second.open_counts_version > first.open_counts_version
    row = await position(conn, "pos_001")
    assert_closed_with_exit(row)
    assert row["close_event_id"] == "close-pos_001"


async def test_close_before_open_is_parked_then_applied(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    parked = await sink.write([item(pos_close("pos_002"))])
    assert parked.rejected == {}
    assert parked.dead_letters == 0
    assert await conn.fetchval("SELECT count(*) FROM positions") == 0
    pending = await conn.fetchrow("SELECT * FROM position_closes_pending")
    assert pending is not None
    assert pending["position_key"] == "pos_002"
    assert pending["event_id"] == "close-pos_002"
    assert pending["pnl_krw"] == D(EXIT["pnl_krw"])

    # The close redelivered while still parked stays one parked row.
    await sink.write([item(pos_close("pos_002"))])
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 1

    landed = await sink.write([item(pos_open("pos_002"))])
    assert landed.open_counts == {"BTC": 0}
    row = await position(conn, "pos_002")
    assert_closed_with_exit(row)
    assert row["close_event_id"] == "close-pos_002"
    assert row["open_event_id"] == "open-pos_002"
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0


async def test_close_and_open_in_one_batch_in_either_order(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    outcome = await sink.write([item(pos_close("pos_a")), item(pos_open("pos_a"))])
    assert outcome.open_counts == {"BTC": 0}
    assert_closed_with_exit(await position(conn, "pos_a"))
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0


async def test_close_with_entry_columns_before_open_inserts_closed(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    outcome = await sink.write([item(pos_close("pos_003", "ETH", with_entry=True))])
    assert outcome.open_counts == {"ETH": 0}
    row = await position(conn, "pos_003")
    assert_closed_with_exit(row)
    assert row["symbol"] == "ETH"
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0

    # The open arriving afterwards does not reopen it.
    later = await sink.write([item(pos_open("pos_003", "ETH"))])
    assert later.open_counts == {"ETH": 0}
    row = await position(conn, "pos_003")
    assert_closed_with_exit(row)
    assert row["open_event_id"] == "open-pos_003"


async def test_open_redelivered_after_close_stays_closed(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_open("pos_004"))])
    await sink.write([item(pos_close("pos_004"))])
    outcome = await sink.write([item(pos_open("pos_004"))])
    assert outcome.open_counts == {}  # a redelivery changes nothing, so counts nothing
    assert outcome.duplicates == 1
    assert_closed_with_exit(await position(conn, "pos_004"))
    # And the close redelivered changes nothing either.
    await sink.write([item(pos_close("pos_004"))])
    assert_closed_with_exit(await position(conn, "pos_004"))
    assert await conn.fetchval("SELECT count(*) FROM positions") == 1


async def test_orders_and_trades_are_linked_to_their_position(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # Before the position exists: stored, unlinked, nothing rejected.
    early = await sink.write(
        [item(order("o1", "pos_005")), item(trade("t1", "pos_005")), item(order("o0", None))]
    )
    assert early.rejected == {}
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM orders WHERE position_key='pos_005' AND position_id IS NULL"
        )
        == 1
    )
    # The position lands: the earlier rows get its id.
    await sink.write([item(pos_open("pos_005"))])
    pid = (await position(conn, "pos_005"))["id"]
    assert await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o1'") == pid
    assert await conn.fetchval("SELECT position_id FROM trades WHERE event_id='t1'") == pid
    assert await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o0'") is None
    # Once it exists, new rows are linked at once.
    await sink.write(
        [
            item(order("o2", "pos_005", ts="2025-11-15T05:00:00Z")),
            item(trade("t2", "pos_005", ts="2025-11-15T05:00:00Z")),
        ]
    )
    assert await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o2'") == pid
    assert await conn.fetchval("SELECT position_id FROM trades WHERE event_id='t2'") == pid
    # Same batch as the open, and a position created by a close that repeats the entry columns.
    await sink.write([item(order("o3", "pos_006")), item(pos_open("pos_006"))])
    await sink.write([item(trade("t3", "pos_007")), item(pos_close("pos_007", with_entry=True))])
    assert (
        await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o3'")
        == (await position(conn, "pos_006"))["id"]
    )
    assert (
        await conn.fetchval("SELECT position_id FROM trades WHERE event_id='t3'")
        == (await position(conn, "pos_007"))["id"]
    )
    # A parked close does not create the position; the rows stay unlinked until the open.
    await sink.write([item(order("o4", "pos_008")), item(pos_close("pos_008"))])
    assert await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o4'") is None
    await sink.write([item(pos_open("pos_008"))])
    assert (
        await conn.fetchval("SELECT position_id FROM orders WHERE event_id='o4'")
        == (await position(conn, "pos_008"))["id"]
    )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM orders WHERE position_key IS NOT NULL AND position_id IS NULL"
        )
        == 0
    )


async def _db_open_counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT symbol, count(*) FILTER (WHERE status = 'OPEN')::int AS n"
        " FROM positions GROUP BY symbol"
    )
    return {r["symbol"]: r["n"] for r in rows}


async def test_open_counts_are_true_to_the_database(
    sink: PostgresSink, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    first = await sink.write(
        [item(pos_open(f"b{i}", "BTC")) for i in range(3)]
        + [item(pos_open(f"e{i}", "ETH")) for i in range(2)]
    )
    assert first.open_counts == await _db_open_counts(conn) == {"BTC": 3, "ETH": 2}
    second = await sink.write([item(pos_close("b0")), item(pos_close("e0")), item(pos_close("e1"))])
    assert second.open_counts == await _db_open_counts(conn) == {"BTC": 2, "ETH": 0}
    third = await sink.write([item(pos_open("x0", "XRP")), item(spread("s1"))])
    assert third.open_counts == {"XRP": 1}
    db_counts = await _db_open_counts(conn)
    assert {k: db_counts[k] for k in third.open_counts} == third.open_counts
    # The full reconciliation reads the same numbers, with a newer version.
    async with pool.acquire() as c:
        counts_all, version = await fetch_all_open_counts(c)
    assert counts_all == db_counts
    assert third.open_counts_version is not None
    assert version > third.open_counts_version


async def test_opens_and_closes_from_two_replicas_interleaved(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """Opens through one pool, closes through another, concurrently, in random batches."""
    keys = [f"r{i:03d}" for i in range(40)]
    rng = random.Random(7)
    opens = [item(pos_open(k, "BTC" if i % 2 else "ETH")) for i, k in enumerate(keys)]
    closes = [item(pos_close(k)) for k in keys]
    rng.shuffle(opens)
    rng.shuffle(closes)
    pools = [await ingestd_pool(dsn), await ingestd_pool(dsn)]
    try:
        a, b = (PostgresSink(p) for p in pools)

        async def run(sink: PostgresSink, items: list[Item]) -> None:
            for i in range(0, len(items), 5):
                await sink.write(items[i : i + 5])
                await asyncio.sleep(0)

        await asyncio.gather(run(a, opens), run(b, closes))
    finally:
        for p in pools:
            await p.close()
    assert await conn.fetchval("SELECT count(*) FROM positions") == 40
    assert await conn.fetchval("SELECT count(*) FROM positions WHERE status = 'CLOSED'") == 40
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0
    assert await conn.fetchval("SELECT count(*) FROM positions WHERE pnl_krw IS NULL") == 0


async def test_csv_hostile_text_round_trips(sink: PostgresSink, conn: asyncpg.Connection) -> None:
    # COPY ... (FORMAT csv): quotes, delimiters, line breaks, backslashes and the end-of-data
    # marker inside values must arrive exactly.
    texts = ['a"b,c', "x\ny", "\\.", "\\.\n\\.", "r\r\nz", "한국어✓", "\\N", "", "\U0001d518"]
    batch = []
    for i, text in enumerate(texts):
        obj = order(f'e,"{i}"\n', None, ts=f"2025-11-15T03:40:{i:02d}Z")
        obj["venue"] = text or "v"
        obj["leg_id"] = f"leg {text}"
        obj["order_id"] = text or None
        obj["producer"] = f"p\n{i}"
        batch.append(item(obj))
    outcome = await sink.write(batch)
    assert outcome.rejected == {}
    assert outcome.inserted == {"orders": len(texts)}
    rows = {
        r["event_id"]: r
        for r in await conn.fetch("SELECT event_id, producer, venue, leg_id, order_id FROM orders")
    }
    for i, text in enumerate(texts):
        r = rows[f'e,"{i}"\n']
        assert (r["venue"], r["leg_id"], r["order_id"], r["producer"]) == (
            text or "v",
            f"leg {text}",
            text or None,
            f"p\n{i}",
        )
    # Redelivered: the merge path (COPY into a staging table) must read them the same way.
    again = await sink.write(batch)
    assert again.duplicates == len(texts)
    assert await conn.fetchval("SELECT count(*) FROM orders") == len(texts)


async def test_producer_absent_and_event_time_precision(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    obj = spread("p1", ts="2025-11-15T03:40:15.1234565Z")
    del obj["producer"]
    it = item(obj)
    dup_obj = spread("p1", ts="2025-11-15T03:40:15.123457Z")  # the same instant, rounded
    del dup_obj["producer"]  # (a producer where the stored row has none would be a conflict)
    dup = item(dup_obj)
    outcome = await sink.write([it, item(fx("p2", ts="2025-11-15t03:40:15.999999999z"))])
    assert outcome.rejected == {}
    row = await conn.fetchrow("SELECT producer, timestamp FROM spreads")
    assert row is not None
    assert row["producer"] is None
    assert it.event is not None
    assert row["timestamp"] == it.event.time
    assert row["timestamp"].microsecond == 123457
    ts = await conn.fetchval("SELECT timestamp FROM fx_rates")
    assert ts.isoformat() == "2025-11-15T03:40:16+00:00"
    # The redelivered event, written with its time rounded, is the same row.
    again = await sink.write([dup])
    assert again.duplicates == 1


# --- defects found while writing these tests, now fixed ------------------------------------


async def test_database_rejection_names_the_column(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    bad = tampered(order("o-bad", None), leg_id="x" * 101)  # orders has 3 VARCHAR(100) columns
    outcome = await sink.write([bad, item(order("o-ok", None))])
    assert set(outcome.rejected) == {id(bad)}
    reason = outcome.rejected[id(bad)]
    assert "character varying(100)" in reason
    assert "leg_id" in reason
    row = await conn.fetchrow("SELECT field, error FROM dead_letters")
    assert row is not None and row["field"] == "leg_id"


async def test_overlong_dead_letter_key_does_not_fail_the_batch(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    outcome = await sink.write(
        [
            dead_item(b"not json", "not valid JSON", dedup_key="stream:" + "k" * 300 + ":1-0"),
            item(spread("s-ok")),
        ]
    )
    assert outcome.inserted == {"spreads": 1}
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1
    # Two long keys that share their first 300 characters stay two dead letters.
    again = await sink.write(
        [dead_item(b"not json", "not valid JSON", dedup_key="stream:" + "k" * 300 + ":2-0")]
    )
    assert again.dead_letters == 1
    assert await conn.fetchval("SELECT count(DISTINCT dedup_key) FROM dead_letters") == 2


# --- positions, set-based, and the row-by-row fallback -----------------------------------------


async def test_many_opens_and_closes_in_one_batch_land_like_one_by_one(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    batch = [
        item(pos_open("k1")),
        item(pos_close("k1")),  # open and close in one batch
        item(pos_close("k2", with_entry=True)),  # a close before its open, whole
        item(pos_close("k3")),  # a close before its open, parked
        item(pos_open("k4", eid="open-k4-a")),
        item(pos_open("k4", eid="open-k4-b")),  # the same key twice: the first one stands
        *(item(pos_open(f"m{i}", symbol="ETH")) for i in range(50)),
    ]
    outcome = await sink.write(batch)
    assert outcome.rejected == {
        id(batch[5]): "conflict: position k4 already opened by event open-k4-a"
    }
    rows = {
        r["position_key"]: r
        for r in await conn.fetch("SELECT position_key, status, open_event_id FROM positions")
    }
    assert rows["k1"]["status"] == "CLOSED" and rows["k2"]["status"] == "CLOSED"
    assert "k3" not in rows
    assert rows["k4"]["open_event_id"] == "open-k4-a"
    assert sum(1 for k in rows if k.startswith("m")) == 50
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 1
    assert outcome.open_counts == {"BTC": 1, "ETH": 50}  # k4 open; k1, k2 closed
    # The open of the parked close arrives later: it is applied then.
    await sink.write([item(pos_open("k3"))])
    assert await conn.fetchval("SELECT status FROM positions WHERE position_key = 'k3'") == (
        "CLOSED"
    )
    assert await conn.fetchval("SELECT count(*) FROM position_closes_pending") == 0


async def test_a_position_the_database_refuses_costs_only_itself(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    bad = tampered(pos_open("bad"), symbol="ABCDEFGHIJK")  # VARCHAR(10): refused by the database
    good = [item(pos_open(f"g{i}")) for i in range(5)]
    outcome = await sink.write([*good[:2], bad, *good[2:], item(pos_close("g0"))])
    assert set(outcome.rejected) == {id(bad)}  # the set-based statement failed: row by row
    keys = {r["position_key"] for r in await conn.fetch("SELECT position_key FROM positions")}
    assert keys == {f"g{i}" for i in range(5)}
    assert await conn.fetchval("SELECT status FROM positions WHERE position_key = 'g0'") == (
        "CLOSED"
    )
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_open_count_versions_follow_the_order_of_the_counts(
    sink: PostgresSink, conn: asyncpg.Connection, dsn: str
) -> None:
    # Writer A starts first (its transaction id is assigned by its spreads COPY), is held up in
    # its fx_rates COPY, and counts after writer B: A's count is the newer one and its version
    # must say so, or the mirror would keep B's older count (1 open where the database has 0).
    await sink.write([item(pos_open("p"))])
    locker = await asyncpg.connect(dsn)
    tx = locker.transaction()
    await tx.start()
    await locker.execute("LOCK TABLE fx_rates IN ACCESS EXCLUSIVE MODE")
    a = asyncio.create_task(
        sink.write([item(spread("a-s")), item(fx("a-f")), item(pos_close("p"))])
    )
    await asyncio.sleep(0.3)  # A holds its transaction id and waits for fx_rates
    b = await sink.write([item(pos_open("q"))])  # B counts: BTC has 2 open
    await tx.rollback()
    await locker.close()
    a_out = await a  # A counts after B: BTC has 1 open (p closed)
    assert b.open_counts == {"BTC": 2} and a_out.open_counts == {"BTC": 1}
    assert b.open_counts_version is not None and a_out.open_counts_version is not None
    assert a_out.open_counts_version > b.open_counts_version


# --- write-once positions: the first open and the first close that commit stand ----------------


def close_b(key: str, eid: str, *, with_entry: bool = False) -> dict[str, Any]:
    """A close of ``key`` with other exit values than EXIT (another event)."""
    return {**pos_close(key, eid=eid, with_entry=with_entry), **EXIT_B}


def keyed(obj: dict[str, Any]) -> Item:
    """An Item whose dead letter is keyed by its content, as the in-process source keys it."""
    return item(obj, token=hashlib.sha256(orjson.dumps(obj)).hexdigest())


async def dead_letter_reasons(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The dead letters' reasons by event id."""
    out: dict[str, list[str]] = {}
    for r in await conn.fetch("SELECT event_id, error FROM dead_letters ORDER BY id"):
        out.setdefault(r["event_id"], []).append(r["error"])
    return out


async def test_a_second_close_with_another_event_id_is_a_dead_lettered_conflict(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_open("p1"))])
    await sink.write([keyed(pos_close("p1", eid="close-7"))])
    later = keyed(close_b("p1", "close-8"))
    outcome = await sink.write([later])
    assert set(outcome.rejected) == {id(later)}
    assert outcome.rejected[id(later)] == "conflict: position p1 already closed by event close-7"
    assert outcome.open_counts == {}  # nothing changed
    row = await position(conn, "p1")
    assert_closed_with_exit(row)
    assert row["close_event_id"] == "close-7"
    assert await dead_letter_reasons(conn) == {
        "close-8": ["conflict: position p1 already closed by event close-7"]
    }
    # Redelivered, the older close changes nothing; the conflicting one is still one dead letter.
    again = await sink.write(
        [keyed(pos_close("p1", eid="close-7")), keyed(close_b("p1", "close-8"))]
    )
    assert len(again.rejected) == 1
    row = await position(conn, "p1")
    assert_closed_with_exit(row)
    assert row["close_event_id"] == "close-7"
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_a_redelivered_open_or_close_with_other_content_is_a_conflict(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # Same event_id (and time) as the standing open/close, other content: the row stays and the
    # newcomer is a dead letter naming the columns; the identical copy is a plain duplicate.
    await sink.write([item(pos_open("q1"))])
    await sink.write([item(pos_close("q1"))])
    before = await position(conn, "q1")
    bigger = {**pos_open("q1"), "size": "9.5"}
    other_pnl = {**pos_close("q1"), "pnl_krw": "-1.00"}
    same_open, same_close = item(pos_open("q1")), item(pos_close("q1"))
    changed_open, changed_close = keyed(bigger), keyed(other_pnl)
    outcome = await sink.write([same_open, changed_open, same_close, changed_close])
    assert outcome.rejected == {
        id(changed_open): "conflict: position q1 already opened by event open-q1 with other "
        "content (differs in: size)",
        id(changed_close): "conflict: position q1 already closed by event close-q1 with other "
        "content (differs in: pnl_krw)",
    }
    assert outcome.duplicates == 2
    assert await position(conn, "q1") == before
    # The same for a close still parked waiting for its open.
    await sink.write([item(pos_close("q2"))])
    parked_again = keyed({**pos_close("q2"), "pnl_pct": "0.0001"})
    outcome = await sink.write([parked_again])
    assert outcome.rejected[id(parked_again)].endswith("with other content (differs in: pnl_pct)")


async def test_redelivering_the_older_close_does_not_flip_the_row_back(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_open("p2"))])
    await sink.write([item(close_b("p2", "close-b"))])
    await sink.write([item(pos_close("p2", eid="close-a"))])  # a conflict
    before = await position(conn, "p2")
    await sink.write([item(close_b("p2", "close-b"))])  # the standing close, redelivered
    await sink.write([item(pos_close("p2", eid="close-a"))])  # the conflict, redelivered
    after = await position(conn, "p2")
    assert after == before
    assert after["close_event_id"] == "close-b"
    assert after["pnl_krw"] == D(EXIT_B["pnl_krw"])


async def test_an_open_with_another_event_id_after_the_close_changes_nothing(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_open("p3", eid="open-3"))])
    await sink.write([item(pos_close("p3"))])
    before = await position(conn, "p3")
    other = {**pos_open("p3", "ETH", eid="open-4"), "size": "5", "mode": "live"}
    late = item(other)
    outcome = await sink.write([late])
    assert outcome.rejected == {id(late): "conflict: position p3 already opened by event open-3"}
    after = await position(conn, "p3")
    assert after == before
    assert after["size"] == D(ENTRY["size"]) and after["symbol"] == "BTC"
    assert await dead_letter_reasons(conn) == {
        "open-4": ["conflict: position p3 already opened by event open-3"]
    }
    # Before the close, too: a second open never rewrites the entry columns.
    await sink.write([item(pos_open("p4", eid="open-a"))])
    await sink.write([item({**pos_open("p4", eid="open-b"), "size": "7"})])
    row = await position(conn, "p4")
    assert (row["open_event_id"], row["size"], row["status"]) == ("open-a", D("0.01"), "OPEN")


async def test_in_one_batch_the_first_open_and_the_first_close_stand(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    first_open = item(pos_open("p5", eid="o-1"))
    second_open = item({**pos_open("p5", eid="o-2"), "size": "3"})
    first_close = item(pos_close("p5", eid="c-1"))
    second_close = item(close_b("p5", "c-2"))
    redelivered = item(pos_close("p5", eid="c-1"))
    outcome = await sink.write([first_close, first_open, second_close, second_open, redelivered])
    assert outcome.rejected == {
        id(second_open): "conflict: position p5 already opened by event o-1",
        id(second_close): "conflict: position p5 already closed by event c-1",
    }
    assert outcome.duplicates == 1  # the close redelivered within the batch
    row = await position(conn, "p5")
    assert_closed_with_exit(row)
    assert (row["open_event_id"], row["close_event_id"], row["size"]) == ("o-1", "c-1", D("0.01"))


async def test_conflicts_are_found_on_the_row_by_row_path_too(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_open("r1", eid="o-r1")), item(pos_close("r1", eid="c-r1"))])
    bad = tampered(pos_open("r2"), symbol="ABCDEFGHIJK")  # sends the batch row by row
    late_open = item({**pos_open("r1", eid="o-r1-late"), "size": "4"})
    late_close = item(close_b("r1", "c-r1-late"))
    outcome = await sink.write([bad, late_open, late_close, item(pos_open("r3"))])
    assert set(outcome.rejected) == {id(bad), id(late_open), id(late_close)}
    assert outcome.rejected[id(late_open)] == "conflict: position r1 already opened by event o-r1"
    assert outcome.rejected[id(late_close)] == "conflict: position r1 already closed by event c-r1"
    assert "character varying(10)" in outcome.rejected[id(bad)]
    row = await position(conn, "r1")
    assert_closed_with_exit(row)
    assert (row["open_event_id"], row["size"]) == ("o-r1", D(ENTRY["size"]))
    assert (await position(conn, "r3"))["status"] == "OPEN"
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 3


async def test_a_parked_close_stands_against_later_closes(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_close("p6", eid="c-parked"))])
    plain = item(close_b("p6", "c-plain"))
    whole = item(close_b("p6", "c-whole", with_entry=True))  # would insert the whole row
    outcome = await sink.write([plain])
    outcome2 = await sink.write([whole])
    reason = "conflict: position p6 already closed by event c-parked (its open has not arrived)"
    assert outcome.rejected == {id(plain): reason}
    assert outcome2.rejected == {id(whole): reason}
    assert await conn.fetchval("SELECT count(*) FROM positions") == 0
    assert await conn.fetchval("SELECT event_id FROM position_closes_pending") == "c-parked"
    await sink.write([item(pos_open("p6"))])
    row = await position(conn, "p6")
    assert_closed_with_exit(row)
    assert row["close_event_id"] == "c-parked"


async def test_close_before_open_ends_as_the_same_row_as_open_then_close(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    # The close repeats entry columns that differ from the open's (and names another mode):
    # the open's entry columns and mode stand, whichever lands first.
    def events_of(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        opened = {**pos_open(key, eid=f"o-{key}"), "mode": "paper"}
        closed = {
            **pos_close(key, "ETH", with_entry=True, eid=f"c-{key}"),
            "size": "9",
            "mode": "live",
        }
        return opened, closed

    o, c = events_of("ab")
    await sink.write([item(o)])
    await sink.write([item(c)])
    o, c = events_of("ba")
    await sink.write([item(c)])
    await sink.write([item(o)])
    columns = [*(n for n, _ in tables.POSITION_ENTRY_COLUMNS), "producer", "mode", "status"]
    columns += [n for n, _ in tables.POSITION_EXIT_COLUMNS]
    ab, ba = (await position(conn, "ab")), (await position(conn, "ba"))
    assert {c: ab[c] for c in columns} == {c: ba[c] for c in columns}
    assert (ba["symbol"], ba["size"], ba["mode"]) == ("BTC", D("0.01"), "paper")
    assert (ba["open_event_id"], ba["close_event_id"]) == ("o-ba", "c-ba")


# --- conflicting duplicates on the append-only tables ------------------------------------------


async def test_same_event_id_and_time_with_other_content_is_a_dead_lettered_conflict(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    stored = [
        item(spread("s1")),
        item(fx("f1")),
        item(order("o1", "pos_x")),
        item(trade("t1", None)),
    ]
    await sink.write(stored)
    before = {
        t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY id")]
        for t in ("spreads", "fx_rates", "orders", "trades")
    }
    changed = [
        item(spread("s1", upbit_price="140123456.13")),
        item(fx("f1", rate="1385.12345679")),
        item({**order("o1", "pos_x"), "venue": "binance"}),
        item({**trade("t1", None), "pnl_krw": "1"}),  # NULL stored: differs
    ]
    outcome = await sink.write([*changed, item(spread("s-new", ts="2025-11-15T03:40:16Z"))])
    assert outcome.inserted == {"spreads": 1, "fx_rates": 0, "orders": 0, "trades": 0}
    assert outcome.duplicates == 0
    assert set(outcome.rejected) == {id(it) for it in changed}
    assert outcome.rejected[id(changed[0])] == (
        "conflict: spreads already holds event s1 at 2025-11-15T03:40:15.123Z with other"
        " content (differs in: upbit_price)"
    )
    assert outcome.rejected[id(changed[2])].endswith("(differs in: venue)")
    assert outcome.rejected[id(changed[3])].endswith("(differs in: pnl_krw)")
    for t, rows_before in before.items():  # the stored rows stay as they were
        now_rows = await conn.fetch(f"SELECT * FROM {t} WHERE event_id <> 's-new' ORDER BY id")
        assert [tuple(r) for r in now_rows] == rows_before
    dl = await conn.fetch("SELECT event_id, event_type, field, error FROM dead_letters ORDER BY id")
    assert [(r["event_id"], r["event_type"]) for r in dl] == [
        ("s1", "spread"),
        ("f1", "fx_rate"),
        ("o1", "order"),
        ("t1", "trade"),
    ]
    assert all(r["error"].startswith("conflict: ") for r in dl)
    assert [r["field"] for r in dl] == ["upbit_price", "rate", "venue", "pnl_krw"]


async def test_a_redelivery_equal_as_stored_is_a_duplicate_not_a_conflict(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(spread("s1")), item(fx("f1"))])
    # Other spellings of the same stored values: digits beyond the column's scale that round to
    # it, trailing zeros, an exponent, and the event time at another offset.
    same = [
        item(spread("s1", "BTC", "2025-11-15T12:40:15.123+09:00", upbit_price="140123456.1249")),
        item(wire({k: v for k, v in fx("f1").items() if k != "rate"}, rate="13851234567.8E-7")),
        item(spread("s1", spread_pct="3.18360")),
    ]
    outcome = await sink.write(same)
    assert outcome.rejected == {}
    assert outcome.duplicates == 3
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_conflicting_duplicate_in_one_batch_is_a_conflict(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    first = item(spread("d1"))
    same = item(spread("d1", "BTC", "2025-11-15T12:40:15.123+09:00"))
    other = item(spread("d1", symbol="ETH"))
    outcome = await sink.write([first, same, other, item(spread("d2"))])
    assert outcome.inserted == {"spreads": 2}
    assert outcome.duplicates == 1
    assert set(outcome.rejected) == {id(other)}
    assert "differs in: symbol" in outcome.rejected[id(other)]
    assert await conn.fetchval("SELECT symbol FROM spreads WHERE event_id = 'd1'") == "BTC"
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_a_redelivered_conflict_is_one_dead_letter(
    sink: PostgresSink, conn: asyncpg.Connection
) -> None:
    await sink.write([item(fx("f1"))])
    for _ in range(3):
        outcome = await sink.write([keyed(fx("f1", rate="2"))])
        assert len(outcome.rejected) == 1
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1
    assert await conn.fetchval("SELECT rate FROM fx_rates") == D("1385.12345678")


# --- closes whose open never comes -------------------------------------------------------------


async def age_parked(conn: asyncpg.Connection, key: str, seconds: float) -> None:
    """Make the parked close of ``key`` look ``seconds`` old."""
    await conn.execute(
        "UPDATE position_closes_pending SET received_at = now() - make_interval(secs => $2)"
        " WHERE position_key = $1",
        key,
        seconds,
    )


async def test_a_parked_close_past_its_age_becomes_a_dead_letter(
    sink: PostgresSink, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await sink.write([item(pos_close("old", eid="close-old")), item(pos_close("young"))])
    await age_parked(conn, "old", 2 * 86_400)
    await age_parked(conn, "young", 3_600)
    async with pool.acquire() as c:
        swept = await sweep_parked_closes(c, max_age_s=86_400)
    assert (swept.waiting, swept.dead_lettered) == (1, 1)
    assert swept.oldest_received_at is not None
    assert await conn.fetchval("SELECT position_key FROM position_closes_pending") == "young"
    dl = await conn.fetchrow("SELECT * FROM dead_letters")
    assert dl is not None
    assert (dl["event_id"], dl["event_type"], dl["producer"]) == (
        "close-old",
        "position_close",
        "paper",
    )
    assert dl["error"].startswith(
        "close without open: position old was closed by event close-old, and its open did not"
        " arrive within 86400 s"
    )
    # The payload is the close as it was parked, a valid event that can be sent again.
    again = decoding.decode_event(dl["payload"].encode(), max_bytes=MAX_BYTES)
    assert again.type == "position_close" and again.event_id == "close-old"
    for name, value in EXIT.items():
        if name != "timestamp_close":
            assert D(str(again.values[name])) == D(value), name
    assert again.time.isoformat() == "2025-11-15T04:00:00+00:00"

    # Nothing else is old enough; the same close parked and expired again is one dead letter.
    async with pool.acquire() as c:
        assert (await sweep_parked_closes(c, max_age_s=86_400)).dead_lettered == 0
    await sink.write([item(pos_close("old", eid="close-old"))])
    await age_parked(conn, "old", 2 * 86_400)
    async with pool.acquire() as c:
        swept = await sweep_parked_closes(c, max_age_s=86_400)
    assert swept.dead_lettered == 1
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 1
    # Should the open come after all, the position is simply open; the young close still waits.
    await sink.write([item(pos_open("old")), item(pos_open("young"))])
    assert (await position(conn, "old"))["status"] == "OPEN"
    assert_closed_with_exit(await position(conn, "young"))
    async with pool.acquire() as c:
        swept = await sweep_parked_closes(c, max_age_s=86_400)
    assert (swept.waiting, swept.dead_lettered, swept.oldest_received_at) == (0, 0, None)
