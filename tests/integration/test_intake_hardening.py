"""Hardened intake through the real paths: derived ids per stream, nesting, log forging,
retention, stream reads bounded in bytes."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import Service, errors, logs
from ingestd.commands.csv_import import run_import
from ingestd.commands.csv_verify import run_verify
from ingestd.commands.health import check_health
from ingestd.daemon.batching import Item
from ingestd.daemon.pipeline import Pipeline
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.daemon.sources.stream import MAX_KEY_CHARS, StreamSource, derived_id_prefix
from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from tests.samples import SPREAD_PRICES, nested_lists
from tests.unused_sink import UnusedSink

pytestmark = [pytest.mark.pg, pytest.mark.redis]

STREAM = "ingestd:events"
RECENT = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(microsecond=0)


def spread(i: int, *, symbol: str = "BTC", when: dt.datetime | None = None) -> dict[str, Any]:
    moment = (when or RECENT) + dt.timedelta(seconds=i)
    return {
        "type": "spread",
        "producer": "collector",
        **SPREAD_PRICES,
        "symbol": symbol,
        "timestamp": utc_iso(moment),
    }


async def until(condition: Any, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until it is true (the test fails at the assertion after it if not)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end and not condition():
        await asyncio.sleep(0.05)


# --- 4. derived ids are unique per stream ------------------------------------------------------


async def test_entries_without_event_id_on_two_streams_both_land(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    # The same entry id on two streams (ids are per stream), events without event_id and with
    # different content: each is its own event.
    for key, symbol in (("ingestd:events:a", "BTC"), ("ingestd:events:b", "ETH")):
        rclient.xadd(key, {"event": json.dumps(spread(0, symbol=symbol))}, id="1700000000000-1")
        async with Service(settings.replace(**{"stream.key": key})) as service:
            await until(lambda s=service: s.metrics.acks >= 1)
    rows = await db.fetch("SELECT event_id, symbol FROM spreads ORDER BY symbol")
    assert [(r["event_id"], r["symbol"]) for r in rows] == [
        ("stream:ingestd:events:a:1700000000000-1", "BTC"),
        ("stream:ingestd:events:b:1700000000000-1", "ETH"),
    ]
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_stream_key_too_long_to_spell_out_is_named_by_its_digest(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    long_key = "ingestd:events:" + "k" * 60
    assert len(long_key) > MAX_KEY_CHARS
    rclient.xadd(long_key, {"event": json.dumps(spread(0))}, id="1700000000000-1")
    async with Service(settings.replace(**{"stream.key": long_key})) as service:
        await until(lambda: service.metrics.acks >= 1)
    digest = hashlib.sha256(long_key.encode()).hexdigest()[:32]
    assert await db.fetchval("SELECT event_id FROM spreads") == (
        f"stream:sha256={digest}:1700000000000-1"
    )
    # The longest key that is spelled out, with the longest entry id, fits 100 characters.
    assert len(derived_id_prefix("k" * MAX_KEY_CHARS) + f"{2**64 - 1}-{2**64 - 1}") == 100


# --- 5. deep nesting ---------------------------------------------------------------------------


DEEP_JSON = json.dumps(spread(9))[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"


async def test_one_deep_event_in_submit_many_is_a_dead_letter_and_the_rest_land(
    settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    batch: list[Any] = [
        {**spread(1), "event_id": "deep-1"},
        {**spread(2), "event_id": "deep-2", "x": nested_lists(5000)},
        {**spread(3), "event_id": "deep-3"},
        DEEP_JSON,
    ]
    async with Service(settings, stream_intake=False) as service:
        outcomes = await service.submit_many(batch)
    assert outcomes == [
        Outcome.COMMITTED,
        Outcome.DEAD_LETTER,
        Outcome.COMMITTED,
        Outcome.DEAD_LETTER,
    ]
    assert await db.fetchval("SELECT count(*) FROM spreads") == 2
    errors_ = [r["error"] for r in await db.fetch("SELECT error FROM dead_letters")]
    assert len(errors_) == 2
    assert all("nested deeper than 32 levels" in e for e in errors_), errors_
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_deep_stream_entry_is_a_dead_letter_without_a_traceback(
    settings: Settings,
    rclient: redis.Redis,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    rclient.xadd(STREAM, {"event": DEEP_JSON})
    rclient.xadd(STREAM, {"event": json.dumps({**spread(1), "event_id": "after-deep"})})
    async with Service(settings) as service:
        await until(lambda: service.metrics.acks >= 2)
    assert await db.fetchval("SELECT count(*) FROM spreads") == 1
    error = await db.fetchval("SELECT error FROM dead_letters")
    assert "nested deeper than 32 levels" in error
    assert "internal error" not in error
    assert not [r for r in caplog.records if r.exc_info]


# --- 6. log forging ----------------------------------------------------------------------------

FORGED = "2026-12-03 10:00:00,000 CRITICAL ingestd.daemon.app action=crash database lost, halting"
PLAIN_HEAD = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ ingestd")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
HOSTILE_TEXT = [f"\n{FORGED}", f"\r\n{FORGED}", f"\u2028{FORGED}", f"\x85{FORGED}", "\x1b[2J"]


class _Capture(logging.Handler):
    """Formats every record of ingestd with both formatters, as ``ingestd run`` would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.plain = io.StringIO()
        self.json = io.StringIO()
        self.records = 0
        self._plain = logs.PlainFormatter(
            "%(asctime)s %(levelname)s %(name)s%(action_part)s %(message)s"
        )
        self._json = logs.JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        self.plain.write(self._plain.format(record) + "\n")
        self.json.write(self._json.format(record) + "\n")


