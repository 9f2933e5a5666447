"""The producer outbox (pure bookkeeping)."""

from __future__ import annotations

import pytest

from ingestd.producer.storage.outbox import Backoff, Outbox, Pending


def p(n: int) -> Pending:
    """A pending event named e<n>."""
    return Pending(f"e{n}", b"{}")


def test_take_settle_and_put_back_keep_order_and_counts() -> None:
    box = Outbox(10)
    for i in range(5):
        box.add(p(i))
    chunk = box.take(3)
    assert [x.event_id for x in chunk] == ["e0", "e1", "e2"]
    box.add(p(5))
    box.put_back(chunk)  # the publish failed: to the front, in order
    assert [x.event_id for x in box.take(10)] == ["e0", "e1", "e2", "e3", "e4", "e5"]
    assert box.settled == 0
    box.put_back([p(0)])
    box.settle(box.take(1))
    assert (box.added, box.sent, box.settled, len(box)) == (6, 1, 1, 0)


def test_block_policy_never_drops() -> None:
    box = Outbox(2)
    box.add(p(0))
    box.add(p(1))
    assert box.full
    box.add(p(2))  # callers wait for room before add; the outbox itself never drops
    assert box.dropped == 0 and len(box) == 3


def test_drop_oldest_policy_counts_what_it_drops() -> None:
    box = Outbox(3, overflow="drop_oldest")
    for i in range(5):
        box.add(p(i))
    assert [x.event_id for x in box.take(10)] == ["e2", "e3", "e4"]
    assert (box.dropped, box.first_dropped, box.last_dropped) == (2, "e0", "e1")
    box.add(p(5))
    box.put_back([p(2), p(3), p(4)])  # a failed chunk comes back; the oldest go again
    assert len(box) == 3 and box.dropped == 3
    assert box.settled == 3  # dropped counts as settled: flush() does not wait for them


def test_the_bound_counts_the_chunk_in_flight() -> None:
    box = Outbox(3)
    for i in range(3):
        box.add(p(i))
    chunk = box.take(2)
    assert len(box) == 1 and box.in_flight == 2 and box.full  # memory still holds three
    box.put_back(chunk)
    assert box.in_flight == 0 and box.full
    box.settle(box.take(3))
    assert not box.full and box.in_flight == 0
    dropping = Outbox(3, overflow="drop_oldest")
    for i in range(3):
        dropping.add(p(i))
    sending = dropping.take(2)
    dropping.add(p(3))  # drops e2, the oldest queued; the chunk in flight is not touched
    assert dropping.first_dropped == "e2" and [x.event_id for x in sending] == ["e0", "e1"]
    dropping.put_back(sending)
    assert [x.event_id for x in dropping.take(5)] == ["e0", "e1", "e3"]


def test_outbox_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Outbox(0)


def test_backoff_is_capped_and_resets() -> None:
    b = Backoff()
    delays = [b.next_delay() for _ in range(20)]
    assert all(0 <= d <= Backoff.CAP_S for d in delays)
    b.reset()
    assert b.attempt == 0
