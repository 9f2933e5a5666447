"""Intake limits and refusals: nesting depth, huge integers, retention, future heartbeats."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import pytest

from ingestd.commands.health import heartbeat_age
from ingestd.errors import InvalidEvent
from ingestd.wire import decoding, events
from tests.samples import SPREAD_PRICES, nested_lists

MAX = 1_048_576
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def _heartbeat(**extra: Any) -> dict[str, Any]:
    return {"type": "heartbeat", "component": "c", "timestamp": "2026-12-03T00:00:00Z", **extra}


def _deep_json(levels: int, *, key_first: bool = False) -> bytes:
    deep = b"[" * levels + b"]" * levels
    if key_first:  # the tag ("type") comes after the deep value: the typed decoder must skip it
        return b'{"x": ' + deep + b', "type": "heartbeat"}'
    return json.dumps(_heartbeat()).encode()[:-1] + b', "x": ' + deep + b"}"


@pytest.mark.parametrize("key_first", [False, True])
def test_deep_nesting_is_refused_with_a_clear_reason_and_no_traceback(
    key_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(_deep_json(5000, key_first=key_first), max_bytes=MAX)
    assert "nested deeper than 32 levels" in str(info.value)
    assert "internal error" not in str(info.value)
    assert not [r for r in caplog.records if r.exc_info]


def test_nesting_just_past_the_configured_depth_is_refused_below_it_is_judged_as_usual() -> None:
    with pytest.raises(InvalidEvent, match="nested deeper than 4 levels"):
        decoding.decode_event(_deep_json(4), max_bytes=MAX, max_depth=4)
    # Within the limit the usual rules decide (an unknown field), not the depth.
    with pytest.raises(InvalidEvent, match="unknown field"):
        decoding.decode_event(_deep_json(3), max_bytes=MAX, max_depth=4)


def test_deep_mapping_in_process_is_refused_with_a_clear_reason() -> None:
    with pytest.raises(InvalidEvent, match="nested deeper than 32 levels"):
        events.normalize(_heartbeat(x=nested_lists(5000)))


def test_a_cyclic_mapping_is_refused_not_walked_forever() -> None:
    cyclic: dict[str, Any] = _heartbeat()
    cyclic["x"] = [cyclic]
    with pytest.raises(InvalidEvent, match="nested deeper than"):
        events.normalize(cyclic)


def test_a_huge_json_integer_is_out_of_range_not_invalid_json() -> None:
    payload = (
        b'{"type": "fx_rate", "pair": "USDKRW", "rate": '
        + b"9" * 5000
        + b', "timestamp": "2026-12-03T00:00:00Z"}'
    )
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(payload, max_bytes=MAX)
    assert info.value.field == "rate"
    assert "does not fit NUMERIC(18, 8)" in str(info.value)
    assert "not valid JSON" not in str(info.value)


def test_a_huge_json_integer_where_a_string_belongs_says_so() -> None:
    payload = json.dumps(_heartbeat()).encode().replace(b'"c"', b"-" + b"1" * 5000)
    with pytest.raises(InvalidEvent, match="component: expected a string, got a number"):
        decoding.decode_event(payload, max_bytes=MAX)


def test_invalid_json_with_a_huge_integer_is_still_invalid_json() -> None:
    with pytest.raises(InvalidEvent, match="not valid JSON"):
        decoding.decode_event(b'{"rate": ' + b"9" * 5000 + b", NaN}", max_bytes=MAX)


# --- retention ---------------------------------------------------------------------------------

RETENTION = events.Retention({"spreads": 90, "fx_rates": 180, "orders": 365}, clock=lambda: NOW)


def _spread(when: dt.datetime) -> bytes:
    return json.dumps(
        {
            "type": "spread",
            "event_id": "r-1",
            **SPREAD_PRICES,
            "timestamp": when.isoformat(),
        }
    ).encode()


def test_an_event_older_than_its_tables_retention_is_refused() -> None:
    old = NOW - dt.timedelta(days=90, seconds=1)
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(_spread(old), max_bytes=MAX, retention=RETENTION)
    assert "older than the 90-day retention of spreads" in str(info.value)
    assert info.value.field == "timestamp"
    # Without a retention (a library caller), and just inside it, it is accepted.
    assert decoding.decode_event(_spread(old), max_bytes=MAX).type == "spread"
    inside = NOW - dt.timedelta(days=89, hours=23)
    assert decoding.decode_event(_spread(inside), max_bytes=MAX, retention=RETENTION).time == inside


def test_retention_applies_in_process_per_table_and_not_where_none_is_configured() -> None:
    fx = {"type": "fx_rate", "pair": "USDKRW", "rate": "1385.5"}
    with pytest.raises(InvalidEvent, match="older than the 180-day retention of fx_rates"):
        events.normalize({**fx, "timestamp": NOW - dt.timedelta(days=181)}, retention=RETENTION)
    assert events.normalize(
        {**fx, "timestamp": NOW - dt.timedelta(days=179)}, retention=RETENTION
    ).values["rate"] == ("1385.5")
    # trades and positions have no retention: years-old history is accepted.
    trade = {
        "type": "trade",
        "symbol": "BTC",
        "direction": "d",
        "size": "1",
        "side": "OPEN",
        "timestamp": "2020-01-01T00:00:00Z",
    }
    assert events.normalize(trade, retention=RETENTION).type == "trade"
    # 0 days keeps rows forever, so nothing is refused.
    forever = events.Retention({"spreads": 0}, clock=lambda: NOW)
    ancient = NOW - dt.timedelta(days=3000)
    assert (
        decoding.decode_event(_spread(ancient), max_bytes=MAX, retention=forever).type == "spread"
    )


# --- heartbeats --------------------------------------------------------------------------------


def test_a_heartbeat_dated_in_the_future_is_not_fresh() -> None:
    hour_ahead = (NOW + dt.timedelta(hours=1)).isoformat()
    assert heartbeat_age(hour_ahead, NOW) is None
    # Within the allowed clock skew it counts as just now, never as a negative age.
    assert heartbeat_age((NOW + dt.timedelta(seconds=1)).isoformat(), NOW) == 0.0
    assert heartbeat_age((NOW - dt.timedelta(seconds=3)).isoformat().encode(), NOW) == 3.0


def test_a_huge_integer_before_deep_nesting_is_refused_for_the_nesting() -> None:
    payload = b'{"type": "heartbeat", "n": ' + b"9" * 30 + b', "x": ' + b"[" * 5000 + b"]" * 5000
    with pytest.raises(InvalidEvent, match="nested deeper than 32 levels"):
        decoding.decode_event(payload + b"}", max_bytes=MAX)
