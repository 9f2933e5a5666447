"""Write-once positions and visible conflicts, end to end through the real sink.

A property test drives random interleavings, redeliveries and batch splits of opens, closes,
orders and trades of a few positions through ``PostgresSink`` and checks the database against a
small model: the first open and the first close of a position that commit stand, every other
one is a conflict dead-lettered exactly once, and an order or trade with the event id and time
of a stored one but other content is a conflict too.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import decimal
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.commands import stats
from ingestd.daemon.app import Service
from ingestd.daemon.batching import Item
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import Settings
from tests.conftest import ingestd_pool
from tests.sink_items import (
    ENTRY,
    EXIT,
    EXIT_B,
    Source,
    item,
    order,
    pos_close,
    pos_open,
    trade,
)

pytestmark = pytest.mark.pg

D = decimal.Decimal

KEYS = ("p0", "p1", "p2")
SRC = Source()


@dataclasses.dataclass(frozen=True)
class Ev:
    """One event of the property test: its wire object and what the model needs of it."""

    kind: str  # open, close, order, trade
    key: str
    obj: dict[str, Any]
    bad: bool = False  # the database refuses it (a value the validator let through)

    @property
    def event_id(self) -> str:
        """The producer's id."""
        return str(self.obj["event_id"])

    def item(self) -> Item:
        """A fresh Item, its dead letter keyed by its content (as the in-process source keys)."""
        token = hashlib.sha256(orjson.dumps(self.obj)).hexdigest()
        it = item(self.obj, token=token, source=SRC)
        if self.bad:
            assert it.event is not None
            it.event.values["symbol"] = "ABCDEFGHIJK"  # VARCHAR(10)
        return it


def _universe() -> list[Ev]:
    # One producer: a position is named by (producer, position_key), so another producer's
    # open or close of the same key is another position (tests/integration/test_modes_and_stale).
    out: list[Ev] = []
    for k in KEYS:
        out += [
            Ev("open", k, pos_open(k, eid=f"open-{k}-a")),
            Ev(
                "open",
                k,
                {**pos_open(k, "ETH", eid=f"open-{k}-b"), "size": "2"},
            ),
            Ev("open", k, pos_open(k, eid=f"open-{k}-bad"), bad=True),
            Ev("close", k, pos_close(k, eid=f"close-{k}-a")),
            Ev(
                "close",
                k,
                {
                    **pos_close(k, "XRP", with_entry=True, eid=f"close-{k}-b"),
                    **EXIT_B,
                    "size": "3",
                },
            ),
            Ev("close", k, {**pos_close(k, eid=f"close-{k}-c"), **EXIT_B}),
            Ev("order", k, order(f"ord-{k}", k)),
            # The same event id and time with other content: whichever lands first stands.
            Ev("order", k, {**order(f"ord-{k}", k), "venue": "binance"}),
            Ev("trade", k, trade(f"trd-{k}", k)),
        ]
    return out


UNIVERSE = _universe()


@dataclasses.dataclass
class Model:
    """What the database must hold after ``events`` were committed in this order."""

    events: list[Ev]

    def first(self, kind: str, key: str) -> Ev | None:
        """The first event of a kind for a position that the database accepts."""
        return next((e for e in self.events if e.kind == kind and e.key == key and not e.bad), None)

    def standing(self) -> set[int]:
        """Indexes into UNIVERSE of the events that stand."""
        out = set()
        for k in KEYS:
            for kind in ("open", "close"):
                e = self.first(kind, k)
                if e is not None:
                    out.add(UNIVERSE.index(e))
        for kind in ("order", "trade"):
            for k in KEYS:
                e = self.first(kind, k)
                if e is not None:
                    out.add(UNIVERSE.index(e))
        return out

    def positions(self) -> dict[str, dict[str, Any]]:
        """The expected positions rows by key."""
        rows: dict[str, dict[str, Any]] = {}
        for k in KEYS:
            o, c = self.first("open", k), self.first("close", k)
            source = o if o is not None else (c if c is not None and "size" in c.obj else None)
            if source is None:
                continue
            rows[k] = {
                "symbol": source.obj["symbol"],
                "size": D(source.obj["size"]),
                "producer": source.obj["producer"],
                "open_event_id": None if o is None else o.event_id,
                "close_event_id": None if c is None else c.event_id,
                "status": "OPEN" if c is None else "CLOSED",
                "pnl_krw": None if c is None else D(c.obj["pnl_krw"]),
            }
        return rows

    def parked(self) -> dict[str, str]:
        """Closes waiting for an open that never came: key -> event id."""
        out = {}
        for k in KEYS:
            c = self.first("close", k)
            if c is not None and self.first("open", k) is None and "size" not in c.obj:
                out[k] = c.event_id
        return out

    def dead_letters(self) -> dict[str, tuple[str, ...]]:
        """Expected dead letters (each exactly once): event id -> how the reason may start.

        An open the database refuses is rejected for that when it is written; in a batch where
        another open of its position comes first it is not written at all but is a conflict.
        """
        out: dict[str, tuple[str, ...]] = {}
        for i in {UNIVERSE.index(e) for e in self.events} - self.standing():
            e = UNIVERSE[i]
            winner = self.first(e.kind, e.key)
            if e.kind in ("order", "trade"):
                out[e.event_id] = (f"conflict: {e.kind}s already holds event {e.event_id} ",)
                continue
            verb = "opened" if e.kind == "open" else "closed"
            reasons = [] if winner is None else [f"conflict: position {e.key} already {verb} by"]
            if e.bad:
                reasons.append("database rejected the row")
            elif winner is not None:
                reasons[0] += f" event {winner.event_id}"
            out[e.event_id] = tuple(reasons)
        return out


