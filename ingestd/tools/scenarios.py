"""Fault scenarios for ``ingestd simulate --scenario``: what a live trader must react to.

Each scenario filters the simulator's event stream during a window of event time (``after_s``
seconds after the first event, for ``duration_s``), so a trader watching ``trading:state`` and the
alerts sees the fault appear and (where the fault ends) disappear:

- ``collector-pause``: the collector sends nothing (no spreads, FX or heartbeats): its heartbeat
  and the USDKRW rate go stale, ``trading:state`` becomes HALTED, then ACTIVE after the pause
  plus the hysteresis.
- ``fx-stale``: the collector sends no FX rates (spreads and heartbeats go on): the USDKRW rate
  goes stale, HALTED.
- ``drop-hedge-leg``: the Binance leg of the first position opened in the window is never sent:
  a half hedge is raised after its grace time, ``trading:state`` becomes REDUCING and stays so
  (the leg never lands; clear it by hand, see the docs).

Filtering by event time rather than by count keeps the window in seconds when the feed is paced
to the wall clock (the default of ``ingestd simulate``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any, Final

SCENARIOS: Final = ("collector-pause", "fx-stale", "drop-hedge-leg")
COLLECTOR: Final = "collector"
DROPPED_VENUE: Final = "binance_futures"


def apply(
    events: Iterable[dict[str, Any]],
    scenario: str,
    *,
    after_s: float,
    duration_s: float,
) -> Iterator[dict[str, Any]]:
    """``events`` without the ones ``scenario`` drops inside its window."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    if after_s < 0 or duration_s <= 0:
        raise ValueError("the scenario window needs after_s >= 0 and duration_s > 0")
    # Checked above, at the call, not at the first event a generator would be asked for.
    return _filtered(events, scenario, after_s, duration_s)


def _filtered(
    events: Iterable[dict[str, Any]], scenario: str, after_s: float, duration_s: float
) -> Iterator[dict[str, Any]]:
    window_start: dt.datetime | None = None
    window_end: dt.datetime | None = None
    dropped_leg = False
    for ev in events:
        at = _event_time(ev)
        if window_start is None:
            window_start = at + dt.timedelta(seconds=after_s)
            window_end = window_start + dt.timedelta(seconds=duration_s)
        assert window_end is not None
        inside = window_start <= at < window_end
        if scenario == "drop-hedge-leg":
            # Only one position's opening leg: one half hedge to react to, not one per trade.
            if not dropped_leg and inside and _is_opening_hedge_leg(ev):
                dropped_leg = True
                continue
        elif inside and _drops(scenario, ev):
            continue
        yield ev


def _event_time(ev: dict[str, Any]) -> dt.datetime:
    # Positions carry their opening or closing time instead of ``timestamp``.
    for field in ("timestamp", "timestamp_open", "timestamp_close"):
        if field in ev:
            return dt.datetime.fromisoformat(str(ev[field]))
    raise ValueError(f"event {ev.get('event_id')!r} has no event time")


def _is_opening_hedge_leg(ev: dict[str, Any]) -> bool:
    # The simulator numbers an opening's legs _leg_0 (Upbit) and _leg_1 (Binance), a closing's
    # _leg_2 and _leg_3.
    return (
        ev["type"] == "order"
        and ev.get("venue") == DROPPED_VENUE
        and str(ev.get("leg_id", "")).endswith("_leg_1")
    )


def _drops(scenario: str, ev: dict[str, Any]) -> bool:
    if ev.get("producer") != COLLECTOR:
        return False
    if scenario == "collector-pause":
        return True
    return bool(ev["type"] == "fx_rate")  # fx-stale
