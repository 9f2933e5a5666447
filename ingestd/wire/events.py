"""The wire format (docs/events.md): decoding JSON exactly and validating it into typed events.

Decimals never pass through a binary float: JSON numbers are kept as their literal text
(``JsonNumber``), decimal strings must match a strict pattern, and each value is checked against
its column's NUMERIC(p, s) and rounded exactly as PostgreSQL rounds (half away from zero). The
validated text goes to PostgreSQL as is, so the common case never builds a ``Decimal`` at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ingestd.errors import InvalidEvent
from ingestd.wire import keys, tables

if TYPE_CHECKING:
    from ingestd.settings import RetentionSettings, Settings

log = logging.getLogger("ingestd.wire.events")


class JsonNumber(str):
    """The literal text of a JSON number (msgspec's ``float_hook`` hands it over untouched)."""

    __slots__ = ()


_DECODER: Final = msgspec.json.Decoder(float_hook=JsonNumber)

# How deeply arrays and objects may nest in an event (``pipeline.max_event_depth``). A valid event
# is one flat object (depth 1); the bound is there so that hostile input is refused with a reason
# instead of exhausting the interpreter's stack in the decoder, the validator or a dead letter.
DEFAULT_MAX_DEPTH: Final = 32


def decode_json(payload: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode one JSON document; numbers with a fraction or exponent stay exact text."""
    try:
        obj = _DECODER.decode(payload)
    except RecursionError:
        # msgspec recurses once per level: far past max_depth anyway.
        raise _too_deep(max_depth) from None
    except msgspec.DecodeError as exc:
        if str(exc).startswith("Integer value out of range"):
            # Valid JSON whose integer does not fit 64 bits: read it again keeping every digit,
            # so that the field's own rule words the refusal (out of range, or not a string).
            obj = _decode_big_integers(payload, max_depth)
        else:
            raise InvalidEvent(f"not valid JSON: {exc}") from None
    check_depth(obj, max_depth)
    return obj


def _decode_big_integers(payload: bytes | str, max_depth: int) -> Any:
    """The document with integers as exact text (``JsonNumber``); InvalidEvent if not JSON.

    Only for documents that msgspec refused for an integer beyond 64 bits (rare: such a number
    fits no column), so the standard library's slower decoder is fine here. It recurses per level
    like msgspec, and like it stops with RecursionError far past ``max_depth``.
    """

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(
            payload,
            parse_int=JsonNumber,
            parse_float=JsonNumber,
            parse_constant=no_constants,
        )
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None


def check_depth(obj: object, max_depth: int) -> None:
    """Refuse ``obj`` if lists/dicts nest in it deeper than ``max_depth`` (the event is level 1).

    Iterative, and it stops at the limit: a cyclic in-process structure ends here as well.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    if type(obj) is dict:
        # The usual event, one flat object, in a few type lookups (isinstance against the
        # Mapping ABC costs microseconds per value, and this runs for every in-process event).
        for value in obj.values():
            if type(value) not in _SCALAR_TYPES:
                break
        else:
            return
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > max_depth:
            raise _too_deep(max_depth)
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, Mapping | list | tuple)
        )


_SCALAR_TYPES: Final = frozenset(
    {str, int, float, bool, type(None), JsonNumber, decimal.Decimal, dt.datetime}
)