@pytest.fixture
async def sink_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """ingestd's own pool on this test's database."""
    pool = await ingestd_pool(db_dsn)
    yield pool
    await pool.close()


async def _reset(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "TRUNCATE positions, orders, trades, dead_letters, position_closes_pending"
        " RESTART IDENTITY CASCADE"
    )


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    picks=st.lists(st.sampled_from(range(len(UNIVERSE))), min_size=1, max_size=24),
    cuts=st.lists(st.booleans(), min_size=24, max_size=24),
)
async def test_positions_end_as_the_write_once_model_says(
    sink_pool: asyncpg.Pool, picks: list[int], cuts: list[bool]
) -> None:
    await _reset(sink_pool)
    sink = PostgresSink(sink_pool)
    sequence = [UNIVERSE[i] for i in picks]
    batches: list[list[Ev]] = [[]]
    for i, e in enumerate(sequence):
        batches[-1].append(e)
        if cuts[i] and i < len(sequence) - 1:
            batches.append([])
    rejected = duplicates = 0
    for batch in batches:
        outcome = await sink.write([e.item() for e in batch])
        rejected += len(outcome.rejected)
        duplicates += outcome.duplicates

    model = Model(sequence)
    got = {
        r["position_key"]: {k: r[k] for k in model_columns()}
        for r in await sink_pool.fetch("SELECT * FROM positions")
    }
    assert got == model.positions()
    parked = await sink_pool.fetch("SELECT position_key, event_id FROM position_closes_pending")
    assert {r["position_key"]: r["event_id"] for r in parked} == model.parked()

    letters = await sink_pool.fetch("SELECT event_id, error FROM dead_letters")
    assert sorted(r["event_id"] for r in letters) == sorted(model.dead_letters())  # once each
    for r in letters:
        assert r["error"].startswith(model.dead_letters()[r["event_id"]]), r["error"]
        assert "(its open has not arrived)" in r["error"] or r["event_id"] not in {
            f"close-{k}-{v}" for k in model.parked() for v in "abc"
        }

    # Every accepted order and trade landed once, linked exactly when its position exists.
    expected_legs = {
        (e.kind, e.event_id, e.obj.get("venue")) for e in (UNIVERSE[i] for i in model.standing())
    }
    expected_legs = {x for x in expected_legs if x[0] in ("order", "trade")}
    legs = await sink_pool.fetch(
        "SELECT 'order' AS kind, event_id, venue, position_key, position_id FROM orders"
        " UNION ALL SELECT 'trade', event_id, NULL, position_key, position_id FROM trades"
    )
    assert {(r["kind"], r["event_id"], r["venue"]) for r in legs} == expected_legs
    ids = {r["position_key"]: r["id"] for r in await sink_pool.fetch("SELECT * FROM positions")}
    for r in legs:
        assert r["position_id"] == ids.get(r["position_key"])

    # Every redelivery of an event that stands is a duplicate; every copy of one that does not
    # is rejected (and dead-lettered once, above).
    counts = collections.Counter(picks)
    standing = model.standing()
    assert duplicates == sum(n - 1 for i, n in counts.items() if i in standing)
    assert rejected == sum(n for i, n in counts.items() if i not in standing)


