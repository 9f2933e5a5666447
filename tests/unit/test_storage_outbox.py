"""The producer outbox (pure bookkeeping) and the progress/table output of the CSV commands."""

from __future__ import annotations

import io

import pytest

from ingestd.storage.outbox import Backoff, Outbox, Pending
from ingestd.textui import Progress, format_table


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


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_rate_limited_and_show_rows_rate_eta() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, mode="lines", line_interval_s=5, clock=clock)
    progress.start("spreads.csv", 1000)
    clock.now = 1.0
    progress.update(100, 5000)  # too soon
    assert out.getvalue() == ""
    clock.now = 5.0
    progress.update(250, 20000)
    # 20,000 rows in 5 s; 250 of 1,000 bytes in 5 s -> 15 s to go.
    assert out.getvalue() == "import-csv: spreads.csv 25%  20,000 rows  4,000 rows/s  ETA 0:00:15\n"
    progress.finish(1000, 40000)
    assert out.getvalue().splitlines()[-1].startswith("import-csv: spreads.csv 100%  40,000 rows")


def test_progress_bar_redraws_one_line_and_notes_clear_it() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, mode="bar", clock=clock)
    progress.start("orders.csv", 200, done_bytes=100)  # resumed half way
    clock.now = 2.0
    progress.update(150, 10)
    text = out.getvalue()
    assert text.startswith("\rorders.csv [") and "75%" in text and "ETA 0:00:02" in text
    progress.note("orders.csv:7: qty: required field is missing")
    assert out.getvalue().endswith("\r\x1b[Korders.csv:7: qty: required field is missing\n")
    progress.finish(200, 12)
    assert out.getvalue().endswith("\n") and "100%" in out.getvalue()


def test_progress_auto_picks_lines_when_not_a_tty() -> None:
    assert Progress(io.StringIO()).mode == "lines"
    out = io.StringIO()
    off = Progress(out, mode="off")
    off.start("x", 1)
    off.update(1, 1, force=True)
    off.note("bad row")  # bad rows are reported even with progress off
    assert out.getvalue() == "bad row\n"


def test_format_table_aligns_numbers_right() -> None:
    text = format_table(["table", "rows"], [["spreads", 1000000], ["fx_rates", 5]])
    assert text.splitlines() == [
        "table          rows",
        "--------  ---------",
        "spreads   1,000,000",
        "fx_rates          5",
    ]