def _too_deep(max_depth: int) -> InvalidEvent:
    return InvalidEvent(
        f"arrays or objects nested deeper than {max_depth} levels (max_event_depth)"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One field of an event type: its column type and whether it must be present."""

    name: str
    kind: tables.ColumnType
    required: bool = True


def _opt(name: str, kind: tables.ColumnType) -> Field:
    return Field(name, kind, required=False)


def _fields(columns: tuple[tuple[str, tables.ColumnType], ...], *, required: bool) -> list[Field]:
    return [Field(name, kind, required) for name, kind in columns]


@dataclasses.dataclass(frozen=True, slots=True)
class EventType:
    """What an event type carries and which field is its event time."""

    name: str
    fields: tuple[Field, ...]
    time_field: str
    table: tables.Table | None = None

    @property
    def field_names(self) -> frozenset[str]:
        """Names of the fields this type accepts (besides type/event_id/producer)."""
        return frozenset(f.name for f in self.fields)


EVENT_TYPES: Final[dict[str, EventType]] = {
    "spread": EventType(
        "spread",
        (
            Field("symbol", tables.Varchar(10)),
            Field("upbit_price", tables.PRICE_KRW),
            Field("binance_price", tables.PRICE),
            Field("binance_price_krw", tables.PRICE_KRW),
            Field("spread_pct", tables.PCT),
            Field("net_spread_pct", tables.PCT),
            _opt("is_opportunity", tables.BOOL),
            Field("timestamp", tables.TIME),
            _opt("upbit_ts", tables.TIME),
            _opt("binance_ts", tables.TIME),
            _opt("fx_ts", tables.TIME),
        ),
        "timestamp",
        tables.SPREADS,
    ),
    "fx_rate": EventType(
        "fx_rate",
        (
            Field("pair", tables.Varchar(20)),
            Field("rate", tables.PRICE),
            _opt("source", tables.Varchar(50)),
            Field("timestamp", tables.TIME),
        ),
        "timestamp",
        tables.FX_RATES,
    ),
    "order": EventType(
        "order",
        (
            _opt("position_key", tables.POSITION_KEY),
            Field("symbol", tables.Varchar(10)),
            Field("venue", tables.Varchar(50)),
            Field("side", tables.Varchar(20)),
            Field("qty", tables.PRICE),
            Field("price_theoretical", tables.PRICE),
            _opt("price_effective", tables.PRICE),
            _opt("slippage_bps", tables.BPS),
            Field("leg_id", tables.Varchar(100)),
            _opt("order_id", tables.Varchar(100)),
            Field("timestamp", tables.TIME),
            _opt("mode", tables.MODE),
        ),
        "timestamp",
        tables.ORDERS,
    ),
    "trade": EventType(
        "trade",
        (
            _opt("position_key", tables.POSITION_KEY),
            Field("symbol", tables.Varchar(10)),
            Field("direction", tables.Varchar(50)),
            Field("size", tables.PRICE),
            Field("side", tables.Varchar(20)),
            _opt("price_upbit", tables.PRICE_KRW),
            _opt("price_binance", tables.PRICE),
            _opt("pnl_krw", tables.PRICE_KRW),
            _opt("pnl_pct", tables.PCT),
            Field("timestamp", tables.TIME),
            _opt("mode", tables.MODE),
        ),
        "timestamp",
        tables.TRADES,
    ),
    "position_open": EventType(
        "position_open",
        (
            Field("position_key", tables.POSITION_KEY),
            *_fields(tables.POSITION_ENTRY_COLUMNS, required=True),
            _opt("mode", tables.MODE),
        ),
        "timestamp_open",
    ),
    "position_close": EventType(
        "position_close",
        (
            Field("position_key", tables.POSITION_KEY),
            *_fields(tables.POSITION_EXIT_COLUMNS, required=True),
            *_fields(tables.POSITION_ENTRY_COLUMNS, required=False),
            _opt("mode", tables.MODE),
        ),
        "timestamp_close",
    ),
    "heartbeat": EventType(
        "heartbeat",
        (Field("component", tables.Varchar(50)), Field("timestamp", tables.TIME)),
        "timestamp",
    ),
}

ENVELOPE_FIELDS: Final = frozenset({"type", "event_id", "producer", "seq", "session"})
# A producer's optional counter within one run of it (seq, stored as BIGINT) and that run's name:
# ingestd records the gaps in each (producer, session)'s seqs (ingestd.daemon.gaps).
MAX_SEQ: Final = 2**63 - 1
SESSION_LEN: Final = 50


@dataclasses.dataclass(slots=True)
class Event:
    """A validated event: every value is PostgreSQL-ready text (or None), the time is aware."""

    type: str
    event_id: str
    producer: str | None
    time: dt.datetime
    values: dict[str, str | None]
    # The append-only table it goes to (None for positions and heartbeats): looked up once here
    # rather than per event in the batcher, the sink and the mirror.
    table: tables.Table | None = None
    seq: int | None = None
    session: str | None = None

    @property
    def spec(self) -> EventType:
        """The event's type description."""
        return EVENT_TYPES[self.type]


# --- value validation --------------------------------------------------------------------------

# [0-9] rather than \d (which matches non-ASCII digits) and \Z rather than $ (which matches before a
# trailing newline): either would let through text PostgreSQL refuses.
_DECIMAL_TEXT: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?\Z")
_JSON_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?\Z")
_RFC3339: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})\Z"
)


