"""The heartbeat history's coalescing in memory (ingestd.daemon.liveness.LivenessRecorder)."""

from __future__ import annotations

import datetime as dt

from ingestd.daemon.liveness import Interval, LivenessRecorder

T0 = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def recorder(max_intervals: int = 100, now: float = 10_000) -> LivenessRecorder:
    return LivenessRecorder(gap_s=10, max_intervals=max_intervals, clock=lambda: at(now))


def test_heartbeats_within_the_gap_extend_one_interval_and_a_later_one_opens_another() -> None:
    r = recorder()
    for s in (0, 1, 2, 12, 22):  # 10 s apart at most: one interval
        r.note("collector", at(s))
    r.note("collector", at(33))  # 11 s after the last: the collector was down in between
    r.note("paper", at(5))
    assert r.pending == 3
    taken = r.take()
    assert taken["collector"] == [Interval(at(0), at(22), 5), Interval(at(33), at(33), 1)]
    assert taken["paper"] == [Interval(at(5), at(5), 1)]
    assert r.pending == 0 and r.take() == {}


def test_a_late_heartbeat_joins_the_interval_it_belongs_to() -> None:
    r = recorder()
    for s in (0, 5, 100, 105):
        r.note("collector", at(s))
    r.note("collector", at(8))  # late (a redelivered entry): the first interval
    assert r.take()["collector"] == [Interval(at(0), at(8), 3), Interval(at(100), at(105), 2)]


def test_a_heartbeat_dated_ahead_of_the_clock_counts_as_now() -> None:
    r = recorder(now=50)
    r.note("collector", at(3600))
    assert r.take()["collector"] == [Interval(at(50), at(50), 1)]


def test_past_the_bound_the_oldest_interval_is_dropped_and_counted() -> None:
    r = recorder(max_intervals=2)
    r.note("collector", at(0))
    r.note("paper", at(100))
    r.note("collector", at(200))
    assert r.pending == 2 and r.dropped == 1
    taken = r.take()
    assert taken == {
        "paper": [Interval(at(100), at(100))],
        "collector": [Interval(at(200), at(200))],
    }


def test_what_a_failed_write_gives_back_merges_with_what_came_since() -> None:
    r = recorder()
    for s in (0, 5):
        r.note("collector", at(s))
    taken = r.take()
    r.note("collector", at(9))  # within the gap of the interval being written
    r.note("collector", at(50))
    r.give_back(taken)
    assert r.pending == 2
    assert r.take()["collector"] == [Interval(at(0), at(9), 3), Interval(at(50), at(50), 1)]
