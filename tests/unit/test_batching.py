"""The intake queue and the batcher: bookkeeping without I/O, driven by a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestd.daemon.batching import Batcher, BatchOutcome, IntakeQueue, Item
from ingestd.daemon.deadletters import make_dead_letter
from ingestd.wire import decoding
from tests.samples import SPREAD_PRICES

MAX = 1_048_576


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSource:
    """A producer's acknowledgement target (an in-memory stand-in, not Redis)."""

    name = "fake"

    def __init__(self) -> None:
        self.acked: list[list[Item]] = []

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        self.acked.append(list(items))

    def dead_letter_key(self, item: Item) -> str | None:
        return f"fake:{item.token}"


SOURCE = FakeSource()

PAYLOADS: dict[str, dict[str, Any]] = {
    "spread": {
        "type": "spread",
        **SPREAD_PRICES,
        "timestamp": "2025-11-15T03:40:15Z",
    },
    "fx_rate": {
        "type": "fx_rate",
        "pair": "USDKRW",
        "rate": "1385.5",
        "timestamp": "2025-11-15T03:40:15Z",
    },
    "order": {
        "type": "order",
        "symbol": "BTC",
        "venue": "upbit",
        "side": "sell",
        "qty": "1",
        "price_theoretical": "1",
        "leg_id": "pos_1_leg_0",
        "timestamp": "2025-11-15T03:40:15Z",
    },
    "trade": {
        "type": "trade",
        "symbol": "BTC",
        "direction": "d",
        "size": "1",
        "side": "OPEN",
        "timestamp": "2025-11-15T03:40:15Z",
    },
    "position_open": {
        "type": "position_open",
        "position_key": "pos_1",
        "symbol": "BTC",
        "direction": "d",
        "size": "1",
        "entry_upbit_price": "1",
        "entry_binance_price": "1",
        "entry_spread_pct": "1",
        "timestamp_open": "2025-11-15T03:40:15Z",
    },
    "position_close": {
        "type": "position_close",
        "position_key": "pos_1",
        "exit_upbit_price": "1",
        "exit_binance_price": "1",
        "exit_spread_pct": "1",
        "pnl_krw": "1",
        "pnl_pct": "1",
        "timestamp_close": "2025-11-15T03:40:15Z",
    },
    "heartbeat": {"type": "heartbeat", "component": "paper", "timestamp": "2025-11-15T03:40:15Z"},
}

_counter = 0


def item(etype: str = "spread") -> Item:
    global _counter  # noqa: PLW0603 - a unique token per item is all this is for
    _counter += 1
    raw = json.dumps({**PAYLOADS[etype], "event_id": f"e-{_counter}"}).encode()
    ev = decoding.decode_event(raw, max_bytes=MAX)
    return Item(ev, None, SOURCE, _counter, raw, 0.0)


def dead_item() -> Item:
    raw = b"not json"
    dl = make_dead_letter(raw, "not valid JSON", source=SOURCE.name)
    return Item(None, dl, SOURCE, "dl", raw, 0.0)


# --- Item ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("etype", "route"),
    [
        ("spread", "spreads"),
        ("fx_rate", "fx_rates"),
        ("order", "orders"),
        ("trade", "trades"),
        ("position_open", "position_open"),
        ("position_close", "position_close"),
        ("heartbeat", "heartbeat"),
    ],
)
def test_item_route_is_its_table_or_type(etype: str, route: str) -> None:
    assert item(etype).route == route


def test_dead_letter_item_routes_to_dead_letters() -> None:
    assert dead_item().route == "dead_letters"


# --- Batcher ------------------------------------------------------------------------------


def test_batcher_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Batcher(0, 1.0)
    with pytest.raises(ValueError, match="max_age_s"):
        Batcher(10, -0.1)


def test_empty_batcher_is_not_due() -> None:
    clock = FakeClock()
    b = Batcher(5, 0.2, clock)
    assert b.due_in() is None
    assert len(b) == 0
    assert not b.full
    assert b.room() == 5
    clock.advance(100)
    assert b.due_in() is None
    assert b.take() == []


def test_age_counts_from_the_first_item() -> None:
    clock = FakeClock(1000.0)
    b = Batcher(100, 1.0, clock)
    b.add(item())
    assert b.due_in() == pytest.approx(1.0)
    clock.advance(0.25)
    assert b.due_in() == pytest.approx(0.75)
    b.add(item())  # a later item does not restart the age
    clock.advance(0.5)
    assert b.due_in() == pytest.approx(0.25)
    assert not b.full


def test_due_at_max_age_and_never_negative() -> None:
    clock = FakeClock(50.0)
    b = Batcher(100, 0.2, clock)
    b.add(item())
    clock.advance(0.2)
    assert b.due_in() == 0.0
    clock.advance(10)
    assert b.due_in() == 0.0
    assert len(b) == 1
    assert not b.full