RFC3339_COMMON_PATTERN: Final = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})\Z"
)
_RFC3339_COMMON: Final = re.compile(RFC3339_COMMON_PATTERN).match


def numeric_text(value: object, kind: tables.Numeric, field: str) -> str:
    """Exact text for NUMERIC(p, s), rounded half away from zero; out of range is an error."""
    if isinstance(value, str):
        m = _DECIMAL_TEXT.match(value)
        if m is not None:
            int_part, frac = m.group(2), m.group(3)
            if frac is None or len(frac) <= kind.scale:
                if len(int_part.lstrip("0")) > kind.precision - kind.scale:
                    raise _out_of_range(value, kind, field)
                return value
            return _round_numeric(decimal.Decimal(value), kind, field, value)
        if type(value) is JsonNumber and _JSON_NUMBER.match(value):
            return _round_numeric(_json_decimal(value, kind, field), kind, field, value)
        raise InvalidEvent(f"{value[:40]!r} is not a decimal number", field=field)
    if isinstance(value, bool):
        raise InvalidEvent("a boolean is not a number", field=field)
    if isinstance(value, int):
        if len(str(abs(value))) > kind.precision - kind.scale:
            raise _out_of_range(str(value), kind, field)
        return str(value)
    if isinstance(value, decimal.Decimal):
        return _round_numeric(value, kind, field, str(value))
    if isinstance(value, float):
        # A float from in-process code: its shortest repr is the number its author wrote.
        return _round_numeric(decimal.Decimal(repr(value)), kind, field, repr(value))
    raise InvalidEvent(
        f"expected a decimal string or number, got {type(value).__name__}", field=field
    )


def _json_decimal(text: str, kind: tables.Numeric, field: str) -> decimal.Decimal:
    # Decimal() refuses an exponent beyond its own limits (``1e1000000000000000000``): such a
    # number fits no NUMERIC column, so it is out of range, not a crash.
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise _out_of_range(text, kind, field) from None


def _round_numeric(d: decimal.Decimal, kind: tables.Numeric, field: str, shown: str) -> str:
    if not d.is_finite():
        raise InvalidEvent(f"{shown[:40]!r} is not a finite number", field=field)
    # One quantize under precision p both rounds half away from zero (as PostgreSQL's NUMERIC
    # does) and fails when the rounded value needs more than p digits, i.e. does not fit.
    ctx = decimal.Context(prec=kind.precision, rounding=decimal.ROUND_HALF_UP, traps=[])
    try:
        q = d.quantize(decimal.Decimal(1).scaleb(-kind.scale), context=ctx)
    except decimal.InvalidOperation:
        raise _out_of_range(shown, kind, field) from None
    if not q.is_finite() or ctx.flags[decimal.InvalidOperation]:
        raise _out_of_range(shown, kind, field)
    return format(q, "f")


