"""The producer models: exact decimals, aware times, wire events, the rules of
ingestd.wire.events."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal as D
from typing import Any

import orjson
import pytest

from ingestd.errors import InvalidEvent
from ingestd.producer.storage.models import (
    CLOSED,
    OPEN,
    FxRate,
    OrderLeg,
    Position,
    SpreadOpportunity,
    Trade,
)
from ingestd.wire import decoding
from tests.samples import T0, at, closed, fx_rate, order, position, spread, trade


@pytest.mark.parametrize(
    "model",
    [spread(1), fx_rate(1), order(1), order(2, key=None), trade(1), trade(2, side="CLOSE")],
    ids=lambda m: type(m).__name__,
)
def test_wire_round_trip_is_exact(model: object) -> None:
    event = model.to_event(event_id="e-1", producer="paper")  # type: ignore[attr-defined]
    payload = orjson.dumps(event)
    back = type(model).from_event(payload)  # type: ignore[attr-defined]
    assert back == model
    parsed = decoding.decode_event(payload, max_bytes=1 << 20)
    assert parsed.event_id == "e-1" and parsed.producer == "paper"


def test_position_open_and_close_events() -> None:
    pos = position()
    assert pos.status == OPEN
    open_ev = pos.to_event(event_id="pos_001:open")
    assert open_ev["type"] == "position_open" and "exit_upbit_price" not in open_ev
    assert Position.from_event(open_ev) == pos
    done = closed(pos)
    close_ev = done.close_event()
    assert close_ev["type"] == "position_close"
    # The close repeats the entry columns, so a close that lands first can write the whole row.
    assert close_ev["entry_upbit_price"] == "140123456.12"
    back = Position.from_event(close_ev)
    assert back == done and back.status == CLOSED
    # The open event of a CLOSED position is its entry (a CSV history holds both).
    assert done.open_event()["type"] == "position_open"


def test_close_without_entry_columns_is_not_a_position() -> None:
    ev = closed(position()).close_event()
    del ev["entry_upbit_price"]
    with pytest.raises(InvalidEvent) as excinfo:
        Position.from_event(ev)
    assert excinfo.value.field == "entry_upbit_price"


def test_close_event_of_an_open_position_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="CLOSED") as excinfo:
        position().close_event()
    assert excinfo.value.field == "status"


def test_float_is_read_through_its_repr_never_binary_noise() -> None:
    rate = FxRate(pair="USDKRW", rate=1350.0, timestamp=T0)  # type: ignore[arg-type]
    assert rate.rate == D("1350.0")
    assert rate.to_event()["rate"] == "1350.0"
    s = dataclasses.replace(spread(0), spread_pct=0.1)  # type: ignore[arg-type]
    assert s.spread_pct == D("0.1")  # not 0.1000000000000000055511151231257827


def test_values_are_kept_as_the_database_stores_them() -> None:
    s = dataclasses.replace(spread(0), upbit_price=D("140123456.125"), spread_pct=D("-1.00005"))
    assert s.upbit_price == D("140123456.13")  # NUMERIC(18, 2), half away from zero
    assert s.spread_pct == D("-1.0001")
    assert s.to_event()["upbit_price"] == "140123456.13"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": dt.datetime(2025, 11, 15, 3, 40)}, "timestamp"),  # noqa: DTZ001 - naive
        ({"upbit_price": D("NaN")}, "upbit_price"),
        ({"spread_pct": D("123456.5")}, "spread_pct"),  # NUMERIC(8, 4) overflow
        ({"symbol": "X" * 11}, "symbol"),
        ({"symbol": ""}, "symbol"),
        ({"binance_price": True}, "binance_price"),
    ],
)
def test_bad_values_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        dataclasses.replace(spread(0), **change)
    assert excinfo.value.field == field


def test_open_position_with_exit_columns_is_refused() -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        dataclasses.replace(position(), pnl_krw=D("1"))
    assert excinfo.value.field == "pnl_krw"
    with pytest.raises(InvalidEvent) as excinfo:
        dataclasses.replace(position(), status="HALF")
    assert excinfo.value.field == "status"


def test_closed_position_needs_every_exit_column() -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        dataclasses.replace(position(), status=CLOSED)
    assert excinfo.value.field == "exit_upbit_price"


def test_from_event_of_another_type_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="not a SpreadOpportunity"):
        SpreadOpportunity.from_event(fx_rate(0).to_event())
    with pytest.raises(InvalidEvent, match="not a Position"):
        Position.from_event(trade(0).to_event())


def test_times_keep_their_offset_and_compare_as_instants() -> None:
    kst = dt.timezone(dt.timedelta(hours=9))
    o = dataclasses.replace(order(0), timestamp=at(0).astimezone(kst))
    assert o.timestamp == at(0)
    assert o.to_event()["timestamp"].endswith("+09:00")
    assert OrderLeg.from_event(o.to_event()).timestamp == at(0)
    assert Trade.from_event(trade(3).to_event()).timestamp.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (5e-05, D("0.00005")),  # repr "5e-05": an exponent, read exactly
        (1e-8, D("0.00000001")),
        (1.5e3, D("1500.0")),
        (1350.0, D("1350.0")),
        (-5e-05, D("-0.00005")),
    ],
)
def test_a_float_with_an_exponent_is_read_exactly_as_its_repr(value: float, stored: D) -> None:
    leg = dataclasses.replace(order(0), qty=value)  # type: ignore[arg-type]
    assert leg.qty == stored
    assert leg.to_event()["qty"] == format(stored, "f")
    rate = FxRate(pair="USDKRW", rate=value, timestamp=T0)  # type: ignore[arg-type]
    assert rate.rate == stored


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_float_nan_or_infinity_is_refused_naming_the_field(value: float) -> None:
    with pytest.raises(InvalidEvent, match="not a finite number") as excinfo:
        dataclasses.replace(order(0), qty=value)  # type: ignore[arg-type]
    assert excinfo.value.field == "qty"