def test_zero_max_age_is_due_at_once() -> None:
    b = Batcher(100, 0.0, FakeClock())
    b.add(item())
    assert b.due_in() == 0.0


def test_full_when_one_lane_reaches_max_rows() -> None:
    clock = FakeClock()
    b = Batcher(3, 60.0, clock)
    for etype in ("spread", "fx_rate", "spread", "order", "fx_rate", "heartbeat"):
        b.add(item(etype))
    b.add(dead_item())
    b.add(dead_item())
    # 8 items in five lanes, none holding three: other lanes do not count toward the limit
    assert len(b) == 8
    assert not b.full
    assert b.room() == 1
    assert b.due_in() == pytest.approx(60.0)
    b.add(item("fx_rate"))  # the third fx_rate
    assert b.full
    assert b.room() == 0
    assert b.due_in() == 0.0  # due now, without the clock moving


def test_full_dead_letter_lane() -> None:
    b = Batcher(2, 60.0, FakeClock())
    b.add(dead_item())
    assert not b.full
    b.add(dead_item())
    assert b.full


def test_take_hands_over_in_order_and_resets() -> None:
    clock = FakeClock(10.0)
    b = Batcher(2, 1.0, clock)
    items = [item("spread"), item("fx_rate"), item("spread")]
    for it in items:
        b.add(it)
    assert b.full
    taken = b.take()
    assert taken == items
    assert all(a is b_ for a, b_ in zip(taken, items, strict=True))
    assert len(b) == 0
    assert not b.full
    assert b.due_in() is None
    assert b.room() == 2
    # the next batch's age counts from its own first item
    clock.advance(5.0)
    b.add(item())
    assert b.due_in() == pytest.approx(1.0)
    assert not b.full
    assert len(b.take()) == 1


def test_idle_batch_is_due_at_once_when_none_was_ever_cut() -> None:
    b = Batcher(100, 60.0, FakeClock())
    b.add(item())
    assert b.due_in(idle=True) == 0.0
    assert b.due_in() == pytest.approx(60.0)  # not idle: it waits for company


def test_idle_batch_waits_while_the_last_cut_is_recent() -> None:
    clock = FakeClock()
    b = Batcher(100, 1.0, clock)
    b.add(item())
    assert len(b.take()) == 1
    clock.advance(0.4)
    b.add(item())
    assert b.due_in(idle=True) == pytest.approx(1.0)  # its own age decides
    clock.advance(0.6)  # the last cut is max_age_s old: a quiet spell
    assert b.due_in(idle=True) == 0.0
    assert b.due_in() == pytest.approx(0.4)


def test_an_empty_take_is_not_a_cut() -> None:
    clock = FakeClock()
    b = Batcher(100, 1.0, clock)
    assert b.take() == []
    b.add(item())
    assert b.due_in(idle=True) == 0.0


@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=0.5),  # time until the next item
            st.booleans(),  # whether the pipeline is idle when it is added
        ),
        max_size=200,
    )
)
def test_cuts_are_never_closer_than_max_age_unless_a_batch_is_full(
    steps: list[tuple[float, bool]],
) -> None:
    """Whatever the arrivals and idleness, the idle rule cannot raise the batch rate: a loop
    like the pipeline's (cut when due, else when the age has passed) cuts at least max_age_s
    apart; a full batch is the one exception, and max_rows is set out of reach here."""
    clock = FakeClock(0.0)
    max_age = 0.2
    b = Batcher(10_000, max_age, clock)
    cuts: list[float] = []

    def cut_if_due(*, idle: bool) -> None:
        due = b.due_in(idle=idle)
        if due == 0:
            b.take()
            cuts.append(clock.now)

    for gap, idle in steps:
        wait = gap
        due = b.due_in()
        if due is not None and due <= wait:  # the age passes before the next item comes
            clock.advance(due)
            cut_if_due(idle=False)
            wait -= due
        clock.advance(wait)
        b.add(item())
        cut_if_due(idle=idle)
    assert all(later - earlier >= max_age - 1e-9 for earlier, later in itertools.pairwise(cuts))


# --- IntakeQueue --------------------------------------------------------------------------


async def test_queue_is_fifo() -> None:
    q = IntakeQueue(10)
    a, b, c = item(), item(), item()
    await q.put_many([a, b])
    await q.put_many([c])
    assert len(q) == 3
    assert q.max_items == 10
    assert q.take(2) == [a, b]
    assert q.take(5) == [c]
    assert q.take(5) == []
    assert len(q) == 0


async def test_a_chunk_may_overshoot_the_bound() -> None:
    q = IntakeQueue(2)
    chunk = [item() for _ in range(5)]
    await asyncio.wait_for(q.put_many(chunk), timeout=1)
    assert len(q) == 5