def _out_of_range(shown: str, kind: tables.Numeric, field: str) -> InvalidEvent:
    return InvalidEvent(
        f"{shown[:40]} does not fit NUMERIC({kind.precision}, {kind.scale}) "
        f"(at most {kind.precision - kind.scale} integer digits)",
        field=field,
    )


def common_time(value: str, field: str) -> tuple[str, dt.datetime]:
    """``time_value`` of a string already known to have the usual RFC 3339 shape (``T``, at most
    microseconds, ``Z`` or ``+hh:mm``, see ``RFC3339_COMMON_PATTERN``): parsed in C in one call."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidEvent(f"{value[:40]!r} is not a valid time: {exc}", field=field) from None
    if value[0] == "0" or value.startswith("9999"):
        _check_utc_range(parsed, value, field)
    return (value[:-1] + "+00:00" if value[-1] == "Z" else value), parsed


def time_value(value: object, field: str) -> tuple[str, dt.datetime]:
    """PostgreSQL-ready text and the aware datetime of an RFC 3339 time with an offset."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidEvent("naive datetime: a time zone offset is required", field=field)
        _check_utc_range(value, str(value), field)
        utc_offset = value.utcoffset()
        if utc_offset is not None and utc_offset % dt.timedelta(minutes=1):
            # An offset with seconds (Python allows it) is not RFC 3339: write the UTC instant.
            return value.astimezone(dt.UTC).isoformat(), value
        return value.isoformat(), value
    if type(value) is not str:
        raise InvalidEvent("expected an RFC 3339 time string", field=field)
    if _RFC3339_COMMON(value) is not None:
        return common_time(value, field)
    m = _RFC3339.match(value)
    if m is None:
        if len(value) >= 19 and _RFC3339.match(value + "Z"):
            raise InvalidEvent(f"{value[:40]!r} has no offset (naive time)", field=field)
        raise InvalidEvent(f"{value[:40]!r} is not an RFC 3339 time with an offset", field=field)
    date, clock, frac, offset = m.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    micros = 0
    carry = False
    if frac:
        if len(frac) > 6:
            # PostgreSQL keeps microseconds; round the 7th digit half up, as it does.
            carry_up = frac[6] >= "5"
            micros = int(frac[:6]) + (1 if carry_up else 0)
            if micros == 1_000_000:
                micros, carry = 0, True
        else:
            micros = int(frac.ljust(6, "0"))
    try:
        parsed = dt.datetime.fromisoformat(f"{date}T{clock}{offset}")
    except ValueError as exc:
        raise InvalidEvent(f"{value[:40]!r} is not a valid time: {exc}", field=field) from None
    parsed = parsed.replace(microsecond=micros)
    if carry:
        try:
            parsed += dt.timedelta(seconds=1)
        except OverflowError:
            raise _outside_range(value, field) from None
    _check_utc_range(parsed, value, field)
    if frac is None:
        return f"{date}T{clock}{offset}", parsed
    if len(frac) <= 6:
        return f"{date}T{clock}.{frac}{offset}", parsed
    return parsed.isoformat(), parsed


def _check_utc_range(moment: dt.datetime, shown: str, field: str) -> None:
    # The mirror works with the UTC instant, which must exist: years 1 to 9999 in UTC.
    try:
        moment.astimezone(dt.UTC)
    except OverflowError:
        raise _outside_range(shown, field) from None


def _outside_range(shown: str, field: str) -> InvalidEvent:
    return InvalidEvent(f"{shown[:40]!r} is outside the years 1 to 9999 in UTC", field=field)


def _text_value(value: object, kind: tables.Varchar, field: str) -> str:
    if type(value) is not str:
        raise InvalidEvent(f"expected a string, got {_json_type(value)}", field=field)
    if not value:
        raise InvalidEvent("must not be empty", field=field)
    if len(value) > kind.length:
        raise InvalidEvent(f"longer than {kind.length} characters ({len(value)})", field=field)
    if "\x00" in value:
        raise InvalidEvent("contains a NUL character", field=field)
    return value