@pytest.fixture
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    logger = logging.getLogger("ingestd")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _hostile_events() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, text in enumerate(HOSTILE_TEXT):
        out.append({**spread(i), "event_id": f"f{i}", f"x{text}": 1})  # an unknown field's name
        out.append({**spread(i), "event_id": f"g{i}", "symbol": f"{text}BTCBTCBTCBTC"})  # a value
        out.append({**spread(i), "event_id": f"h{i}", "type": f"s{text}"})  # the type
    return out


async def test_input_cannot_forge_log_lines_through_the_stream_or_in_process(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection, captured: _Capture
) -> None:
    hostile = _hostile_events()
    for ev in hostile:
        rclient.xadd(STREAM, {"event": json.dumps(ev)})
    async with Service(settings) as service:
        for ev in hostile:
            with pytest.raises(errors.InvalidEvent):
                await service.submit(ev)  # a mapping
            with pytest.raises(errors.InvalidEvent):
                await service.submit(json.dumps(ev))  # wire text
        await until(lambda: service.metrics.acks >= len(hostile))
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 3 * len(hostile)
    plain = captured.plain.getvalue().split("\n")[:-1]
    heads = [line for line in plain if not line.startswith(logs.CONTINUATION)]
    # One line per record, each a record's head; nothing the input wrote starts a line.
    assert len(heads) == captured.records
    assert all(PLAIN_HEAD.match(line) for line in heads)
    assert not [line for line in plain if FORGED in line.split(" action=", 1)[0]]
    assert not [line for line in plain if CONTROL.search(line)]
    json_lines = captured.json.getvalue().split("\n")[:-1]
    assert len(json_lines) == captured.records
    assert not [line for line in json_lines if CONTROL.search(line)]
    docs = [json.loads(line) for line in json_lines]
    # Kept exact inside the JSON string (a field name is cut at 60 characters).
    assert any(f"x\n{FORGED[:40]}" in doc["msg"] for doc in docs)


# --- 12. retention -----------------------------------------------------------------------------

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)


async def test_events_older_than_their_retention_are_refused_by_stream_and_submit(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection, captured: _Capture
) -> None:
    rclient.xadd(STREAM, {"event": json.dumps({**spread(0, when=OLD), "event_id": "old-s"})})
    async with Service(settings) as service:
        with pytest.raises(errors.InvalidEvent, match="older than the 90-day retention of spreads"):
            await service.submit({**spread(1, when=OLD), "event_id": "old-m"})
        # A table without retention (trades) takes history of any age.
        trade = {
            "type": "trade",
            "event_id": "old-trade",
            "symbol": "BTC",
            "direction": "upbit_short_binance_long",
            "size": "0.01",
            "side": "OPEN",
            "timestamp": utc_iso(OLD - dt.timedelta(days=900)),
        }
        assert await service.submit(trade) == Outcome.COMMITTED
        await until(lambda: service.metrics.acks >= 1)
    assert await db.fetchval("SELECT count(*) FROM spreads") == 0
    rows = await db.fetch("SELECT source, error FROM dead_letters ORDER BY source")
    assert [r["source"] for r in rows] == ["stream", "submit"]
    for r in rows:
        assert "older than the 90-day retention of spreads" in r["error"]
    logged = captured.plain.getvalue()
    assert logged.count("older than the 90-day retention of spreads") == 2