async def test_put_blocks_while_full_until_take_makes_room() -> None:
    q = IntakeQueue(2)
    a, b, c = item(), item(), item()
    await q.put_many([a, b])
    producer = asyncio.create_task(q.put_many([c]))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(producer), timeout=0.05)
    assert not producer.done()
    assert len(q) == 2
    assert q.take(1) == [a]
    await asyncio.wait_for(producer, timeout=1)
    assert len(q) == 2
    assert q.take(10) == [b, c]


async def test_take_that_leaves_the_queue_full_keeps_producers_waiting() -> None:
    q = IntakeQueue(2)
    first = [item() for _ in range(3)]
    await q.put_many(first)  # overshoot: 3 items in a queue bounded at 2
    late = item()
    producer = asyncio.create_task(q.put_many([late]))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(producer), timeout=0.05)
    assert q.take(1) == first[:1]  # 2 left: still at the bound
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(producer), timeout=0.05)
    assert not producer.done()
    assert q.take(1) == first[1:2]  # 1 left: room
    await asyncio.wait_for(producer, timeout=1)
    assert q.take(10) == [first[2], late]


async def test_two_blocked_producers_both_get_in_eventually() -> None:
    q = IntakeQueue(1)
    a, b, c = item(), item(), item()
    await q.put_many([a])
    p1 = asyncio.create_task(q.put_many([b]))
    p2 = asyncio.create_task(q.put_many([c]))
    done, _ = await asyncio.wait({p1, p2}, timeout=0.05)
    assert not done
    assert q.take(1) == [a]
    # exactly one producer fits; the other waits for the next take
    done, pending = await asyncio.wait({p1, p2}, timeout=0.05)
    assert len(done) == 1
    assert len(pending) == 1
    assert len(q) == 1
    first = q.take(1)
    await asyncio.wait_for(pending.pop(), timeout=1)
    second = q.take(1)
    assert sorted(id(x) for x in first + second) == sorted([id(b), id(c)])


async def test_wait_times_out_false_on_an_empty_queue() -> None:
    q = IntakeQueue(10)
    assert await q.wait(0.01) is False
    assert await q.wait(0) is False


async def test_wait_is_true_at_once_when_items_are_there() -> None:
    q = IntakeQueue(10)
    await q.put_many([item()])
    assert await q.wait(0) is True
    assert await q.wait(None) is True


async def test_wait_returns_true_when_an_item_arrives() -> None:
    q = IntakeQueue(10)
    waiter = asyncio.create_task(q.wait(None))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), timeout=0.05)
    await q.put_many([item()])
    assert await asyncio.wait_for(waiter, timeout=1) is True


async def test_wait_after_queue_emptied_waits_again() -> None:
    q = IntakeQueue(10)
    await q.put_many([item()])
    q.take(10)
    assert await q.wait(0.01) is False


async def test_wake_releases_a_waiter_without_items() -> None:
    q = IntakeQueue(10)
    waiter = asyncio.create_task(q.wait(None))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), timeout=0.05)
    q.wake()
    assert await asyncio.wait_for(waiter, timeout=1) is False


# --- byte bounds ------------------------------------------------------------------------------


def sized(n_bytes: int) -> Item:
    """A spread item whose raw payload is padded to ``n_bytes`` (JSON allows the whitespace)."""
    it = item("spread")
    assert it.raw is not None and isinstance(it.raw, bytes)
    it.raw = it.raw + b" " * (n_bytes - len(it.raw))
    return it


def test_item_size_is_its_payload_or_an_estimate() -> None:
    assert sized(5_000).size == 5_000
    assert dead_item().size == len("not json")
    no_raw = item("fx_rate")
    no_raw.raw = None
    assert no_raw.size > 0


def test_batcher_is_full_at_max_bytes_before_max_rows() -> None:
    b = Batcher(1_000, 10.0, clock=lambda: 0.0, max_bytes=10_000)
    for _ in range(3):
        b.add(sized(3_000))
    assert not b.full
    b.add(sized(3_000))
    assert b.full and len(b) == 4
    b.take()
    assert not b.full
    b.add(sized(100))
    assert not b.full  # the byte count starts again with the next batch


async def test_queue_waits_at_max_bytes_although_few_items() -> None:
    q = IntakeQueue(1_000, max_bytes=20_000)
    await q.put_many([sized(10_000), sized(10_000)])
    assert q.full and q.bytes == 20_000
    waiting = asyncio.create_task(q.put_many([sized(10_000)]))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # two items, but 20 kB: producers wait
    q.take(1)
    await asyncio.wait_for(waiting, 1)
    assert q.bytes == 20_000 and len(q) == 2
