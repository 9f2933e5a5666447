"""Producer models: ``Position``, ``OrderLeg``, ``SpreadOpportunity``, ``FxRate``, ``Trade``.

Each is a frozen dataclass named by the tables' columns, with exact ``Decimal`` amounts and aware
``datetime`` times. Construction validates through ``ingestd.wire.events``, so the rules are those
of
the wire format: a bad value raises ``InvalidEvent`` naming the field, and every value is kept as
the database will store it (rounded to its column's scale), so that a model, its CSV row and its
database row agree digit for digit. A ``float`` is read through its shortest ``repr`` (``1350.0``
stays ``1350.0``, ``5e-05`` is ``0.00005``), never through its binary value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ingestd.errors import InvalidEvent
from ingestd.wire import events, tables

D = decimal.Decimal


def wire_value(value: object) -> object:
    """A Python value as the wire format writes it: decimals as exact text, times in RFC 3339."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, D):
        # Text, not the Decimal: a value within the column's scale then keeps its exact digits.
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return value  # events.numeric_text refuses NaN and infinities, naming the field
        # The shortest repr is the number its author wrote; repr may use an exponent (5e-05,
        # 1e-08, 1e+16), which the wire's decimal text has not: write it out, digit for digit.
        return format(D(repr(value)), "f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            return value  # events.time_value rejects it, naming the field
        return value.isoformat()
    return value


def _python_value(text: str | None, kind: tables.ColumnType) -> Any:
    if text is None:
        return None
    if isinstance(kind, tables.Numeric):
        return D(text)
    if isinstance(kind, tables.Timestamptz):
        return dt.datetime.fromisoformat(text)
    if isinstance(kind, tables.Boolean):
        return text == "true"
    return text


class _Model:
    """Shared behaviour: validate on construction, convert to and from wire events."""

    __slots__ = ()
    EVENT_TYPE: ClassVar[str]

    def _event_type(self) -> str:
        return self.EVENT_TYPE

    def __post_init__(self) -> None:
        ev = events.parse_event(self._wire(self._event_type()))
        self._adopt(ev)

    def _adopt(self, ev: events.Event) -> None:
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for field in ev.spec.fields:
            if field.name in names:
                object.__setattr__(
                    self, field.name, _python_value(ev.values[field.name], field.kind)
                )

    def _wire(self, event_type: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"type": event_type}
        for field in events.EVENT_TYPES[event_type].fields:
            value = wire_value(getattr(self, field.name))
            if value is not None:
                obj[field.name] = value
        return obj

    def to_event(
        self, *, event_id: str | None = None, producer: str | None = None
    ) -> dict[str, Any]:
        """The wire event (JSON-ready: decimals as strings, RFC 3339 times)."""
        return _envelope(self._wire(self._event_type()), event_id, producer)

    @classmethod
    def from_event(cls, event: Mapping[str, Any] | bytes | str) -> Self:
        """Build from a wire event (a JSON document or a decoded mapping), validating it."""
        obj = events.decode_json(event) if isinstance(event, bytes | str) else event
        return cls.from_validated(events.parse_event(obj))

    @classmethod
    def from_validated(cls, ev: events.Event) -> Self:
        """Build from an already validated ``events.Event`` of the matching type."""
        if ev.type not in cls._accepted_types():
            raise InvalidEvent(
                f"a {ev.type} event is not a {cls.__name__} "
                f"(expected {' or '.join(cls._accepted_types())})",
                field="type",
            )
        return cls(**cls._kwargs(ev))

    @classmethod
    def _kwargs(cls, ev: events.Event) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return {
            f.name: _python_value(ev.values[f.name], f.kind)
            for f in ev.spec.fields
            if f.name in names and ev.values[f.name] is not None
        }

    @classmethod
    def _accepted_types(cls) -> tuple[str, ...]:
        return (cls.EVENT_TYPE,)


def _envelope(obj: dict[str, Any], event_id: str | None, producer: str | None) -> dict[str, Any]:
    if event_id is not None:
        obj["event_id"] = event_id
    if producer is not None:
        obj["producer"] = producer
    return obj


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SpreadOpportunity(_Model):
    """One spread snapshot (table ``spreads``)."""

    EVENT_TYPE: ClassVar[str] = "spread"

    symbol: str
    upbit_price: D
    binance_price: D
    binance_price_krw: D
    spread_pct: D
    net_spread_pct: D
    is_opportunity: bool = False
    timestamp: dt.datetime
    # When the two prices and the FX rate were taken (optional): ingestd flags the spread as
    # stale when they are too far apart or the rate too old.
    upbit_ts: dt.datetime | None = None
    binance_ts: dt.datetime | None = None
    fx_ts: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FxRate(_Model):
    """One FX rate (table ``fx_rates``), e.g. ``USDKRW``."""

    EVENT_TYPE: ClassVar[str] = "fx_rate"

    pair: str
    rate: D
    source: str | None = None
    timestamp: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderLeg(_Model):
    """One order leg with theoretical and effective price (table ``orders``)."""

    EVENT_TYPE: ClassVar[str] = "order"

    position_key: str | None = None
    symbol: str
    venue: str
    side: str
    qty: D
    price_theoretical: D
    price_effective: D | None = None
    slippage_bps: D | None = None
    leg_id: str
    order_id: str | None = None
    timestamp: dt.datetime
    mode: str | None = None  # "paper" or "live"; absent: the producer's name if it is one


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Trade(_Model):
    """One fill, OPEN or CLOSE side of a position (table ``trades``)."""

    EVENT_TYPE: ClassVar[str] = "trade"

    position_key: str | None = None
    symbol: str
    direction: str
    size: D
    side: str
    price_upbit: D | None = None
    price_binance: D | None = None
    pnl_krw: D | None = None
    pnl_pct: D | None = None
    timestamp: dt.datetime
    mode: str | None = None  # "paper" or "live"; absent: the producer's name if it is one


OPEN = "OPEN"
CLOSED = "CLOSED"
_EXIT_FIELDS = tuple(name for name, _ in tables.POSITION_EXIT_COLUMNS)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Position(_Model):
    """A position, OPEN or CLOSED, named by the producer's ``position_key`` (table ``positions``).

    Its wire events are ``position_open`` (entry columns) and ``position_close`` (exit columns,
    repeating the entry columns so that a close that arrives first can still write the row).
    """

    EVENT_TYPE: ClassVar[str] = "position_open"

    position_key: str
    symbol: str
    direction: str
    size: D
    entry_upbit_price: D
    entry_binance_price: D
    entry_spread_pct: D
    exit_upbit_price: D | None = None
    exit_binance_price: D | None = None
    exit_spread_pct: D | None = None
    pnl_krw: D | None = None
    pnl_pct: D | None = None
    status: str = OPEN
    timestamp_open: dt.datetime
    timestamp_close: dt.datetime | None = None
    mode: str | None = None  # "paper" or "live"; absent: the producer's name if it is one

    def _event_type(self) -> str:
        if self.status == CLOSED:
            return "position_close"
        if self.status != OPEN:
            raise InvalidEvent(f"must be OPEN or CLOSED, got {self.status!r}", field="status")
        for name in _EXIT_FIELDS:
            if getattr(self, name) is not None:
                raise InvalidEvent("set on an OPEN position (close it with .close())", field=name)
        return "position_open"

    def __post_init__(self) -> None:
        event_type = self._event_type()
        ev = events.parse_event(self._wire(event_type))
        self._adopt(ev)
        if event_type == "position_close":
            # A close event carries the entry columns only optionally: check them as an open.
            self._adopt(events.parse_event(self._wire("position_open")))

    @classmethod
    def _accepted_types(cls) -> tuple[str, ...]:
        return ("position_open", "position_close")

    @classmethod
    def from_validated(cls, ev: events.Event) -> Self:
        """From a ``position_open`` (OPEN) or a ``position_close`` with entry columns (CLOSED)."""
        if ev.type == "position_close":
            missing = [n for n, _ in tables.POSITION_ENTRY_COLUMNS if ev.values.get(n) is None]
            if missing:
                raise InvalidEvent(
                    "a position_close without the entry columns is not a whole Position",
                    field=missing[0],
                )
        if ev.type not in cls._accepted_types():
            raise InvalidEvent(f"a {ev.type} event is not a Position", field="type")
        kwargs = cls._kwargs(ev)
        kwargs["status"] = CLOSED if ev.type == "position_close" else OPEN
        return cls(**kwargs)

    def close(
        self,
        *,
        exit_upbit_price: D,
        exit_binance_price: D,
        exit_spread_pct: D,
        pnl_krw: D,
        pnl_pct: D,
        timestamp_close: dt.datetime,
    ) -> Position:
        """This position, CLOSED with the given exit columns."""
        return dataclasses.replace(
            self,
            exit_upbit_price=exit_upbit_price,
            exit_binance_price=exit_binance_price,
            exit_spread_pct=exit_spread_pct,
            pnl_krw=pnl_krw,
            pnl_pct=pnl_pct,
            timestamp_close=timestamp_close,
            status=CLOSED,
        )

    def open_event(
        self, *, event_id: str | None = None, producer: str | None = None
    ) -> dict[str, Any]:
        """The ``position_open`` wire event (also of a CLOSED position: its entry columns)."""
        return _envelope(self._wire("position_open"), event_id, producer)

    def close_event(
        self, *, event_id: str | None = None, producer: str | None = None
    ) -> dict[str, Any]:
        """The ``position_close`` wire event with the entry columns (of a CLOSED position)."""
        if self.status != CLOSED:
            raise InvalidEvent("log_position_close needs a CLOSED position", field="status")
        return _envelope(self._wire("position_close"), event_id, producer)


Model = SpreadOpportunity | FxRate | OrderLeg | Trade | Position