def _json_type(value: object) -> str:
    if isinstance(value, JsonNumber | int | float) and not isinstance(value, bool):
        return "a number"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return type(value).__name__


def _bool_value(value: object, field: str) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    raise InvalidEvent(f"expected true or false, got {_json_type(value)}", field=field)


def utc_iso(moment: dt.datetime) -> str:
    """Fixed-width UTC ISO-8601 (``2025-11-15T03:40:15.123000Z``): sorts as it compares."""
    u = moment.astimezone(dt.UTC)
    # Not strftime: glibc's %Y does not zero-pad years below 1000.
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
        f".{u.microsecond:06d}Z"
    )


# --- events ------------------------------------------------------------------------------------


# --- the per-type validators ---------------------------------------------------------------
#
# Each event type gets a validator generated once, at import, as straight-line Python (the way
# dataclasses and attrs build their __init__): one block per field, with the common case (a
# decimal string within the column's digits, a plain string of allowed length, an RFC 3339 time
# of the usual shape) tested inline and everything else handed to the general functions above,
# which round, convert and produce the error messages. It is about twice as fast as a loop over
# per-field check functions, and the intake is CPU-bound in exactly this code (profiled).


def fits_pattern(kind: tables.Numeric) -> str:
    """A pattern for decimal text that fits NUMERIC(p, s) as written (no rounding needed)."""
    int_digits = kind.precision - kind.scale
    frac = rf"(?:\.[0-9]{{1,{kind.scale}}})?" if kind.scale else ""
    return rf"-?0*[0-9]{{1,{int_digits}}}{frac}\Z"


def _fits_pattern(kind: tables.Numeric) -> Callable[[str], object]:
    return re.compile(fits_pattern(kind)).match


def _field_source(f: Field, spec: EventType, n: int) -> list[str]:
    name = f.name
    if f.required:
        on_none = f"    raise _missing({name!r})"
    elif (spec.name, name) == ("spread", "is_opportunity"):
        on_none = f"    v{n} = 'false'"  # the column's default
    else:
        on_none = f"    v{n} = None"
    kind = f.kind
    lines = [f"v = get({name!r})"]
    if isinstance(kind, tables.Numeric):
        lines += [
            f"if type(v) is str and fits_{n}(v) is not None:",
            f"    v{n} = v",
            "elif v is None:",
            on_none,
            "else:",
            f"    v{n} = numeric_text(v, kind_{n}, {name!r})",
        ]
    elif isinstance(kind, tables.Varchar):
        lines += [
            f"if type(v) is str and 0 < len(v) <= {kind.length} and '\\x00' not in v:",
            f"    v{n} = v",
            "elif v is None:",
            on_none,
            "else:",
            f"    v{n} = _text_value(v, kind_{n}, {name!r})",
        ]
    elif isinstance(kind, tables.Timestamptz):
        moment = "moment" if name == spec.time_field else "_"
        lines += [
            "if v is None:",
            on_none,
            "else:",
            f"    v{n}, {moment} = time_value(v, {name!r})",
        ]
    else:
        lines += [
            "if v is True:",
            f"    v{n} = 'true'",
            "elif v is False:",
            f"    v{n} = 'false'",
            "elif v is None:",
            on_none,
            "else:",
            f"    v{n} = _bool_value(v, {name!r})",
        ]
    return lines