def model_columns() -> tuple[str, ...]:
    """The positions columns the model predicts."""
    return ("symbol", "size", "producer", "open_event_id", "close_event_id", "status", "pnl_krw")


# --- two replicas racing on one position ---------------------------------------------------


async def test_two_replicas_racing_on_one_position_end_write_once(
    sink_pool: asyncpg.Pool, db_dsn: str
) -> None:
    other = await ingestd_pool(db_dsn)
    try:
        sinks = (PostgresSink(sink_pool), PostgresSink(other))
        for round_ in range(15):
            await _reset(sink_pool)
            a = [Ev("open", "p0", pos_open("p0", eid="open-a")).item()]
            b = [
                Ev("open", "p0", {**pos_open("p0", eid="open-b"), "size": "2"}).item(),
                Ev("close", "p0", pos_close("p0", eid="close-b")).item(),
            ]
            c = [Ev("close", "p0", {**pos_close("p0", eid="close-c"), **EXIT_B}).item()]
            jobs = [(sinks[0], a), (sinks[1], b), (sinks[round_ % 2], c)]
            await asyncio.gather(*(s.write(batch) for s, batch in jobs))
            row = await sink_pool.fetchrow("SELECT * FROM positions")
            assert row is not None
            # Whichever open and close committed first stand, whole; the others are dead letters.
            assert (row["open_event_id"], row["size"]) in {("open-a", D("0.01")), ("open-b", D(2))}
            assert (row["close_event_id"], row["pnl_krw"]) in {
                ("close-b", D(EXIT["pnl_krw"])),
                ("close-c", D(EXIT_B["pnl_krw"])),
            }
            letters = {r["event_id"] for r in await sink_pool.fetch("SELECT * FROM dead_letters")}
            assert letters == {"open-a", "open-b", "close-b", "close-c"} - {
                row["open_event_id"],
                row["close_event_id"],
            }
            assert row["entry_upbit_price"] == D(ENTRY["entry_upbit_price"])
    finally:
        await other.close()


# --- the daemon sweeps the closes whose open never came --------------------------------------


async def _eventually(check: Callable[[], bool], what: str) -> None:
    """Poll until ``check()`` is true; a generous bound only keeps a broken build from hanging."""
    for _ in range(600):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"never happened: {what}")


async def test_the_daemon_dead_letters_a_close_parked_past_its_age(
    settings: Settings, db: asyncpg.Connection
) -> None:
    fast = settings.replace(
        **{"mirror.open_count_reconcile_s": 0.05, "pipeline.parked_close_max_age_s": 3600}
    )
    async with Service(fast) as service:
        await service.submit(pos_close("lost", eid="close-lost"))
        await _eventually(lambda: service.metrics.parked_closes == 1, "the gauge shows it")
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0  # not old yet
        await db.execute("UPDATE position_closes_pending SET received_at = now() - interval '2h'")
        await _eventually(lambda: service.metrics.parked_closes == 0, "the sweep takes it")
        scrape = {s.name: s.value for family in service.registry.collect() for s in family.samples}
        assert scrape["ingestd_parked_closes"] == 0
        assert service.metrics.events_dead_lettered["position_close"] == 1
    row = await db.fetchrow("SELECT event_id, source, error FROM dead_letters")
    assert row is not None
    assert (row["event_id"], row["source"]) == ("close-lost", "parked_closes")
    assert row["error"].startswith("close without open: position lost was closed by event")
    assert await db.fetchval("SELECT count(*) FROM position_closes_pending") == 0


async def test_stats_shows_the_parked_closes(
    sink_pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    sink = PostgresSink(sink_pool)
    await sink.write([item(pos_close("w1")), item(pos_close("w2")), item(pos_open("w2"))])
    await sink.write([item(pos_close("w3"))])
    await db.execute(
        "UPDATE position_closes_pending SET received_at = now() - interval '3 days'"
        " WHERE position_key = 'w3'"
    )
    report = await stats.collect_database(db, parked_close_max_age_s=86_400)
    parked = report["parked_closes"]
    assert (parked["waiting"], parked["past_max_age"], parked["max_age_s"]) == (2, 1, 86_400)
    assert parked["oldest_age_s"] >= 3 * 86_400
    text = stats.render(report)
    assert "parked closes (position_close waiting for its open): 2 waiting, 1 past" in text
    assert orjson.loads(stats.to_json(report))["parked_closes"]["waiting"] == 2
