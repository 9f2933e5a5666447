"""The wire format (docs/events.md): exact decimals, strict times, clear errors for bad input."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.errors import InvalidEvent
from ingestd.producer import publisher
from ingestd.wire import decoding, events, tables
from tests.samples import SPREAD_PRICES

MAX = 1_048_576
UTC = dt.UTC
KST = dt.timezone(dt.timedelta(hours=9))

# One valid payload per event type, with the exact PostgreSQL text each value must become.
VALID: dict[str, tuple[dict[str, Any], dict[str, str | None]]] = {
    "spread": (
        {
            "type": "spread",
            "event_id": "c1-000042",
            "producer": "collector",
            **SPREAD_PRICES,
            "is_opportunity": True,
            "timestamp": "2025-11-15T12:40:15.123+09:00",
        },
        {
            "symbol": "BTC",
            "upbit_price": "140123456.12",
            "binance_price": "98012.12345678",
            "binance_price_krw": "135800000.55",
            "spread_pct": "3.1836",
            "net_spread_pct": "2.9836",
            "is_opportunity": "true",
            "timestamp": "2025-11-15T12:40:15.123+09:00",
            "upbit_ts": None,
            "binance_ts": None,
            "fx_ts": None,
            "is_stale": "false",
        },
    ),
    "fx_rate": (
        {
            "type": "fx_rate",
            "event_id": "fx-1",
            "producer": "collector",
            "pair": "USDKRW",
            "rate": 1385.5,  # a JSON number within the scale: its literal text, as is
            "source": "upbit",
            "timestamp": "2025-11-15T03:40:15Z",
        },
        {
            "pair": "USDKRW",
            "rate": "1385.5",
            "source": "upbit",
            "timestamp": "2025-11-15T03:40:15+00:00",
        },
    ),
    "order": (
        {
            "type": "order",
            "event_id": "ord-1",
            "producer": "paper",
            "position_key": "pos_001",
            "symbol": "BTC",
            "venue": "upbit",
            "side": "sell",
            "qty": "0.01020408",
            "price_theoretical": 140123456.12,
            "price_effective": "140100000.123456785",  # 9 digits: rounded half away from zero
            "slippage_bps": 1.255,  # 1.255 as a binary float is 1.25499999...; kept exact here
            "leg_id": "pos_001_leg_0",
            "order_id": "UPBIT-77",
            "timestamp": "2025-11-15T03:40:15.000001Z",
        },
        {
            "position_key": "pos_001",
            "symbol": "BTC",
            "venue": "upbit",
            "side": "sell",
            "qty": "0.01020408",
            "price_theoretical": "140123456.12",
            "price_effective": "140100000.12345679",
            "slippage_bps": "1.26",
            "leg_id": "pos_001_leg_0",
            "order_id": "UPBIT-77",
            "timestamp": "2025-11-15T03:40:15.000001+00:00",
            "mode": None,
        },
    ),
    "trade": (
        {
            "type": "trade",
            "event_id": "tr-1",
            "producer": "paper",
            "position_key": "pos_001",
            "symbol": "ETH",
            "direction": "upbit_short_binance_long",
            "size": 2,
            "side": "CLOSE",
            "price_upbit": "4712345.5",
            "price_binance": "3400.1",
            "pnl_krw": "-12345.675",
            "pnl_pct": "-0.12345",
            "timestamp": "2025-11-15T03:40:15.5-05:30",
        },
        {
            "position_key": "pos_001",
            "symbol": "ETH",
            "direction": "upbit_short_binance_long",
            "size": "2",
            "side": "CLOSE",
            "price_upbit": "4712345.5",
            "price_binance": "3400.1",
            "pnl_krw": "-12345.68",
            "pnl_pct": "-0.1235",
            "timestamp": "2025-11-15T03:40:15.5-05:30",
            "mode": None,
        },
    ),
    "position_open": (
        {
            "type": "position_open",
            "event_id": "po-1",
            "producer": "paper",
            "position_key": "pos_001",
            "symbol": "BTC",
            "direction": "upbit_short_binance_long",
            "size": "0.01020408",
            "entry_upbit_price": "140123456.12",
            "entry_binance_price": "98012.12345678",
            "entry_spread_pct": "3.1836",
            "timestamp_open": "2025-11-15T03:40:15.123Z",
        },
        {
            "position_key": "pos_001",
            "symbol": "BTC",
            "direction": "upbit_short_binance_long",
            "size": "0.01020408",
            "entry_upbit_price": "140123456.12",
            "entry_binance_price": "98012.12345678",
            "entry_spread_pct": "3.1836",
            "timestamp_open": "2025-11-15T03:40:15.123+00:00",
            "mode": None,
        },
    ),
    "position_close": (
        {
            "type": "position_close",
            "event_id": "pc-1",
            "producer": "paper",
            "position_key": "pos_001",
            "exit_upbit_price": "139000000",
            "exit_binance_price": "98100.5",
            "exit_spread_pct": "2.5",
            "pnl_krw": "11234.5",
            "pnl_pct": "0.7863",
            "timestamp_close": "2025-11-15T04:10:00Z",
        },
        {
            "position_key": "pos_001",
            "exit_upbit_price": "139000000",
            "exit_binance_price": "98100.5",
            "exit_spread_pct": "2.5",
            "pnl_krw": "11234.5",
            "pnl_pct": "0.7863",
            "timestamp_close": "2025-11-15T04:10:00+00:00",
            "symbol": None,
            "direction": None,
            "size": None,
            "entry_upbit_price": None,
            "entry_binance_price": None,
            "entry_spread_pct": None,
            "timestamp_open": None,
            "mode": None,
        },
    ),
    "heartbeat": (
        {
            "type": "heartbeat",
            "event_id": "hb-1",
            "producer": "collector",
            "component": "collector",
            "timestamp": "2025-11-15T03:40:15Z",
        },
        {"component": "collector", "timestamp": "2025-11-15T03:40:15+00:00"},
    ),
}

EXPECTED_TIME = {
    "spread": dt.datetime(2025, 11, 15, 3, 40, 15, 123000, tzinfo=UTC),
    "fx_rate": dt.datetime(2025, 11, 15, 3, 40, 15, tzinfo=UTC),
    "order": dt.datetime(2025, 11, 15, 3, 40, 15, 1, tzinfo=UTC),
    "trade": dt.datetime(2025, 11, 15, 9, 10, 15, 500000, tzinfo=UTC),
    "position_open": dt.datetime(2025, 11, 15, 3, 40, 15, 123000, tzinfo=UTC),
    "position_close": dt.datetime(2025, 11, 15, 4, 10, tzinfo=UTC),
    "heartbeat": dt.datetime(2025, 11, 15, 3, 40, 15, tzinfo=UTC),
}

EXPECTED_TABLE = {
    "spread": "spreads",
    "fx_rate": "fx_rates",
    "order": "orders",
    "trade": "trades",
    "position_open": None,
    "position_close": None,
    "heartbeat": None,
}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode(obj: Any, **kwargs: Any) -> events.Event:
    return decoding.decode_event(dumps(obj), max_bytes=MAX, **kwargs)


def reject(payload: bytes | str, *, max_bytes: int = MAX) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(payload, max_bytes=max_bytes)
    return info.value


def reject_obj(obj: Any) -> InvalidEvent:
    return reject(dumps(obj))


def with_(etype: str, **changes: Any) -> dict[str, Any]:
    return {**VALID[etype][0], **changes}


def spread_with_raw(field: str, literal: str) -> bytes:
    """A spread payload whose ``field`` holds a raw JSON literal (number text, NaN, ...)."""
    obj = with_("spread")
    obj[field] = "@@"
    return dumps(obj).replace(b'"@@"', literal.encode())


# --- every event type -----------------------------------------------------------------------


def test_all_seven_types_are_covered() -> None:
    assert set(VALID) == set(events.EVENT_TYPES)
    assert len(VALID) == 7


@pytest.mark.parametrize("etype", sorted(VALID))
def test_valid_payload_gives_exact_postgres_text(etype: str) -> None:
    payload, expected = VALID[etype]
    ev = decode(payload)
    assert ev.type == etype
    assert ev.event_id == payload["event_id"]
    assert ev.producer == payload["producer"]
    assert ev.values == expected
    assert ev.time == EXPECTED_TIME[etype]
    assert ev.time.utcoffset() is not None
    table = ev.spec.table
    assert (table.name if table is not None else None) == EXPECTED_TABLE[etype]


@pytest.mark.parametrize("etype", sorted(VALID))
def test_str_payload_decodes_like_bytes(etype: str) -> None:
    payload, expected = VALID[etype]
    ev = decoding.decode_event(json.dumps(payload), max_bytes=MAX)
    assert ev.values == expected


@pytest.mark.parametrize(
    ("etype", "field"),
    [
        (t, f.name)
        for t, spec in sorted(events.EVENT_TYPES.items())
        for f in spec.fields
        if f.required
    ],
)
def test_missing_required_field_is_rejected_naming_it(etype: str, field: str) -> None:
    obj = with_(etype)
    obj.pop(field, None)
    err = reject_obj(obj)
    assert err.field == field
    assert field in str(err)
    assert "missing" in str(err)
    # null is the same as absent
    err = reject_obj(with_(etype, **{field: None}))
    assert err.field == field


@pytest.mark.parametrize(
    ("etype", "field"),
    [
        (t, f.name)
        for t, spec in sorted(events.EVENT_TYPES.items())
        for f in spec.fields
        if not f.required and f.name != "is_opportunity"
    ],
)
def test_optional_field_may_be_omitted_or_null(etype: str, field: str) -> None:
    obj = with_(etype)
    obj.pop(field, None)
    assert decode(obj).values[field] is None
    assert decode(with_(etype, **{field: None})).values[field] is None


# --- decimals -------------------------------------------------------------------------------


def test_json_number_keeps_every_digit() -> None:
    raw = spread_with_raw("binance_price", "1234567890.12345678")
    assert decoding.decode_event(raw, max_bytes=MAX).values["binance_price"] == (
        "1234567890.12345678"
    )
    # the float reading of that literal would lose digits: prove the test would notice
    assert repr(float("1234567890.12345678")) != "1234567890.12345678"


def test_json_number_does_not_go_through_float_for_rounding() -> None:
    # 1.005 is 1.00499999999999989... as a binary float, which would round to 1.00.
    raw = spread_with_raw("upbit_price", "1.005")
    assert decoding.decode_event(raw, max_bytes=MAX).values["upbit_price"] == "1.01"


def test_decimal_string_keeps_every_digit() -> None:
    ev = decode(with_("spread", binance_price="1234567890.12345678"))
    assert ev.values["binance_price"] == "1234567890.12345678"


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("1.005", tables.Numeric(18, 2), "1.01"),
        ("-1.005", tables.Numeric(18, 2), "-1.01"),
        ("1.004999", tables.Numeric(18, 2), "1.00"),
        ("2.675", tables.Numeric(18, 2), "2.68"),
        ("0.00000000499", tables.PRICE, "0.00000000"),
        ("0.000000005", tables.PRICE, "0.00000001"),
        ("-0.000000015", tables.PRICE, "-0.00000002"),
        ("3.14155", tables.PCT, "3.1416"),
        ("-3.14155", tables.PCT, "-3.1416"),
        ("9999.99994", tables.PCT, "9999.9999"),
        ("9999999999.999999994", tables.PRICE, "9999999999.99999999"),
        ("1.5", tables.PRICE, "1.5"),  # within the scale: sent as is
        ("9999999999.99999999", tables.PRICE, "9999999999.99999999"),
        ("-9999999999", tables.PRICE, "-9999999999"),
        ("0", tables.PRICE, "0"),
    ],
)
def test_rounding_is_half_away_from_zero(value: str, kind: tables.Numeric, expected: str) -> None:
    assert events.numeric_text(value, kind, "f") == expected
    # the same literal as a JSON number
    assert Decimal(events.numeric_text(events.JsonNumber(value), kind, "f")) == Decimal(expected)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("9999999999.999999999", tables.PRICE),  # rounding carries into an 11th integer digit
        ("-9999999999.999999995", tables.PRICE),
        ("9999.99995", tables.PCT),
        ("99999999999", tables.PRICE),
        ("10000000000.1", tables.PRICE),
        ("10000", tables.PCT),
        ("10000000000000000", tables.PRICE_KRW),
    ],
)
def test_value_that_does_not_fit_is_rejected(value: str, kind: tables.Numeric) -> None:
    for v in (value, events.JsonNumber(value)):
        with pytest.raises(InvalidEvent) as info:
            events.numeric_text(v, kind, "amount")
        assert info.value.field == "amount"
        assert f"NUMERIC({kind.precision}, {kind.scale})" in str(info.value)


def test_carry_overflow_rejected_through_decode() -> None:
    err = reject_obj(with_("spread", binance_price="9999999999.999999999"))
    assert err.field == "binance_price"
    assert "does not fit" in str(err)


def test_integer_part_too_large_rejected_through_decode() -> None:
    err = reject_obj(with_("spread", spread_pct="12345.6"))
    assert err.field == "spread_pct"
    assert "does not fit NUMERIC(8, 4)" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "Inf",
        "inf",
        "sNaN",
        "1_000",
        " 1 ",
        "1 ",
        "1e5",
        "1E5",
        "+1",
        "١٢٣",
        "1\n",
        "\n1",
        "1.",
        ".5",
        "",
        "-",
        "0x10",
        "1,5",
        "1.2.3",
        "--1",
        "\uff11\uff12\uff13",
    ],  # fullwidth digits
)
def test_non_strict_decimal_strings_are_rejected_naming_the_field(text: str) -> None:
    err = reject_obj(with_("spread", upbit_price=text))
    assert err.field == "upbit_price"
    assert str(err).startswith("upbit_price: ")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "nan"])
def test_bare_nan_and_infinity_literals_are_rejected(literal: str) -> None:
    err = reject(spread_with_raw("upbit_price", literal))
    assert "not valid JSON" in str(err)


@pytest.mark.parametrize(
    ("literal", "field", "expected"),
    [
        ("1.5e3", "binance_price", "1500.00000000"),
        ("1.5E+3", "upbit_price", "1500.00"),
        ("15e-1", "spread_pct", "1.5000"),
        ("1e-3", "binance_price", "0.00100000"),
        ("-2.5e-9", "binance_price", "-0.00000000"),
        ("1e-400", "binance_price", "0.00000000"),
        ("9999999999", "binance_price", "9999999999"),  # a 10-digit JSON integer fits
        ("-0", "binance_price", "0"),
    ],
)
def test_json_number_exponent_forms_are_exact(literal: str, field: str, expected: str) -> None:
    ev = decoding.decode_event(spread_with_raw(field, literal), max_bytes=MAX)
    assert ev.values[field] == expected


@pytest.mark.parametrize(
    "literal",
    [
        "1e400",
        "-1e400",
        "1e11",
        "12345678901234567890",
        "-12345678901234567890",
        "99999999999999999999",
        "123456789012345678901234567890",
        "10000000000",
    ],
)
def test_json_number_too_large_is_rejected(literal: str) -> None:
    err = reject(spread_with_raw("binance_price", literal))
    assert err.field == "binance_price"
    assert "does not fit" in str(err)


@pytest.mark.parametrize("literal", ["true", "false"])
def test_booleans_are_not_numbers(literal: str) -> None:
    err = reject(spread_with_raw("upbit_price", literal))
    assert err.field == "upbit_price"
    assert "boolean" in str(err)


@pytest.mark.parametrize("literal", ['["1"]', '{"v": "1"}'])
def test_containers_are_not_numbers(literal: str) -> None:
    err = reject(spread_with_raw("upbit_price", literal))
    assert err.field == "upbit_price"


def test_json_number_with_huge_exponent_is_invalid_event_not_a_crash() -> None:
    raw = spread_with_raw("binance_price", "1e1000000000000000000")
    err = reject(raw)
    assert err.field == "binance_price"


@settings(max_examples=300, database=None, deadline=None)
@given(
    st.decimals(
        min_value=Decimal("-10000000000"),
        max_value=Decimal("10000000000"),
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_property_rounding_matches_quantize_half_up(d: Decimal) -> None:
    expected = d.quantize(Decimal("1e-8"), ROUND_HALF_UP)
    fits = abs(expected) < Decimal("10000000000")
    # as a strict decimal string
    text = format(d, "f")
    if fits:
        assert Decimal(events.numeric_text(text, tables.PRICE, "f")) == expected
    else:
        with pytest.raises(InvalidEvent):
            events.numeric_text(text, tables.PRICE, "f")
    # as a JSON number literal (possibly in exponent form), through the real decoder
    literal = str(d)
    payload = (
        '{"type":"fx_rate","pair":"USDKRW","rate":'
        + literal
        + ',"timestamp":"2025-11-15T03:40:15Z"}'
    )
    if fits:
        got = decoding.decode_event(payload, max_bytes=MAX).values["rate"]
        assert got is not None
        assert Decimal(got) == expected
    else:
        with pytest.raises(InvalidEvent):
            decoding.decode_event(payload, max_bytes=MAX)


# --- times ----------------------------------------------------------------------------------


def test_naive_time_is_rejected_saying_so() -> None:
    err = reject_obj(with_("heartbeat", timestamp="2025-11-15T03:40:15"))
    assert err.field == "timestamp"
    assert "no offset" in str(err)
    assert "naive" in str(err)
    err = reject_obj(with_("heartbeat", timestamp="2025-11-15T03:40:15.123"))
    assert "naive" in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "2025-11-15",
        "03:40:15Z",
        "2025-11-15T03:40Z",
        "2025-11-15T03:40:15+0900",
        "2025-11-15T03:40:15 UTC",
        "1731641415",
        "2025-11-15T03:40:15.Z",
        "",
        "2025-11-15T03:40:15Z\n",
        "\uff12\uff10\uff12\uff15-11-15T03:40:15Z",
    ],
)
def test_malformed_times_are_rejected(text: str) -> None:
    err = reject_obj(with_("heartbeat", timestamp=text))
    assert err.field == "timestamp"


def test_time_must_be_a_string() -> None:
    err = reject_obj(with_("heartbeat", timestamp=1731641415))
    assert err.field == "timestamp"


def test_z_and_offset_give_the_same_instant() -> None:
    a = decode(with_("heartbeat", timestamp="2025-11-15T03:40:15.123Z"))
    b = decode(with_("heartbeat", timestamp="2025-11-15T12:40:15.123+09:00"))
    c = decode(with_("heartbeat", timestamp="2025-11-14T22:10:15.123-05:30"))
    assert a.time == b.time == c.time == dt.datetime(2025, 11, 15, 3, 40, 15, 123000, tzinfo=UTC)
    assert events.utc_iso(a.time) == events.utc_iso(b.time) == "2025-11-15T03:40:15.123000Z"
    assert a.values["timestamp"] == "2025-11-15T03:40:15.123+00:00"
    assert b.values["timestamp"] == "2025-11-15T12:40:15.123+09:00"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-11-15T03:40:15.1234565Z", dt.datetime(2025, 11, 15, 3, 40, 15, 123457, tzinfo=UTC)),
        ("2025-11-15T03:40:15.1234564Z", dt.datetime(2025, 11, 15, 3, 40, 15, 123456, tzinfo=UTC)),
        (
            "2025-11-15T03:40:15.123456999Z",
            dt.datetime(2025, 11, 15, 3, 40, 15, 123457, tzinfo=UTC),
        ),
        ("2025-11-15T03:40:59.9999995Z", dt.datetime(2025, 11, 15, 3, 41, 0, tzinfo=UTC)),
        ("2025-11-15T03:40:59.9999994Z", dt.datetime(2025, 11, 15, 3, 40, 59, 999999, tzinfo=UTC)),
        ("2025-12-31T23:59:59.99999951Z", dt.datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)),
        ("2025-11-15T12:40:59.9999995+09:00", dt.datetime(2025, 11, 15, 3, 41, 0, tzinfo=UTC)),
    ],
)
def test_sub_microsecond_digits_round_half_up(text: str, expected: dt.datetime) -> None:
    ev = decode(with_("heartbeat", timestamp=text))
    assert ev.time == expected
    # the text sent to PostgreSQL is the rounded instant, not the original digits
    stamp = ev.values["timestamp"]
    assert stamp is not None
    assert dt.datetime.fromisoformat(stamp) == expected


def test_carry_into_next_second_text() -> None:
    ev = decode(with_("heartbeat", timestamp="2025-11-15T03:40:59.9999995Z"))
    assert ev.values["timestamp"] == "2025-11-15T03:41:00+00:00"


@pytest.mark.parametrize(
    "text",
    [
        "2025-02-30T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-11-31T00:00:00Z",
        "2025-11-15T24:00:00Z",
        "2025-11-15T03:60:00Z",
        "2025-11-15T03:40:60Z",
        "2025-11-15T03:40:15+24:00",
        "0000-01-01T00:00:00Z",
    ],
)
def test_invalid_dates_are_rejected(text: str) -> None:
    err = reject_obj(with_("heartbeat", timestamp=text))
    assert err.field == "timestamp"
    assert "not a valid time" in str(err)


def test_leap_day_accepted() -> None:
    ev = decode(with_("heartbeat", timestamp="2024-02-29T00:00:00Z"))
    assert ev.time == dt.datetime(2024, 2, 29, tzinfo=UTC)


def test_carry_past_year_9999_is_invalid_event_not_a_crash() -> None:
    err = reject_obj(with_("heartbeat", timestamp="9999-12-31T23:59:59.9999995Z"))
    assert err.field == "timestamp"


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_time_outside_utc_range_is_rejected_or_usable(text: str) -> None:
    try:
        ev = decode(with_("heartbeat", timestamp=text))
    except InvalidEvent:
        return
    assert events.utc_iso(ev.time).endswith("Z")


# --- type, envelope, fields -----------------------------------------------------------------


@pytest.mark.parametrize(
    "etype",
    [
        "spreads",
        "Spread",
        "SPREAD",
        "spread ",
        "",
        "spread'; DROP TABLE spreads;--",
        "dead_letters",
        "positions",
    ],
)
def test_unknown_type_is_rejected(etype: str) -> None:
    err = reject_obj(with_("heartbeat", type=etype))
    assert err.field == "type"
    assert "unknown event type" in str(err)
    assert "heartbeat" in str(err)  # the message lists the known types


def test_sql_in_type_is_rejected_and_quoted() -> None:
    err = reject_obj(with_("spread", type="spread'; DROP TABLE spreads;--"))
    assert err.field == "type"
    assert "unknown event type" in err.reason


@pytest.mark.parametrize("value", [None, 1, True, ["spread"], {"t": "spread"}])
def test_type_missing_or_not_a_string(value: Any) -> None:
    obj = with_("heartbeat", type=value)
    if value is None:
        del obj["type"]
    err = reject_obj(obj)
    assert err.field == "type"
    assert "missing or not a string" in str(err)


@pytest.mark.parametrize("field", ["extra", "id", "created_at", "status", "position_id"])
def test_unknown_field_is_rejected(field: str) -> None:
    err = reject_obj(with_("heartbeat", **{field: "x"}))
    assert err.field == field
    assert "unknown field" in str(err)


def test_field_of_another_type_is_unknown() -> None:
    err = reject_obj(with_("heartbeat", symbol="BTC"))
    assert err.field == "symbol"


def test_event_id_length_limit() -> None:
    assert decode(with_("heartbeat", event_id="e" * 100)).event_id == "e" * 100
    err = reject_obj(with_("heartbeat", event_id="e" * 101))
    assert err.field == "event_id"
    assert "100" in str(err)


@pytest.mark.parametrize("value", ["", 42, True, ["a"]])
def test_event_id_must_be_a_non_empty_string(value: Any) -> None:
    err = reject_obj(with_("heartbeat", event_id=value))
    assert err.field == "event_id"


def test_missing_event_id_gets_the_default() -> None:
    obj = with_("heartbeat")
    del obj["event_id"]
    assert decode(obj, default_event_id="stream:1700000000000-0").event_id == (
        "stream:1700000000000-0"
    )
    assert decode(with_("heartbeat", event_id=None), default_event_id="d-1").event_id == "d-1"
    # a present event_id wins over the default
    assert decode(with_("heartbeat"), default_event_id="d-1").event_id == "hb-1"


def test_missing_event_id_without_default_is_derived_from_the_content() -> None:
    obj = with_("heartbeat")
    del obj["event_id"]
    a, b = decode(obj).event_id, decode(obj).event_id
    assert a.startswith("local:") and len(a) <= 100
    assert a == b  # the same event again (a retry) is the same event: it lands once
    other = decode({**obj, "timestamp": "2025-11-15T03:40:16Z"}).event_id
    assert other != a


def test_producer_is_optional_and_limited() -> None:
    obj = with_("heartbeat")
    del obj["producer"]
    assert decode(obj).producer is None
    assert decode(with_("heartbeat", producer="p" * 50)).producer == "p" * 50
    err = reject_obj(with_("heartbeat", producer="p" * 51))
    assert err.field == "producer"


def test_varchar_length_limit_names_the_field() -> None:
    assert decode(with_("spread", symbol="A" * 10)).values["symbol"] == "A" * 10
    err = reject_obj(with_("spread", symbol="A" * 11))
    assert err.field == "symbol"
    assert "longer than 10" in str(err)


@pytest.mark.parametrize("value", [1, 1.5, True, ["BTC"], ""])
def test_varchar_must_be_a_non_empty_string(value: Any) -> None:
    err = reject_obj(with_("spread", symbol=value))
    assert err.field == "symbol"


@pytest.mark.parametrize("field", ["component", "event_id", "producer"])
def test_strings_with_nul_are_rejected(field: str) -> None:
    err = reject_obj(with_("heartbeat", **{field: "a\x00b"}))
    assert err.field == field
    assert "NUL" in str(err)


def test_is_opportunity_defaults_to_false() -> None:
    obj = with_("spread")
    del obj["is_opportunity"]
    assert decode(obj).values["is_opportunity"] == "false"
    assert decode(with_("spread", is_opportunity=None)).values["is_opportunity"] == "false"
    assert decode(with_("spread", is_opportunity=False)).values["is_opportunity"] == "false"
    assert decode(with_("spread", is_opportunity=True)).values["is_opportunity"] == "true"


@pytest.mark.parametrize("value", ["true", 1, 0, "false"])
def test_is_opportunity_must_be_a_json_boolean(value: Any) -> None:
    err = reject_obj(with_("spread", is_opportunity=value))
    assert err.field == "is_opportunity"


def test_position_close_may_repeat_entry_columns() -> None:
    ev = decode(
        with_(
            "position_close",
            symbol="BTC",
            size="0.5",
            entry_spread_pct="3.20005",
            timestamp_open="2025-11-15T03:40:15Z",
        )
    )
    assert ev.values["symbol"] == "BTC"
    assert ev.values["entry_spread_pct"] == "3.2001"
    assert ev.values["timestamp_open"] == "2025-11-15T03:40:15+00:00"
    assert ev.time == dt.datetime(2025, 11, 15, 4, 10, tzinfo=UTC)  # the close time


def test_position_events_do_not_accept_status() -> None:
    err = reject_obj(with_("position_open", status="OPEN"))
    assert err.field == "status"


# --- payload-level rejections ---------------------------------------------------------------


def test_oversize_payload_rejected_before_parsing() -> None:
    err = reject(b"x" * 101, max_bytes=100)  # not JSON either: the size check comes first
    assert "101 bytes" in str(err)
    assert "max_event_bytes=100" in str(err)
    assert err.field is None


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    raw = dumps(VALID["heartbeat"][0])
    assert decoding.decode_event(raw, max_bytes=len(raw)).type == "heartbeat"
    err = reject(raw, max_bytes=len(raw) - 1)
    assert "larger than max_event_bytes" in str(err)


def test_oversize_str_payload_measured_in_bytes() -> None:
    text = json.dumps(with_("heartbeat", component="한" * 50), ensure_ascii=False)
    assert len(text.encode()) > len(text) + 90
    err = reject(text, max_bytes=len(text))
    assert "larger than max_event_bytes" in str(err)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{",
        b'{"type": "spread",}',
        b"\xff\xfe",
        b"{'a': 1}",
        b'{"a": 1} trailing',
        b"\xef\xbb\xbf{}",
    ],
)
def test_not_json_is_rejected(payload: bytes) -> None:
    err = reject(payload)
    assert "not valid JSON" in str(err)


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"spread"', b"1", b"null", b"true", b"1.5"])
def test_json_that_is_not_an_object_is_rejected(payload: bytes) -> None:
    err = reject(payload)
    assert "must be a JSON object" in str(err)


def test_lone_surrogate_escape_is_rejected() -> None:
    raw = dumps(with_("heartbeat", component="@@")).replace(b"@@", b"\\ud800")
    assert b'"component": "\\ud800"' in raw
    reject(raw)


@pytest.mark.parametrize("raw", [b"\\ud800", b"\\udfff", b"x\\udc00y", b"\\ud83dA"])
def test_lone_surrogates_anywhere_are_rejected(raw: bytes) -> None:
    payload = (
        b'{"type":"heartbeat","event_id":"e1","component":"'
        + raw
        + b'","timestamp":"2025-11-15T03:40:15Z"}'
    )
    reject(payload)


def test_encoded_surrogate_bytes_are_rejected() -> None:
    # CESU-8 style bytes for U+D800 are not valid UTF-8
    payload = b'{"type":"heartbeat","component":"\xed\xa0\x80","timestamp":"2025-11-15T03:40:15Z"}'
    reject(payload)


def test_surrogate_pair_escape_is_a_valid_character() -> None:
    payload = (
        b'{"type":"heartbeat","component":"\\ud83d\\ude00","timestamp":"2025-11-15T03:40:15Z"}'
    )
    assert decoding.decode_event(payload, max_bytes=MAX).values["component"] == "\U0001f600"


# --- normalize: events from in-process producers --------------------------------------------


def test_normalize_accepts_decimal_and_aware_datetime() -> None:
    moment = dt.datetime(2025, 11, 15, 12, 40, 15, 123000, tzinfo=KST)
    ev = events.normalize(
        {
            "type": "fx_rate",
            "event_id": "fx-9",
            "pair": "USDKRW",
            "rate": Decimal("1385.123456785"),
            "timestamp": moment,
        }
    )
    assert ev.values["rate"] == "1385.12345679"
    assert ev.time == moment
    assert ev.values["timestamp"] == "2025-11-15T12:40:15.123000+09:00"


@pytest.mark.parametrize(
    ("value", "kind_field", "expected"),
    [
        (0.1, "rate", "0.10000000"),
        (1.005, "upbit_price", "1.01"),  # repr "1.005", not the binary 1.00499999...
        (98012.12345678, "binance_price", "98012.12345678"),
        (2, "rate", "2"),
        (Decimal("1E+3"), "rate", "1000.00000000"),
        (Decimal("-0.000000005"), "rate", "-0.00000001"),
    ],
)
def test_normalize_numbers(value: Any, kind_field: str, expected: str) -> None:
    if kind_field == "rate":
        obj: dict[str, Any] = {
            "type": "fx_rate",
            "pair": "USDKRW",
            "rate": value,
            "timestamp": dt.datetime(2025, 11, 15, tzinfo=UTC),
        }
    else:
        obj = {**VALID["spread"][0], kind_field: value}
    got = events.normalize(obj).values[kind_field]
    assert got == expected
    if isinstance(value, float):
        assert Decimal(got) == Decimal(repr(value)).quantize(Decimal(got), ROUND_HALF_UP)


def test_normalize_float_is_read_via_repr() -> None:
    obj = {**VALID["fx_rate"][0], "rate": 0.1}
    rate = events.normalize(obj).values["rate"]
    assert rate is not None
    assert Decimal(rate) == Decimal("0.1")
    assert Decimal.from_float(0.1) != Decimal("0.1")  # the binary value differs


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("sNaN"),
        1e300,
        True,
        b"1",
        [1],
    ],
)
def test_normalize_rejects_bad_numbers(value: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        events.normalize({**VALID["fx_rate"][0], "rate": value})
    assert info.value.field == "rate"


def test_normalize_rejects_naive_datetime() -> None:
    with pytest.raises(InvalidEvent) as info:
        events.normalize({**VALID["heartbeat"][0], "timestamp": dt.datetime(2025, 11, 15)})  # noqa: DTZ001
    assert info.value.field == "timestamp"
    assert "naive" in str(info.value)


def test_normalize_rejects_lone_surrogate_strings() -> None:
    with pytest.raises(InvalidEvent) as info:
        events.normalize({**VALID["heartbeat"][0], "component": "x\ud800"})
    assert info.value.field == "component"
    assert "surrogate" in str(info.value)


def test_normalize_accepts_rfc3339_strings_too() -> None:
    ev = events.normalize(VALID["spread"][0])
    assert ev.values == VALID["spread"][1]


def test_normalize_rejects_non_mapping_and_unknown_type() -> None:
    with pytest.raises(InvalidEvent):
        events.normalize({"type": "nope"})
    with pytest.raises(InvalidEvent):
        events.parse_event([("type", "heartbeat")])


# --- publisher round trip -------------------------------------------------------------------


def test_publisher_encoding_round_trips_exactly() -> None:
    ids = publisher._Ids("unit")
    moment = dt.datetime(2025, 11, 15, 12, 40, 15, 123456, tzinfo=KST)
    raw = publisher.encode(
        {
            "type": "spread",
            "producer": "collector",
            "symbol": "BTC",
            "upbit_price": Decimal("140123456.12"),
            "binance_price": Decimal("1234567890.12345678"),
            "binance_price_krw": Decimal("135800000.55"),
            "spread_pct": Decimal("3.1836"),
            "net_spread_pct": Decimal("2.9836"),
            "is_opportunity": False,
            "timestamp": moment,
        },
        ids,
    )
    ev = decoding.decode_event(raw, max_bytes=MAX)
    assert ev.event_id == "unit-1"
    assert ev.values["binance_price"] == "1234567890.12345678"
    assert ev.values["is_opportunity"] == "false"
    assert ev.time == moment


def test_publisher_refuses_naive_datetime_and_nan() -> None:
    ids = publisher._Ids("unit")
    with pytest.raises(TypeError):
        publisher.encode({"type": "heartbeat", "timestamp": dt.datetime(2025, 1, 1)}, ids)  # noqa: DTZ001
    with pytest.raises(TypeError):
        publisher.encode({"type": "fx_rate", "rate": Decimal("NaN")}, ids)


# --- utc_iso --------------------------------------------------------------------------------


def test_utc_iso_is_fixed_width_z() -> None:
    assert events.utc_iso(dt.datetime(2025, 11, 15, 12, 40, 15, tzinfo=KST)) == (
        "2025-11-15T03:40:15.000000Z"
    )
    assert events.utc_iso(dt.datetime(2025, 11, 15, 3, 40, 15, 5, tzinfo=UTC)) == (
        "2025-11-15T03:40:15.000005Z"
    )


def test_utc_iso_sorts_like_the_times() -> None:
    moments = [
        dt.datetime(2025, 11, 15, 3, 40, 15, tzinfo=UTC),
        dt.datetime(2025, 11, 15, 3, 40, 15, 1, tzinfo=UTC),
        dt.datetime(2025, 11, 15, 12, 40, 14, 999999, tzinfo=KST),
        dt.datetime(2025, 11, 14, 23, 0, 0, tzinfo=dt.timezone(-dt.timedelta(hours=5))),
        dt.datetime(2025, 11, 15, 3, 40, 15, 100000, tzinfo=UTC),
        dt.datetime(1000, 1, 1, tzinfo=UTC),
        dt.datetime(2025, 1, 1, tzinfo=UTC),
    ]
    texts = [events.utc_iso(m) for m in moments]
    assert {len(t) for t in texts} == {27}
    assert all(t.endswith("Z") for t in texts)
    assert sorted(texts) == [events.utc_iso(m) for m in sorted(moments)]


def test_utc_iso_pads_years_below_1000() -> None:
    ev = decode(with_("heartbeat", timestamp="0999-01-01T00:00:00Z"))
    assert events.utc_iso(ev.time) == "0999-01-01T00:00:00.000000Z"


@settings(max_examples=300, database=None, deadline=None)
@given(
    st.datetimes(
        min_value=dt.datetime(1000, 1, 2),  # noqa: DTZ001 - hypothesis bounds are naive
        max_value=dt.datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from([UTC, KST, dt.timezone(-dt.timedelta(hours=5, minutes=30))]),
    ),
    st.datetimes(
        min_value=dt.datetime(1000, 1, 2),  # noqa: DTZ001
        max_value=dt.datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
)
def test_property_utc_iso_orders_like_time(a: dt.datetime, b: dt.datetime) -> None:
    sa, sb = events.utc_iso(a), events.utc_iso(b)
    assert len(sa) == len(sb) == 27
    assert (sa < sb) == (a < b)
    assert (sa == sb) == (a == b)
    assert dt.datetime.fromisoformat(sa) == a


def test_decimal_module_default_context_untouched() -> None:
    # numeric_text rounds under its own context: no flags or precision leak into the caller's
    ctx = decimal.getcontext()
    ctx.clear_flags()
    before = ctx.prec
    with pytest.raises(InvalidEvent):
        events.numeric_text("9999999999.999999999", tables.PRICE, "f")
    assert events.numeric_text("1.000000005", tables.PRICE, "f") == "1.00000001"
    assert ctx.prec == before
    assert not ctx.flags[decimal.InvalidOperation]
    assert not ctx.flags[decimal.Inexact]


def test_a_bug_in_validation_becomes_a_dead_letter_reason_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(obj: object, *, default_event_id: str | None = None) -> events.Event:
        raise IndexError("a bug")

    monkeypatch.setattr(events, "parse_event", broken)
    with pytest.raises(InvalidEvent, match="internal error while validating the event: IndexError"):
        decoding.decode_event(b'{"type": "heartbeat"}', max_bytes=1000)
    with pytest.raises(InvalidEvent, match="internal error"):
        events.normalize({"type": "heartbeat"})


@pytest.mark.parametrize("component", ["ingestd", "ingestd:replica-1"])
def test_producers_cannot_send_ingestds_own_heartbeat(component: str) -> None:
    err = reject_obj(with_("heartbeat", component=component))
    assert err.field == "component" and "reserved" in err.reason
    assert decode(with_("heartbeat", component="ingestd-like")).values["component"]


def test_a_validation_bug_logs_its_traceback_once_not_per_event(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(obj: object, *, default_event_id: str | None = None) -> events.Event:
        raise KeyError("the same bug every time")

    monkeypatch.setattr(events, "parse_event", broken)
    monkeypatch.setattr(events, "_BUGS_LOGGED", set())
    caplog.set_level(logging.WARNING, logger="ingestd.wire.events")
    for _ in range(50):  # a producer that keeps sending the payload that trips it
        with pytest.raises(InvalidEvent, match="internal error"):
            decoding.decode_event(b'{"type": "heartbeat"}', max_bytes=1000)
    bug_lines = [r for r in caplog.records if r.name == "ingestd.wire.events"]
    assert len([r for r in bug_lines if r.exc_info]) == 1
    # Every occurrence is still logged, without the traceback after the first.
    assert len(bug_lines) == 50