def _compile_validator(spec: EventType) -> Callable[[Any], tuple[dict[str, str | None], Any]]:
    """``fields(get) -> (values, event time)`` for one event type, generated once."""
    namespace: dict[str, Any] = {
        "numeric_text": numeric_text,
        "_text_value": _text_value,
        "time_value": time_value,
        "_bool_value": _bool_value,
        "_missing": _missing,
    }
    body: list[str] = []
    for n, f in enumerate(spec.fields):
        namespace[f"kind_{n}"] = f.kind
        if isinstance(f.kind, tables.Numeric):
            namespace[f"fits_{n}"] = _fits_pattern(f.kind)
        body += _field_source(f, spec, n)
    values = ", ".join(f"{f.name!r}: v{n}" for n, f in enumerate(spec.fields))
    body.append(f"return {{{values}}}, moment")
    source = f"def validate_{spec.name}(get):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, f"<ingestd validator {spec.name}>", "exec"), namespace)  # noqa: S102
    fn: Callable[[Any], tuple[dict[str, str | None], Any]] = namespace[f"validate_{spec.name}"]
    return fn


def _missing(field: str) -> InvalidEvent:
    return InvalidEvent("required field is missing", field=field)


@dataclasses.dataclass(frozen=True, slots=True)
class _Validator:
    """An event type's validation, prepared once: the keys it allows and its field code."""

    spec: EventType
    allowed: frozenset[str]
    fields: Callable[[Any], tuple[dict[str, str | None], Any]]


_EVENT_ID_LEN: Final = tables.EVENT_ID.length
_PRODUCER_LEN: Final = tables.PRODUCER.length
_VALIDATORS: Final = {
    name: _Validator(spec, spec.field_names | ENVELOPE_FIELDS, _compile_validator(spec))
    for name, spec in EVENT_TYPES.items()
}


