"""ingestd.tools.scenarios: the fault scenarios of ``ingestd simulate --scenario``."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest

from ingestd.tools import scenarios
from ingestd.tools.simulate import Simulator

START = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


def feed(seconds: float) -> list[dict[str, Any]]:
    sim = Simulator(seed=3, symbols=("BTC", "ETH"), start=START, tick_s=0.1)
    return list(
        itertools.takewhile(lambda ev: at(ev) < START + dt.timedelta(seconds=seconds), sim.events())
    )


def at(ev: dict[str, Any]) -> dt.datetime:
    field = next(f for f in ("timestamp", "timestamp_open", "timestamp_close") if f in ev)
    return dt.datetime.fromisoformat(ev[field])


def inside(ev: dict[str, Any], lo: float, hi: float) -> bool:
    """Inside [lo, hi) seconds after the first event (where a scenario's window counts from)."""
    first = at(FIRST[0])
    return first + dt.timedelta(seconds=lo) <= at(ev) < first + dt.timedelta(seconds=hi)


def dropped_from(events: list[dict[str, Any]], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    FIRST[:] = events[:1]
    kept = {ev["event_id"] for ev in out}
    return [ev for ev in events if ev["event_id"] not in kept]


FIRST: list[dict[str, Any]] = []


def test_collector_pause_drops_every_collector_event_in_the_window_only() -> None:
    events = feed(120)
    out = list(scenarios.apply(events, "collector-pause", after_s=30, duration_s=40))
    dropped = dropped_from(events, out)
    assert dropped and all(ev["producer"] == "collector" and inside(ev, 30, 70) for ev in dropped)
    assert {ev["type"] for ev in dropped} == {"spread", "fx_rate", "heartbeat"}
    # Nothing of the collector inside the window; the paper trader's events all stay.
    assert not any(ev["producer"] == "collector" and inside(ev, 30, 70) for ev in out)
    assert [ev for ev in events if ev["producer"] != "collector"] == [
        ev for ev in out if ev["producer"] != "collector"
    ]
    assert any(ev["type"] == "heartbeat" and inside(ev, 70, 120) for ev in out)


def test_fx_stale_drops_only_fx_rates_in_the_window() -> None:
    events = feed(90)
    out = list(scenarios.apply(events, "fx-stale", after_s=20, duration_s=30))
    dropped = dropped_from(events, out)
    assert dropped and all(ev["type"] == "fx_rate" and inside(ev, 20, 50) for ev in dropped)
    assert len(dropped) == sum(1 for ev in events if ev["type"] == "fx_rate" and inside(ev, 20, 50))
    assert any(ev["type"] == "spread" and inside(ev, 20, 50) for ev in out)


def test_drop_hedge_leg_drops_one_binance_opening_leg() -> None:
    events = feed(1800)
    out = list(scenarios.apply(events, "drop-hedge-leg", after_s=0, duration_s=1800))
    (dropped,) = dropped_from(events, out)
    assert dropped["type"] == "order" and dropped["venue"] == "binance_futures"
    key = dropped["position_key"]
    # Its Upbit leg is sent: one venue filled, the other not, a half hedge.
    assert any(
        ev["type"] == "order" and ev["position_key"] == key and ev["venue"] == "upbit" for ev in out
    )


@pytest.mark.parametrize(
    ("scenario", "after_s", "duration_s"),
    [("db-gone", 0, 10), ("fx-stale", -1, 10), ("fx-stale", 0, 0)],
)
def test_bad_scenarios_are_refused_at_the_call(
    scenario: str, after_s: float, duration_s: float
) -> None:
    with pytest.raises(ValueError):
        scenarios.apply(iter(()), scenario, after_s=after_s, duration_s=duration_s)