async def test_csv_import_reports_rows_older_than_the_retention(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    header = (
        "symbol,upbit_price,binance_price,binance_price_krw,spread_pct,net_spread_pct,"
        "is_opportunity,timestamp"
    )
    row = "BTC,140123456.12,98012.12345678,135800000.55,3.1836,2.9836,true,{}"
    lines = [header, row.format(utc_iso(OLD)), row.format(utc_iso(RECENT))]
    (tmp_path / "spreads.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = await run_import(settings, tmp_path, progress_mode="off", out=out, err=err)
    assert code == 1  # rows were rejected
    assert "spreads.csv:2: timestamp: " in err.getvalue()
    assert "older than the 90-day retention of spreads" in err.getvalue()
    assert await db.fetchval("SELECT count(*) FROM spreads") == 1
    dead = await db.fetchval("SELECT error FROM dead_letters")
    assert dead.startswith("spreads.csv:2: ")
    assert "older than the 90-day retention of spreads" in dead
    # verify-csv lists the refused row apart, not as a mismatch.
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, out=out, err=out) == 0, out.getvalue()
    assert "MISMATCH" not in out.getvalue()


# --- 8a. stream reads bounded in bytes ---------------------------------------------------------


async def test_stream_reads_are_bounded_in_bytes_and_oversize_entries_are_not_held(
    settings: Settings, rclient: redis.Redis, redis_url: str
) -> None:
    entry_bytes = 20_000
    for i in range(30):
        padded = {**spread(i), "event_id": "p" * 90 + f"{i:02d}"}
        text = json.dumps(padded)
        rclient.xadd(STREAM, {"event": text + " " * (entry_bytes - len(text))})
    for _ in range(5):  # larger than max_event_bytes: dead letters
        rclient.xadd(STREAM, {"event": b"x" * 200_000})
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    bounded = settings.replace(**{"stream.read_count": 1000, "stream.read_max_bytes": 100_000})
    source = StreamSource(
        client,
        Pipeline(UnusedSink(), None, bounded.pipeline),
        bounded.stream,
        consumer="bytes-test",
        max_event_bytes=50_000,
    )
    reads: list[tuple[int, int]] = []  # (entries, bytes) per read
    items: list[Item] = []
    try:
        await source.ensure_group()
        while True:
            entries = await source._read(">", None)
            if not entries:
                break
            reads.append((len(entries), sum(len(e[1][1]) for e in entries)))
            items += source._to_items(entries)
    finally:
        await client.aclose()
    assert len(items) == 35
    # The first read assumes entries as large as max_event_bytes: 2 fit the budget.
    assert reads[0][0] == 2
    # Until the large entries come, every read stays within the budget, and holds as many
    # entries as fit (not 1 per read: the count follows the sizes seen).
    first_large = next(n for n, (_, size) in enumerate(reads) if size > 100_000)
    assert sum(count for count, _ in reads[:first_large]) >= 25
    assert all(size <= 100_000 for _, size in reads[:first_large])
    assert max(count for count, _ in reads[:first_large]) == 5
    # Once an entry larger than the budget was seen, one entry per read.
    assert all(count == 1 for count, _ in reads[first_large + 1 :]), reads
    dead = [it for it in items if it.event is None]
    assert len(dead) == 5
    for it in dead:
        assert it.raw is None and it.dead_letter is not None
        assert it.size < 20_000  # the kept prefix, not the 200 kB payload
        assert it.dead_letter.payload_bytes == 200_000


# --- 8b. heartbeats from the future ------------------------------------------------------------


async def test_a_heartbeat_dated_in_the_future_is_unhealthy_with_the_reason(
    settings: Settings, rclient: redis.Redis
) -> None:
    now = dt.datetime.now(dt.UTC)
    rclient.set("health:ingestd", utc_iso(now))
    rclient.set("health:collector", utc_iso(now + dt.timedelta(hours=1)))
    ok, reason = await check_health(settings, ["ingestd", "collector"], 10)
    assert not ok
    assert re.search(r"collector: heartbeat dated 3\d\d\d\.\ds in the future", reason), reason
    assert "ingestd" not in reason.split("unhealthy: ", 1)[1]
