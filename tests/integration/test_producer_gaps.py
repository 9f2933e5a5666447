"""Producer gaps (ingestd.daemon.gaps): seq/session on events, gaps opened and closed in the
database.

Events are committed through a real Service (in-process submit returns once committed); the
sweeps are called directly, with a grace period of 0 or of an hour, so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from ingestd.commands.stats import collect_database, render
from ingestd.daemon.app import Service
from ingestd.daemon.gaps import GapSweeper, Range, merge, runs
from ingestd.daemon.metrics import Metrics
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.errors import InvalidEvent
from ingestd.producer.publisher import Publisher
from ingestd.producer.storage.base import EventBuilder
from ingestd.producer.storage.models import FxRate
from ingestd.producer.storage.postgres import PostgresStorage
from ingestd.settings import Settings
from ingestd.wire import decoding, events, fastpath
from ingestd.wire.events import utc_iso
from tests.sink_items import item, spread, tampered

pytestmark = pytest.mark.pg

T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def fx(
    seq: int | None, session: str | None = "run-1", producer: str = "collector"
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "fx_rate",
        "event_id": f"fx-{producer}-{session}-{seq}",
        "producer": producer,
        "pair": "USDKRW",
        "rate": "1385.5",
        "source": "test",
        "timestamp": utc_iso(T0 + dt.timedelta(seconds=seq or 0)),
    }
    if seq is not None:
        event["seq"] = seq
    if session is not None:
        event["session"] = session
    return event


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    quiet = settings.replace(
        **{
            "stream.enabled": False,
            "producer_gaps.enabled": False,  # the tests sweep themselves
            "half_hedge.enabled": False,
            "maintenance.enabled": False,
        }
    )
    async with Service(quiet) as svc:
        yield svc


def sweeper(pool: asyncpg.Pool, grace_s: float = 0.0, metrics: Metrics | None = None) -> GapSweeper:
    return GapSweeper(pool, metrics or Metrics(), grace_s=grace_s, interval_s=1.0)


async def submit(service: Service, seqs: list[int], session: str = "run-1") -> None:
    for seq in seqs:
        await service.submit(fx(seq, session))


async def gaps(db: asyncpg.Connection) -> list[tuple[str, str, int, int, bool]]:
    rows = await db.fetch(
        "SELECT producer, session, first_missing, last_missing, closed_at IS NULL AS open "
        "FROM producer_gaps ORDER BY id"
    )
    return [tuple(r.values()) for r in rows]


def test_runs_and_merge() -> None:
    assert runs([5, 1, 2, 3, 3]) == [(1, 3), (5, 5)]
    assert runs([]) == []
    t1, t2 = T0, T0 + dt.timedelta(seconds=1)
    merged = merge([Range(0, 4, t2), Range(3, 6, t1), Range(7, 7, t2), Range(9, 9, t1)])
    assert merged == [Range(0, 7, t1), Range(9, 9, t1)]


@pytest.mark.parametrize("path", ["general", "fast"])
def test_seq_and_session_are_parsed_on_both_paths(path: str) -> None:
    payload = orjson.dumps(fx(41, "run-7"))
    if path == "fast":
        ev = fastpath.decode(payload, None)
        assert ev is not None
    else:
        ev = events.parse_event(events.decode_json(payload))
    assert (ev.seq, ev.session) == (41, "run-7")
    wire = events.to_wire(ev)
    assert (wire["seq"], wire["session"]) == (41, "run-7")
    plain = events.parse_event(events.decode_json(orjson.dumps(fx(None, None))))
    assert (plain.seq, plain.session) == (None, None)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seq": -1}, "seq"),
        ({"seq": "5"}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": 2**63}, "seq"),
        ({"session": ""}, "session"),
        ({"session": "x" * 51}, "session"),
        ({"session": 7}, "session"),
    ],
)
def test_bad_seq_or_session_is_refused(changes: dict[str, Any], field: str) -> None:
    payload = orjson.dumps({**fx(1), **changes})
    assert fastpath.decode(payload, None) is None
    with pytest.raises(InvalidEvent) as err:
        decoding.decode_event(payload, max_bytes=10_000)
    assert err.value.field == field


async def test_a_gap_opens_and_closes_when_the_late_events_land(
    service: Service, db_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    metrics = Metrics()
    await submit(service, [0, 1, 2, 3, 4, 8, 9])
    # Within the grace period the seqs above the hole may still be overtaking it: no gap yet.
    patient = await sweeper(db_pool, grace_s=3600.0).run_once()
    assert patient is not None and patient.opened == [] and await gaps(db) == []
    # The runs were merged meanwhile: two rows, with the hole between them.
    assert await db.fetchval("SELECT count(*) FROM producer_seq_ranges") == 2

    first = await sweeper(db_pool, metrics=metrics).run_once()
    assert first is not None and first.opened == [("collector", "run-1", 5, 7)]
    assert await gaps(db) == [("collector", "run-1", 5, 7, True)]
    assert metrics.producer_gaps_open == 1

    await submit(service, [6])  # part of it: the gap stays open, no new one for 5 or 7
    partial = await sweeper(db_pool).run_once()
    assert partial is not None and partial.opened == [] and partial.closed == 0
    assert await gaps(db) == [("collector", "run-1", 5, 7, True)]

    await submit(service, [5, 7])
    closing = await sweeper(db_pool, metrics=metrics).run_once()
    assert closing is not None and closing.closed == 1 and closing.open == 0
    assert await gaps(db) == [("collector", "run-1", 5, 7, False)]
    assert metrics.producer_gaps_open == 0
    assert await db.fetchval("SELECT count(*) FROM producer_seq_ranges") == 1


async def test_a_restart_is_not_a_gap(
    service: Service, db_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await submit(service, [0, 1, 3], session="run-1")
    heartbeat = {
        "type": "heartbeat",
        "producer": "collector",
        "component": "collector",
        "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
        "seq": 2,  # heartbeats are numbered like every other event
        "session": "run-1",
    }
    await service.submit(heartbeat)
    await submit(service, [0, 1], session="run-2")  # the producer restarted: a new session
    await submit(service, [100, 101], session="run-3")  # a session need not start at 0
    # A redelivered event (same event, same seq) changes nothing.
    await submit(service, [3], session="run-1")
    result = await sweeper(db_pool).run_once()
    assert result is not None and result.opened == [] and result.open == 0
    assert await gaps(db) == []


async def test_two_replicas_record_one_gap(
    service: Service, db_pool: asyncpg.Pool, db_dsn: str, db: asyncpg.Connection
) -> None:
    await submit(service, [0, 3])
    other = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    assert other is not None
    try:
        for _ in range(3):
            await asyncio.gather(sweeper(db_pool).run_once(), sweeper(other).run_once())
    finally:
        await other.close()
    assert await gaps(db) == [("collector", "run-1", 1, 2, True)]


async def test_stats_show_open_gaps(
    service: Service, db_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await submit(service, [0, 2], session="s\x1b[2J")  # a session with a terminal escape
    assert await sweeper(db_pool).run_once() is not None
    report = await collect_database(db)
    assert report["producer_gaps"]["open"] == 1
    (row,) = report["producer_gaps"]["rows"]
    assert (row["first_missing"], row["last_missing"], row["missing"]) == (1, 1, 1)
    text = render({**report, "redis": None})
    assert "open producer gaps (seq numbers not received): 1" in text
    assert "\x1b" not in text


def test_publisher_numbers_its_events_and_reuses_numbers_of_a_failed_publish(
    redis_url: str, rclient: redis.Redis
) -> None:
    publisher = Publisher.from_url(redis_url, retries=0, stream="gaps:events")
    try:
        rclient.set("gaps:events", "not a stream")  # XADD fails: WRONGTYPE
        with pytest.raises(redis.exceptions.ResponseError):
            publisher.publish_many([fx(None, None), fx(None, None)])
        rclient.delete("gaps:events")
        publisher.publish_many([fx(None, None), fx(None, None)])
        publisher.publish(fx(None, None))
        publisher.publish(fx(99, "own"))  # its own numbering is kept, and uses none of ours
        publisher.publish(fx(None, None))
        entries: Any = rclient.xrange("gaps:events")
        sent = [orjson.loads(fields[b"event"]) for _, fields in entries]
    finally:
        publisher.close()
    assert [e["seq"] for e in sent] == [0, 1, 2, 99, 3]
    assert [e["session"] for e in sent] == [publisher.session] * 3 + ["own", publisher.session]
    assert 0 < len(publisher.session) <= 50


def test_one_publisher_numbers_each_producer_apart(redis_url: str, rclient: redis.Redis) -> None:
    # Gaps are looked for per (producer, session): the simulator's one publisher sends collector
    # and paper events, and one counter for both made every other number of each a "gap".
    publisher = Publisher.from_url(redis_url, retries=0, stream="gaps:events")
    try:
        mixed = [
            {**fx(None, None), "producer": producer}
            for producer in ("collector", "paper", "collector", "collector", "paper")
        ]
        publisher.publish_many(mixed[:3])
        for ev in mixed[3:]:
            publisher.publish(ev)
        entries: Any = rclient.xrange("gaps:events")
        sent = [orjson.loads(fields[b"event"]) for _, fields in entries]
    finally:
        publisher.close()
    assert [(e["producer"], e["seq"]) for e in sent] == [
        ("collector", 0),
        ("paper", 0),
        ("collector", 1),
        ("collector", 2),
        ("paper", 1),
    ]


def test_storage_api_numbers_what_it_publishes(redis_url: str, rclient: redis.Redis) -> None:
    storage = PostgresStorage(
        redis.Redis.from_url(redis_url), stream="gaps:storage", owns_client=True
    )
    rate = FxRate(pair="USDKRW", rate=Decimal("1385.5"), source="t", timestamp=T0)
    try:
        ids = [storage.log_fx_rate(rate) for _ in range(3)]
        storage.flush(timeout=30)
    finally:
        storage.close()
    entries: Any = rclient.xrange("gaps:storage")
    sent = [orjson.loads(fields[b"event"]) for _, fields in entries]
    assert [e["event_id"] for e in sent] == ids
    assert [e["seq"] for e in sent] == [0, 1, 2]
    assert len({e["session"] for e in sent}) == 1
    assert all(events.parse_event(e).seq is not None for e in sent)
    # Another storage in the same process is another session (its seqs start at 0 again).
    builder = EventBuilder("collector")
    assert builder.numbered(builder.fx_rate(rate))["session"] != sent[0]["session"]


async def test_a_dead_letters_seq_stays_missing(
    db_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The database refuses one row of a batch: its number is a gap, the others are not."""
    good = [item(spread(f"g{i}", seq=i, session="run-1")) for i in (0, 1, 3)]
    refused = tampered(spread("bad", seq=2, session="run-1"), symbol="ABCDEFGHIJK")  # VARCHAR(10)
    outcome = await PostgresSink(db_pool).write([*good, refused])
    assert set(outcome.rejected) == {id(refused)}
    result = await sweeper(db_pool).run_once()
    assert result is not None and result.opened == [("collector", "run-1", 2, 2)]
