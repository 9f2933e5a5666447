"""The typed fast path accepts only what the general path accepts, and gives the same event."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.errors import InvalidEvent
from ingestd.tools.simulate import Simulator
from ingestd.wire import events, fastpath


def general(payload: bytes, default_event_id: str | None = None) -> events.Event | None:
    """The general path's verdict: the event, or None for bad input."""
    try:
        return events.parse_event(events.decode_json(payload), default_event_id=default_event_id)
    except InvalidEvent:
        return None


def agree(payload: bytes, default_event_id: str | None = None) -> events.Event | None:
    """Assert the contract; return the fast path's event (None when it declined)."""
    fast = fastpath.decode(payload, default_event_id)
    if fast is not None:
        assert fast == general(payload, default_event_id), payload
    return fast


FEED = list(itertools.islice(Simulator(seed=9).events(), 3_000))


def test_the_simulated_feed_takes_the_fast_path_with_the_same_events() -> None:
    for ev in FEED:
        assert agree(orjson.dumps(ev)) is not None, ev


def test_default_and_content_event_ids_are_the_same() -> None:
    ev = {k: v for k, v in FEED[1].items() if k != "event_id"}
    payload = orjson.dumps(ev)
    assert agree(payload, "stream:1-0") is not None
    fast = agree(payload)
    assert fast is not None and fast.event_id.startswith("local:")


@pytest.mark.parametrize(
    "change",
    [
        {"upbit_price": 140123456.12},  # a JSON number: the general path's exact-text reading
        {"upbit_price": "140123456.125"},  # digits to round
        {"upbit_price": "12345678901234567"},  # does not fit
        {"spread_pct": "3.1836 "},
        {"timestamp": "2025-11-15 03:40:15Z"},  # a rarer RFC 3339 form
        {"timestamp": "2025-11-15T03:40:15.1234567Z"},  # more than microseconds
        {"timestamp": "2025-11-15T03:40:15"},  # naive
        {"timestamp": "2025-02-30T03:40:15Z"},  # no such day
        {"symbol": "ABCDEFGHIJK"},
        {"symbol": "B\x00C"},
        {"symbol": ""},
        {"producer": "p\x00"},
        {"event_id": "x" * 101},
        {"event_id": ""},
        {"is_opportunity": 1},
        {"is_opportunity": None},
        {"extra": 1},
        {"type": "candle"},
        {"symbol": None},
    ],
)
def test_what_the_fast_path_declines_the_general_path_decides(change: dict[str, Any]) -> None:
    spread = next(e for e in FEED if e["type"] == "spread")
    payload = orjson.dumps({**spread, **change})
    assert fastpath.decode(payload, None) is None or change == {"is_opportunity": None}
    agree(payload)


def test_a_heartbeat_named_ingestd_is_declined() -> None:
    hb = next(e for e in FEED if e["type"] == "heartbeat")
    assert fastpath.decode(orjson.dumps({**hb, "component": "ingestd"}), None) is None


_TEXT = st.one_of(
    st.text(max_size=25),
    st.from_regex(r"-?[0-9]{0,12}(\.[0-9]{0,10})?", fullmatch=True),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,8})?"
        r"(Z|[+-][0-9]{2}:[0-9]{2})?",
        fullmatch=True,
    ),
)
_VALUE = st.one_of(
    _TEXT, st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.just([])
)


@settings(max_examples=1500, database=None, deadline=None)
@given(st.sampled_from(FEED[:200]), st.dictionaries(st.text(max_size=20), _VALUE, max_size=3))
def test_property_fast_path_is_a_subset_of_the_general_path(
    base: dict[str, Any], changes: dict[str, Any]
) -> None:
    # Change some of the fields (or add unknown ones) of a real event, any way at all.
    keys = list(base)
    mutated = dict(base)
    for i, (key, value) in enumerate(changes.items()):
        mutated[keys[i % len(keys)] if i % 2 == 0 else key] = value
    agree(json.dumps(mutated).encode())