def parse_event(obj: object, *, default_event_id: str | None = None) -> Event:
    """Validate a decoded event; raise InvalidEvent naming the field and the reason."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent(f"an event must be a JSON object, got {_json_type(obj)}")
    etype = obj.get("type")
    if type(etype) is not str:
        raise InvalidEvent("missing or not a string", field="type")
    validator = _VALIDATORS.get(etype)
    if validator is None:
        raise InvalidEvent(
            f"unknown event type {etype[:40]!r} (known: {', '.join(EVENT_TYPES)})", field="type"
        )
    event_id = obj.get("event_id")
    if event_id is None:
        event_id = default_event_id  # None: derived from the content below
    elif not (
        type(event_id) is str and 0 < len(event_id) <= _EVENT_ID_LEN and "\x00" not in event_id
    ):
        event_id = _text_value(event_id, tables.EVENT_ID, "event_id")
    producer = obj.get("producer")
    if producer is not None and not (
        type(producer) is str and 0 < len(producer) <= _PRODUCER_LEN and "\x00" not in producer
    ):
        producer = _text_value(producer, tables.PRODUCER, "producer")
    allowed = validator.allowed
    if not allowed.issuperset(obj.keys()):
        for key in obj:
            if key not in allowed:
                raise InvalidEvent(f"unknown field for a {etype} event", field=str(key)[:60])
    values, moment = validator.fields(obj.get)
    if etype == "heartbeat" and keys.is_reserved_component(str(values["component"])):
        raise InvalidEvent(
            "is reserved: ingestd writes its own heartbeats (health:ingestd)", field="component"
        )
    if event_id is None:
        event_id = content_event_id(etype, producer, values)
    complete(etype, values, moment)
    event = Event(etype, event_id, producer, moment, values, validator.spec.table)
    if "seq" in obj or "session" in obj:
        event.seq, event.session = _sequence(obj.get("seq"), obj.get("session"))
    return event


def _sequence(seq: object, session: object) -> tuple[int | None, str | None]:
    """The optional ``seq`` (integer 0 to 2^63-1) and ``session`` (1-50 characters)."""
    if seq is not None and (type(seq) is not int or not 0 <= seq <= MAX_SEQ):
        raise InvalidEvent(f"must be an integer from 0 to {MAX_SEQ}", field="seq")
    if session is not None and not (
        type(session) is str and 0 < len(session) <= SESSION_LEN and "\x00" not in session
    ):
        raise InvalidEvent(
            f"must be a string of 1 to {SESSION_LEN} characters without NUL", field="session"
        )
    return seq, session


def content_event_id(etype: str, producer: str | None, values: Mapping[str, str | None]) -> str:
    """An id for an event that came without one and without a stream entry: its content.

    The same event submitted again (a producer's retry after its own timeout) gets the same id
    and so lands once; a random id would make every retry a new row.
    """
    canon = "\x1f".join(
        [etype, producer or "", *(f"{k}={'' if v is None else v}" for k, v in values.items())]
    )
    return "local:" + hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:40]


# --- what ingestd adds to a validated event ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Staleness:
    """When a spread was computed from stale inputs.

    Its two prices' source times (``upbit_ts``, ``binance_ts``) further apart than ``max_skew``,
    or its FX rate's time (``fx_ts``) older than ``fx_ttl`` at the spread's own time: the spread
    compares prices that never existed together. A time the producer did not send is unknown,
    not stale: a spread without them is never flagged.
    """

    max_skew: dt.timedelta = dt.timedelta(seconds=2)
    fx_ttl: dt.timedelta = dt.timedelta(seconds=3)

    def is_stale(self, values: Mapping[str, str | None], moment: dt.datetime) -> bool:
        """True when the spread's validated ``values`` (taken at ``moment``) are stale."""
        upbit, binance, fx = values["upbit_ts"], values["binance_ts"], values["fx_ts"]
        if upbit is not None and binance is not None:
            apart = dt.datetime.fromisoformat(upbit) - dt.datetime.fromisoformat(binance)
            if abs(apart) > self.max_skew:
                return True
        return fx is not None and moment - dt.datetime.fromisoformat(fx) > self.fx_ttl


# One policy per process, set from the settings at start (``configure_staleness``): it is read
# by both decoding paths, which must give the same event (tests/unit/test_fastpath.py).
_staleness = Staleness()


def configure_staleness(*, max_skew_s: float, fx_ttl_s: float) -> None:
    """Use these limits (``spreads.stale_skew_s``, ``fx.ttl_seconds``) from now on."""
    global _staleness  # noqa: PLW0603 - process-wide configuration, set once at start
    _staleness = Staleness(dt.timedelta(seconds=max_skew_s), dt.timedelta(seconds=fx_ttl_s))


def configure_staleness_from(settings: Settings) -> None:
    """The limits of ``spreads.stale_skew_s`` and ``fx.ttl_seconds``."""
    configure_staleness(max_skew_s=settings.spreads.stale_skew_s, fx_ttl_s=settings.fx.ttl_seconds)


def staleness() -> Staleness:
    """The limits in force."""
    return _staleness


_MODE_TYPES: Final = frozenset({"order", "trade", "position_open", "position_close"})


def complete(etype: str, values: dict[str, str | None], moment: dt.datetime) -> None:
    """Add what ingestd derives to a validated event's ``values`` (both decoding paths call it).

    A spread gets ``is_stale`` (``Staleness``). An order, trade or position event's ``mode``, when
    sent, must be ``paper`` or ``live``; an event without it is stored with no mode (NULL), which
    the per-mode views keep apart from both books rather than guess from the producer's name.
    """
    if etype == "spread":
        values["is_stale"] = "true" if _staleness.is_stale(values, moment) else "false"
    elif etype in _MODE_TYPES:
        mode = values["mode"]
        if mode is not None and mode not in tables.MODES:
            raise InvalidEvent(f"must be 'paper' or 'live', got {mode[:20]!r}", field="mode")


def to_wire(ev: Event) -> dict[str, Any]:
    """The validated event as wire fields again (decimals and times as text): it decodes back
    to the same event, which is how the spool keeps it."""
    out: dict[str, Any] = {"type": ev.type, "event_id": ev.event_id}
    if ev.producer is not None:
        out["producer"] = ev.producer
    if ev.seq is not None:
        out["seq"] = ev.seq
    if ev.session is not None:
        out["session"] = ev.session
    for f in ev.spec.fields:
        value = ev.values[f.name]
        if value is not None:
            out[f.name] = value == "true" if isinstance(f.kind, tables.Boolean) else value
    return out


# Validation bugs whose traceback was logged, by exception type and the line that raised it: a
# producer that keeps sending a payload that trips one gets one traceback, then a line each.
_BUGS_LOGGED: set[tuple[str, str, int]] = set()
_MAX_BUGS_LOGGED: Final = 1000


def internal_error(exc: Exception) -> InvalidEvent:
    """The dead-letter reason for a payload that raised ``exc`` in validation (a bug, logged)."""
    # A payload that trips a bug in validation must not stop the intake or vanish: it becomes
    # a dead letter like bad input (its raw payload kept), and the traceback is logged.
    frames = traceback.extract_tb(exc.__traceback__)
    where = (frames[-1].filename, frames[-1].lineno or 0) if frames else ("?", 0)
    bug = (type(exc).__name__, *where)
    if bug in _BUGS_LOGGED or len(_BUGS_LOGGED) >= _MAX_BUGS_LOGGED:
        log.error(
            "validation failed unexpectedly: %s: %s at %s:%d (traceback logged before)",
            type(exc).__name__,
            exc,
            where[0],
            where[1],
            extra={"action": "validation_bug"},
        )
    else:
        _BUGS_LOGGED.add(bug)
        log.exception("validation failed unexpectedly", extra={"action": "validation_bug"})
    return InvalidEvent(f"internal error while validating the event: {type(exc).__name__}: {exc}")


def normalize(
    obj: Mapping[str, Any],
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    retention: Retention | None = None,
) -> Event:
    """Validate an event given as a Python mapping (in-process producers)."""
    check_depth(obj, max_depth)
    for key, value in obj.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidEvent(
                    "contains a lone surrogate (not valid UTF-8)", field=str(key)
                ) from None
    try:
        event = parse_event(obj)
    except InvalidEvent:
        raise
    except Exception as exc:
        raise internal_error(exc) from exc
    if retention is not None:
        retention.check(event)
    return event


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Retention:
    """How many days each table keeps its rows (``retention:``; 0 or absent: forever).

    An event older than its table's retention is bad input: the next retention run would delete
    it without a trace, after it had been acknowledged and mirrored. The cut-off is the one the
    retention run uses (event time before now minus the period). It is worked out at most once a
    second, not per event (this is on the intake's hot path; a second is nothing against days).
    """

    __slots__ = ("_clock", "_cutoffs", "_refresh_at", "days")

    def __init__(
        self, days: Mapping[str, int], clock: Callable[[], dt.datetime] = _utc_now
    ) -> None:
        self.days = {table: n for table, n in days.items() if n > 0}
        self._clock = clock
        self._cutoffs: dict[str, dt.datetime] = {}
        self._refresh_at = -math.inf

    def check(self, event: Event) -> None:
        """Raise InvalidEvent if ``event`` is older than its table keeps rows."""
        table = event.table
        if table is None:
            return
        if time.monotonic() >= self._refresh_at:
            now = self._clock()
            self._cutoffs = {t: now - dt.timedelta(days=n) for t, n in self.days.items()}
            self._refresh_at = time.monotonic() + 1.0
        cutoff = self._cutoffs.get(table.name)
        if cutoff is not None and event.time < cutoff:
            field = event.spec.time_field
            raise InvalidEvent(
                f"{event.values[field]} is older than the {self.days[table.name]}-day retention "
                f"of {table.name}",
                field=field,
            )


def retention_of(settings: RetentionSettings) -> Retention:
    """The retention periods of the ``retention:`` settings, as the intake checks them."""
    return Retention(
        {
            "spreads": settings.spreads_days,
            "fx_rates": settings.fx_rates_days,
            "orders": settings.orders_days,
        }
    )
