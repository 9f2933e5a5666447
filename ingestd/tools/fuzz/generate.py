"""Fuzz cases: valid events of every type, mutations of them, random bytes, each with its fate.

The fate of a case is what the wire format promises for it, not what today's code does: a
valid append-only event lands once with exact values; bad input (ill-formed, ill-typed, out of
range, too big, too deep, older than its table's retention) is one dead letter; an event with
the ``event_id`` and time of an earlier one and other content is a conflict; an identical one is
a redelivery and changes nothing; the first ``position_open`` and first ``position_close`` of a
position stand and every later one with another ``event_id`` is a conflict.

Cases come in the order they are sent; per route (the stream, the in-process ``submit``) that is
the order of commit when the service runs one writer, which is how the campaign runs it, so the
positions model decides each position event's fate while generating it. Everything is drawn
from one ``random.Random(seed)``: the same seed gives the same cases.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import random
import re
import reprlib
import string
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

from ingestd.wire import events, keys, tables


class Raw(str):
    """Literal JSON text, written as it is: a number's exact spelling, or a deliberate error."""

    __slots__ = ()


class Fate(enum.Enum):
    """What must become of a case."""

    LAND = "land"  # an append-only row, exactly once, with exact values
    POSITION = "position"  # the first open or close of its position: it stands
    HEARTBEAT = "heartbeat"  # accepted, no row
    DEAD = "dead"  # bad input: exactly one dead letter
    CONFLICT = "conflict"  # same event_id (and time) as a stored event, other content
    REDELIVERY = "redelivery"  # identical to an earlier event: changes nothing


STREAM: Final = "stream"
STREAM_B: Final = "stream_b"  # a second stream, read by the in-process service
SUBMIT: Final = "submit"
ROUTES: Final = (STREAM, STREAM_B, SUBMIT)

TABLE_OF_TYPE: Final = {
    "spread": "spreads",
    "fx_rate": "fx_rates",
    "order": "orders",
    "trade": "trades",
}
APPEND_TYPES: Final = tuple(TABLE_OF_TYPE)
ALL_TYPES: Final = tuple(events.EVENT_TYPES)
# The default retention; an event older than its table's is bad input (trades have none).
DEFAULT_RETENTION_DAYS: Final = {"spreads": 90, "fx_rates": 180, "orders": 365}
# What a forged log line would start with; the oracle looks for it at the start of a line.
FORGE: Final = "FZFORGE"


@dataclasses.dataclass(slots=True)
class Row:
    """An append-only row the case must leave: every column but ``event_id`` (in ``values``)."""

    table: str
    event_id: str | None  # None: derived by ingestd (stream key and entry id, or content)
    time: dt.datetime
    values: dict[str, Any]


@dataclasses.dataclass(slots=True)
class PositionEvent:
    """A valid ``position_open``/``position_close`` and the columns it sets."""

    key: str
    slot: str  # "open" or "close"
    event_id: str
    values: dict[str, Any]


@dataclasses.dataclass(slots=True)
class Case:
    """One thing sent, and what must become of it."""

    n: int
    route: str
    category: str  # valid, mutation, bytes, redelivery, conflict, position, collision
    name: str
    payload: Any  # bytes for the streams; bytes, str or a mapping for submit
    fate: Fate
    description: str = ""
    row: Row | None = None
    position: PositionEvent | None = None
    names: str | None = None  # the standing event_id a conflict's reason must name
    marker: str | None = None  # submit: a string found in its dead letter's payload
    original: int | None = None  # the case this one repeats (redelivery, conflict, twin)
    stream_field: bytes = b"event"
    entry_id: str | None = None  # filled in when sent to a stream

    def describe(self, limit: int = 240) -> str:
        """``#n route category/name: description; payload …`` for a violation report."""
        payload = self.payload
        if isinstance(payload, bytes | str) and len(payload) > limit:
            unit = "bytes" if isinstance(payload, bytes) else "chars"
            shown = f"{payload[:limit]!r}… ({len(payload)} {unit})"
        else:
            # reprlib: bounded depth and width (a payload may be nested 50,000 lists deep).
            shaper = reprlib.Repr()
            shaper.maxstring = shaper.maxother = limit
            shaper.maxdict = shaper.maxlist = 40
            shown = shaper.repr(payload)
            if len(shown) > limit:
                shown = shown[:limit] + "…"
        where = f" entry {self.entry_id}" if self.entry_id else ""
        text = f"#{self.n} {self.route}{where} {self.category}/{self.name}"
        if self.description:
            text += f": {self.description}"
        return f"{text}; payload {shown}"


# --- JSON with choices: number spellings, escapes, whitespace --------------------------------

_SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}


class JsonWriter:
    """``dumps`` with random but valid choices; ``Raw`` values are written verbatim."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def dumps(
        self, obj: Any, *, escape_rate: float | None = None, spaced: bool | None = None
    ) -> bytes:
        rng = self.rng
        esc = rng.choice((0.0, 0.0, 0.3, 1.0)) if escape_rate is None else escape_rate
        sp = rng.random() < 0.3 if spaced is None else spaced
        out: list[str] = []
        self._write(obj, out, esc, sp)
        return "".join(out).encode("utf-8")

    def _ws(self, out: list[str], spaced: bool) -> None:
        if spaced:
            out.append(self.rng.choice((" ", "", "\n  ", "\t", "\r\n")))

    def _write(self, obj: Any, out: list[str], esc: float, spaced: bool) -> None:
        if isinstance(obj, Raw):
            out.append(str(obj))
        elif obj is None:
            out.append("null")
        elif obj is True:
            out.append("true")
        elif obj is False:
            out.append("false")
        elif isinstance(obj, int):
            out.append(str(obj))
        elif isinstance(obj, str):
            out.append(self.string(obj, esc))
        elif isinstance(obj, Mapping):
            out.append("{")
            for i, (k, v) in enumerate(obj.items()):
                if i:
                    out.append(",")
                self._ws(out, spaced)
                out.append(self.string(str(k), esc))
                self._ws(out, spaced)
                out.append(":")
                self._ws(out, spaced)
                self._write(v, out, esc, spaced)
            self._ws(out, spaced)
            out.append("}")
        elif isinstance(obj, list | tuple):
            out.append("[")
            for i, v in enumerate(obj):
                if i:
                    out.append(",")
                self._write(v, out, esc, spaced)
            out.append("]")
        else:
            raise TypeError(f"cannot write {type(obj).__name__} as JSON")

    def string(self, s: str, esc: float) -> str:
        """A JSON string literal; non-ASCII is escaped with probability ``esc``."""
        rng = self.rng
        out = ['"']
        for ch in s:
            code = ord(ch)
            if ch in _SHORT_ESCAPES and (ch in '"\\' or rng.random() < 0.7):
                out.append(_SHORT_ESCAPES[ch])
            elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
                out.append(f"\\u{code:04x}")
            elif code > 0x7E and (esc and rng.random() < esc):
                if code > 0xFFFF:
                    v = code - 0x10000
                    out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
                else:
                    out.append(f"\\u{code:04X}" if rng.random() < 0.5 else f"\\u{code:04x}")
            elif ch == "/" and rng.random() < 0.3:
                out.append("\\/")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)


# --- values ------------------------------------------------------------------------------------

_SPICE: Final = (
    '"', "'", ",", "\\", "\n", "\r", "\t", "\x01", "\x1b", "\x7f", "é", "한", "글", "😀", "\u200b",
    "\u0301", "\ufeff", "/", "<", "{", "%s", "\u2028", "$1", ";", "--", "ß", "İ",
    # COPY's end-of-data marker and NULL spellings, on lines of their own.
    "\n\\.\n", "\\N", "\n\\.", "NULL",
)  # fmt: skip
_ALNUM: Final = string.ascii_letters + string.digits
_OFFSETS: Final = (
    "Z",
    "Z",
    "z",
    "+00:00",
    "+09:00",
    "-03:30",
    "+05:45",
    "-12:00",
    "+14:00",
    "-00:00",
)


def quantize(value: Decimal, scale: int) -> Decimal:
    """Round half away from zero to ``scale`` places, as PostgreSQL's NUMERIC does."""
    return value.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


def fits(value: Decimal, kind: tables.Numeric) -> bool:
    """True when ``value`` (already rounded to the scale) fits NUMERIC(p, s)."""
    return abs(value) < Decimal(10) ** (kind.precision - kind.scale)


class Values:
    """Random valid values of each column type, with their exact expected value."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self, length: int, *, plain: bool = False) -> str:
        rng = self.rng
        roll = rng.random()
        n = length if roll < 0.1 else rng.randint(1, min(length, 12 if roll < 0.8 else length))
        if plain or rng.random() < 0.5:
            return "".join(rng.choice(_ALNUM) for _ in range(n))
        chars = [
            rng.choice(_SPICE) if rng.random() < 0.35 else rng.choice(_ALNUM) for _ in range(n)
        ]
        return "".join(chars)[:length]

    def numeric(self, kind: tables.Numeric) -> tuple[Any, Decimal]:
        """A wire value (decimal string or ``Raw`` JSON number) and its stored value."""
        rng = self.rng
        int_digits = kind.precision - kind.scale
        while True:
            k = rng.choice((1, 1, 2, 3, 4, 6, int_digits))
            int_part = str(rng.randint(0, 10**k - 1))
            extra = rng.choice((0, 0, 0, 1, 3))
            frac_len = rng.randint(0, kind.scale) + extra
            frac = "".join(rng.choice(string.digits) for _ in range(frac_len))
            sign = "-" if rng.random() < 0.15 else ""
            text = sign + int_part + ("." + frac if frac else "")
            exact = Decimal(text)
            expected = quantize(exact, kind.scale)
            if fits(expected, kind):
                break
        roll = rng.random()
        if roll < 0.45:
            zeros = "0" * rng.choice((0, 0, 0, 2)) if not sign else ""
            return zeros + text, expected
        if roll < 0.8:
            return Raw(text), expected
        # An exponent spelling of the same number: D.DDDe±X.
        digits = "".join(str(d) for d in exact.as_tuple().digits)
        exponent = int(exact.as_tuple().exponent) + len(digits) - 1
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        mark = rng.choice("eE")
        exp_text = f"{exponent:+d}" if rng.random() < 0.5 else str(exponent)
        return Raw(f"{sign}{mantissa}{mark}{exp_text}"), expected

    def time(self, moment: dt.datetime) -> tuple[str, dt.datetime]:
        """An RFC 3339 spelling of ``moment`` (whole seconds) plus a random fraction, and the
        instant it stands for (rounded to microseconds; an exact half is never drawn)."""
        rng = self.rng
        frac_len = rng.choice((0, 3, 3, 6, 1, 2, 7, 9))
        frac = "".join(rng.choice(string.digits) for _ in range(frac_len))
        if frac_len > 6 and frac[6] == "5" and set(frac[7:]) <= {"0"}:
            frac = frac[:6] + "4" + frac[7:]
        micros = 0
        if frac:
            scaled = Decimal("0." + frac) * 1_000_000
            micros = int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        instant = moment + dt.timedelta(microseconds=micros)
        offset = rng.choice(_OFFSETS)
        if offset in ("Z", "z"):
            local = moment.astimezone(dt.UTC)
        else:
            sign = -1 if offset[0] == "-" else 1
            delta = dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
            local = moment.astimezone(dt.timezone(sign * delta))
        sep = "t" if rng.random() < 0.05 else "T"
        wire = local.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + ("." + frac if frac else "") + offset
        return wire, instant


# --- the generator -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Built:
    """A valid event as wire fields, with the values it must store."""

    etype: str
    wire: dict[str, Any]
    event_id: str | None
    producer: str | None
    time: dt.datetime
    expected: dict[str, Any]  # field -> stored value


@dataclasses.dataclass(slots=True)
class _Scenario:
    route: str
    key: str
    producer: str
    steps: list[Callable[[], Case]]


class Generator:
    """Draws rounds of cases from one seed."""

    def __init__(
        self,
        seed: int,
        *,
        now: dt.datetime,
        max_event_bytes: int,
        retention_days: Mapping[str, int] = DEFAULT_RETENTION_DAYS,
        big_payloads: bool = True,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)  # noqa: S311 - reproducible fuzzing, not security
        self.values = Values(self.rng)
        self.json = JsonWriter(self.rng)
        self.now = now
        self.base = (now - dt.timedelta(days=2)).replace(microsecond=0)
        self.max_event_bytes = max_event_bytes
        self.retention_days = dict(retention_days)
        self.big_payloads = big_payloads
        self.tag = f"{seed & 0xFFFFFFFF:x}"
        self.n = 0
        self.cases: list[Case] = []
        self.rounds = 0
        self._scenarios: list[_Scenario] = []
        # Per route: valid cases with an explicit event_id (for redeliveries and conflicts).
        self._landed: dict[str, list[Case]] = {r: [] for r in ROUTES}
        self._keys: dict[str, list[str]] = {r: [] for r in ROUTES}
        # Per (route, key): the standing open and close, decided in send (= commit) order.
        self.standing: dict[tuple[str, str], dict[str, PositionEvent]] = {}

    # --- helpers ------------------------------------------------------------------------

    def _next(self) -> int:
        self.n += 1
        return self.n

    def _moment(self, n: int) -> dt.datetime:
        # One whole second per case: every case's time is its own, so rows are easy to find.
        return self.base + dt.timedelta(seconds=n)

    def _marker(self, n: int) -> str:
        return f"fzq{self.tag}n{n}z"

    def _event_id(self, n: int, route: str) -> str | None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.07:
            return None  # derived by ingestd
        base = f"fz{self.tag}-{n}"
        if route == SUBMIT:
            base = self._marker(n)
        if roll < 0.85:
            return base
        return (base + "-" + self.values.text(20))[:100]

    def _producer(self, n: int, route: str) -> str | None:
        if route == SUBMIT:
            return self._marker(n)
        if self.rng.random() < 0.1:
            return None
        return self.values.text(50)

    def _value(self, kind: tables.ColumnType, n: int) -> tuple[Any, Any]:
        if isinstance(kind, tables.Numeric):
            return self.values.numeric(kind)
        if isinstance(kind, tables.Varchar):
            text = self.values.text(kind.length)
            return text, text
        if isinstance(kind, tables.Boolean):
            b = self.rng.random() < 0.5
            return b, b
        return self.values.time(self._moment(n))

    def build(self, etype: str, n: int, route: str, *, key: str | None = None) -> _Built:
        """A valid event of ``etype`` (the time field from case ``n``)."""
        rng = self.rng
        spec = events.EVENT_TYPES[etype]
        event_id = self._event_id(n, route)
        if etype.startswith("position_") and event_id is None:
            # Position events are named by their producers.
            event_id = self._marker(n) if route == SUBMIT else f"fz{self.tag}-{n}"
        producer = self._producer(n, route)
        wire: dict[str, Any] = {"type": etype}
        if event_id is not None:
            wire["event_id"] = event_id
        if producer is not None:
            wire["producer"] = producer
        expected: dict[str, Any] = {}
        moment = self._moment(n)
        for f in spec.fields:
            if f.name == "position_key":
                if key is None and etype in ("order", "trade"):
                    keys_ = self._keys[route]
                    key = rng.choice(keys_) if keys_ and rng.random() < 0.5 else None
                if key is None and not f.required:
                    expected[f.name] = None
                    continue
                wire[f.name] = key if key is not None else self.values.text(100, plain=True)
                expected[f.name] = wire[f.name]
                continue
            if f.name == spec.time_field:
                wire_time, moment = self.values.time(self._moment(n))
                wire[f.name], expected[f.name] = wire_time, moment
                continue
            if not f.required and rng.random() < 0.3:
                if rng.random() < 0.5:
                    wire[f.name] = None
                expected[f.name] = False if f.name == "is_opportunity" else None
                continue
            if f.name == "mode":  # one of two books, not any text
                wire[f.name] = expected[f.name] = rng.choice(sorted(tables.MODES))
                continue
            wire[f.name], expected[f.name] = self._value(f.kind, n)
        if etype == "heartbeat" and keys.is_reserved_component(str(wire["component"])):
            wire["component"] = expected["component"] = "x" + str(wire["component"])[:49]
        if route != SUBMIT and rng.random() < 0.3:
            # Field order is not significant.
            items = list(wire.items())
            rng.shuffle(items)
            wire = dict(items)
        return _Built(etype, wire, event_id, producer, moment, expected)

    def _row(self, built: _Built) -> Row | None:
        table = TABLE_OF_TYPE.get(built.etype)
        if table is None:
            return None
        values = {"producer": built.producer, **built.expected}
        return Row(table, built.event_id, built.time, values)

    def _encode(
        self, route: str, wire: dict[str, Any], expected: Mapping[str, Any], *, raw: bool = False
    ) -> Any:
        """The payload for a route: bytes for the streams; bytes, str or a mapping for submit."""
        if route != SUBMIT:
            return self.json.dumps(wire)
        roll = self.rng.random()
        if roll < 0.4 or raw:
            return self.json.dumps(wire)
        if roll < 0.55:
            return self.json.dumps(wire).decode("utf-8")
        return self._to_python(wire, expected)

    def marker_of(self, built: _Built) -> str:
        """The submit marker a built event carries (in its producer or event_id)."""
        for value in (built.producer, built.event_id):
            if value is not None and value.startswith("fzq"):
                return value[: value.index("z", 3) + 1]
        return ""

    def _to_python(self, wire: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
        """The wire fields as an in-process producer would pass them: numbers as Decimal,
        int or float, times as strings or aware datetimes."""
        rng = self.rng
        out: dict[str, Any] = {}
        for k, v in wire.items():
            if isinstance(v, Raw):
                d = Decimal(str(v))
                if d == d.to_integral_value() and "e" not in v.lower() and "." not in v:
                    out[k] = int(d)
                elif rng.random() < 0.3 and len(str(v)) <= 12 and float(v) == d:
                    out[k] = float(v)
                else:
                    out[k] = d
            elif isinstance(expected.get(k), dt.datetime) and rng.random() < 0.5:
                # The same instant, in some zone.
                zone = dt.timezone(dt.timedelta(minutes=rng.randrange(-12 * 60, 14 * 60, 15)))
                out[k] = expected[k].astimezone(zone)
            else:
                out[k] = v
        return out

    # --- rounds -------------------------------------------------------------------------

    def round(self, size: int) -> list[Case]:
        """``size`` actions (a case each, a few make two) with open scenarios finished last."""
        rng = self.rng
        self.rounds += 1
        out: list[Case] = []
        actions: list[tuple[float, Callable[[], list[Case]]]] = [
            (0.31, self._valid),
            (0.02, self._other_time),
            (0.13, self._position_step),
            (0.30, self._mutation),
            (0.05, self._garbage),
            (0.06, self._redelivery),
            (0.06, self._conflict),
            (0.03, self._collision),
            (0.04, self._cross_route),
        ]
        weights = [w for w, _ in actions]
        for _ in range(size):
            (_, action) = rng.choices(actions, weights)[0]
            out.extend(action())
        while self._scenarios:
            out.extend(self._position_step(finish=True))
        self.cases.extend(out)
        return out

    def _route(self) -> str:
        return SUBMIT if self.rng.random() < 0.25 else STREAM

    def _valid(self) -> list[Case]:
        rng = self.rng
        route = self._route()
        n = self._next()
        etype = rng.choice((*APPEND_TYPES, *APPEND_TYPES, "heartbeat"))
        built = self.build(etype, n, route)
        name = etype
        if etype == "trade" and rng.random() < 0.1:
            # Trades keep no retention: a year-old trade is valid.
            old = self._moment(n) - dt.timedelta(days=400)
            wire_time, built.time = self.values.time(old)
            built.wire["timestamp"], built.expected["timestamp"] = wire_time, built.time
            name = "trade_400_days_old"
        payload = self._encode(route, built.wire, built.expected)
        if (
            self.big_payloads
            and route != SUBMIT
            and isinstance(payload, bytes)
            and rng.random() < 0.004
        ):
            # Exactly max_event_bytes, padded with JSON whitespace: still a valid event.
            payload = payload[:-1] + b" " * (self.max_event_bytes - len(payload)) + b"}"
            name += "_exactly_max_event_bytes"
        fate = Fate.HEARTBEAT if etype == "heartbeat" else Fate.LAND
        case = Case(
            n,
            route,
            "valid",
            name,
            payload,
            fate,
            row=self._row(built),
            marker=self._marker(n) if route == SUBMIT else None,
        )
        if fate is Fate.LAND and built.event_id is not None:
            self._landed[route].append(case)
        return [case]

    # --- positions ------------------------------------------------------------------------

    def _position_step(self, *, finish: bool = False) -> list[Case]:
        rng = self.rng
        if finish or (self._scenarios and rng.random() < 0.6):
            sc = self._scenarios[0] if finish else rng.choice(self._scenarios)
            case = sc.steps.pop(0)()
            if not sc.steps:
                self._scenarios.remove(sc)
            return [case]
        self._scenarios.append(self._scenario())
        return self._position_step()

    def _scenario(self) -> _Scenario:
        rng = self.rng
        route = self._route()
        n0 = self._next()
        key = f"fzp{self.tag}-{n0}"
        if rng.random() < 0.2:
            key = (key + "-" + self.values.text(30))[:100]
        self._keys[route].append(key)
        producer = self.values.text(50, plain=True)
        opened = self.build("position_open", n0, route, key=key)
        closed = self.build("position_close", self._next(), route, key=key)
        for built in (opened, closed):
            built.wire["producer"] = producer
            built.producer = producer
        _drop_entry(closed)
        entry = {name: opened.wire[name] for name, _ in tables.POSITION_ENTRY_COLUMNS}
        whole = dict(closed.wire)
        whole.update(entry)
        variant = rng.choice(
            (
                "open_close",
                "open_close",
                "open_only",
                "close_first",
                "close_first_whole",
                "second_open",
                "second_close",
                "redelivered",
                "same_id_other_content",
                "legs_first",
            )
        )
        if variant == "same_id_other_content" and route == SUBMIT:
            # In-process cases are told apart by a marker in the producer, and another producer
            # names another position (its own key space): this variant needs the stream.
            variant = "second_open"
        op = self._position_case(route, key, "open", opened, variant)
        cl = self._position_case(route, key, "close", closed, variant)
        cl_whole = self._position_case(route, key, "close", self._with(closed, whole), variant)
        steps: list[Callable[[], Case]]
        if variant == "open_close":
            steps = [op, cl]
        elif variant == "open_only":
            steps = [op]
        elif variant == "close_first":
            steps = [cl, op]
        elif variant == "close_first_whole":
            steps = [cl_whole, op]
        elif variant == "second_open":
            other = self.build("position_open", self._next(), route, key=key)
            other.wire["producer"] = producer
            steps = [op, self._position_case(route, key, "open", other, variant), cl]
        elif variant == "second_close":
            other = self.build("position_close", self._next(), route, key=key)
            other.wire["producer"] = producer
            _drop_entry(other)
            steps = [op, cl, self._position_case(route, key, "close", other, variant)]
        elif variant == "redelivered":
            steps = [op, op, cl, cl]
        elif variant == "same_id_other_content":
            changed = dict(opened.wire)
            size_kind = tables.PRICE
            wire_size, stored_size = self.values.numeric(size_kind)
            if stored_size == opened.expected["size"]:
                stored_size += Decimal("1")
                wire_size = str(stored_size)
            changed["size"] = wire_size
            other = self._with(opened, changed)
            if route == SUBMIT:
                other.producer = changed["producer"] = self._marker(self._next())
            other.expected["size"] = stored_size
            steps = [op, self._position_case(route, key, "open", other, variant), cl]
        else:  # legs_first: an order and a trade name the position before it exists
            steps = [self._leg(route, key, "order"), self._leg(route, key, "trade"), op, cl]
        return _Scenario(route, key, producer, steps)

    @staticmethod
    def _with(built: _Built, wire: dict[str, Any]) -> _Built:
        expected = dict(built.expected)
        return _Built(built.etype, wire, built.event_id, built.producer, built.time, expected)

    def _leg(self, route: str, key: str, etype: str) -> Callable[[], Case]:
        def make() -> Case:
            n = self._next()
            built = self.build(etype, n, route, key=key)
            return Case(
                n,
                route,
                "position",
                f"{etype}_before_open",
                self._encode(route, built.wire, built.expected),
                Fate.LAND,
                row=self._row(built),
                marker=self._marker(n) if route == SUBMIT else None,
            )

        return make

    def _position_case(
        self, route: str, key: str, slot: str, built: _Built, variant: str
    ) -> Callable[[], Case]:
        """A step that, when taken, sends ``built`` and decides its fate against the model.

        The payload is drawn once: a step taken twice (a redelivery) sends the same bytes.
        """
        # Bytes or text even in-process: a refused event's dead letter keeps only a raw payload.
        payload = self._encode(route, built.wire, built.expected, raw=True)
        assert built.event_id is not None
        values = {
            name: built.expected[name]
            for name, _ in (
                tables.POSITION_ENTRY_COLUMNS if slot == "open" else tables.POSITION_EXIT_COLUMNS
            )
        }
        pe = PositionEvent(key, slot, built.event_id, values)
        marker = self.marker_of(built) or None if route == SUBMIT else None
        first: list[int] = []

        def take() -> Case:
            n = self._next()
            standing = self.standing.setdefault((route, key), {})
            current = standing.get(slot)
            names = None
            if current is None:
                standing[slot] = pe
                fate = Fate.POSITION
            elif current.event_id == pe.event_id and current.values == pe.values:
                fate = Fate.REDELIVERY
            else:
                fate, names = Fate.CONFLICT, current.event_id
            case = Case(
                n,
                route,
                "position",
                f"{variant}:{slot}",
                payload,
                fate,
                position=pe,
                names=names,
                marker=marker,
                original=first[0] if first else None,
                description=f"position {key!r} {slot} event_id {pe.event_id!r}",
            )
            first.append(n)
            return case

        return take

    # --- repeats ------------------------------------------------------------------------

    def _redelivery(self) -> list[Case]:
        route = self._route()
        pool = self._landed[route]
        if not pool:
            return self._valid()
        orig = self.rng.choice(pool[-200:])
        n = self._next()
        return [
            Case(
                n,
                route,
                "redelivery",
                "identical",
                orig.payload,
                Fate.REDELIVERY,
                original=orig.n,
                marker=orig.marker,
                description=f"identical to #{orig.n}",
            )
        ]

    def _cross_route(self) -> list[Case]:
        """A stream event submitted in-process too, byte for byte: it lands once."""
        pool = self._landed[STREAM]
        if not pool:
            return self._valid()
        orig = self.rng.choice(pool[-200:])
        n = self._next()
        return [
            Case(
                n,
                SUBMIT,
                "redelivery",
                "stream_then_submit",
                orig.payload,
                Fate.REDELIVERY,
                original=orig.n,
                marker=None,
                description=f"#{orig.n} (sent to the stream) submitted in-process too",
            )
        ]

    def _conflict(self) -> list[Case]:
        """The event_id and time of an earlier event with one value changed."""
        rng = self.rng
        route = self._route()
        pool = self._landed[route]
        if not pool:
            return self._valid()
        orig = rng.choice(pool[-200:])
        assert orig.row is not None and orig.row.event_id is not None
        wire = _wire_of(orig.payload)
        if wire is None:
            return self._valid()
        spec = events.EVENT_TYPES[str(wire["type"])]
        numeric = [f for f in spec.fields if isinstance(f.kind, tables.Numeric) and f.required]
        f = rng.choice(numeric)
        assert isinstance(f.kind, tables.Numeric)
        while True:
            wire_value, stored = self.values.numeric(f.kind)
            if stored != orig.row.values[f.name]:
                break
        wire[f.name] = wire_value
        n = self._next()
        if route == SUBMIT:
            wire["producer"] = self._marker(n)
        payload = self.json.dumps(wire)  # bytes: a refused event's raw payload is kept
        return [
            Case(
                n,
                route,
                "conflict",
                f"{spec.name}_{f.name}_changed",
                payload,
                Fate.CONFLICT,
                names=orig.row.event_id,
                original=orig.n,
                marker=self._marker(n) if route == SUBMIT else None,
                description=(
                    f"event_id {orig.row.event_id!r} and time of #{orig.n}, {f.name} "
                    f"{orig.row.values[f.name]} -> {stored}"
                ),
            )
        ]

    def _other_time(self) -> list[Case]:
        """The event_id of an earlier event at another time: not a duplicate (a duplicate
        matches event_id and time), so it lands as a row of its own."""
        route = self._route()
        pool = self._landed[route]
        if not pool:
            return self._valid()
        orig = self.rng.choice(pool[-200:])
        assert orig.row is not None and orig.row.event_id is not None
        wire = _wire_of(orig.payload)
        if wire is None:
            return self._valid()
        n = self._next()
        time_field = events.EVENT_TYPES[str(wire["type"])].time_field
        wire[time_field], moment = self.values.time(self._moment(n))
        values = dict(orig.row.values)
        values[time_field] = moment
        if route == SUBMIT:
            wire["producer"] = values["producer"] = self._marker(n)
        return [
            Case(
                n,
                route,
                "valid",
                "same_event_id_other_time",
                self.json.dumps(wire),
                Fate.LAND,
                row=Row(orig.row.table, orig.row.event_id, moment, values),
                marker=self._marker(n) if route == SUBMIT else None,
                original=orig.n,
                description=f"event_id {orig.row.event_id!r} of #{orig.n} at another time",
            )
        ]

    def _collision(self) -> list[Case]:
        """An event without event_id sent to two streams under the same entry id: two rows."""
        n = self._next()
        etype = self.rng.choice(APPEND_TYPES)
        built = self.build(etype, n, STREAM)
        built.wire.pop("event_id", None)
        built.event_id = None
        payload = self.json.dumps(built.wire)
        first = Case(n, STREAM, "collision", etype, payload, Fate.LAND, row=self._row(built))
        twin = Case(
            self._next(),
            STREAM_B,
            "collision",
            etype,
            payload,
            Fate.LAND,
            row=self._row(built),
            original=n,
            description=f"#{n}'s payload in the second stream under the same entry id",
        )
        return [first, twin]

    # --- bad input ----------------------------------------------------------------------

    def _garbage(self) -> list[Case]:
        rng = self.rng
        route = self._route()
        n = self._next()
        marker = self._marker(n)
        roll = rng.random()
        name = "random_bytes"
        if roll < 0.4:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            if payload.strip() in (b"",) or payload[:1] in (b"{", b"["):
                payload = b"\xff" + payload
        elif roll < 0.7:
            name = "not_an_object"
            payload = rng.choice(
                (b"[]", b'"spread"', b"null", b"42", b"", b"{}", b"{", b'{"type"', b"true", b"  ")
            )
        else:
            name = "invalid_utf8_in_string"
            built = self.build(rng.choice(APPEND_TYPES), n, route)
            text = self.json.dumps(built.wire)
            payload = text.replace(b'"type"', b'"ty\xffpe"', 1)
        if route == SUBMIT:
            payload = marker.encode() + b" " + payload  # still not an event
        stream_field = b"event"
        if route != SUBMIT and rng.random() < 0.15:
            stream_field, name = b"evnt", "entry_without_event_field"
        return [
            Case(
                n,
                route,
                "bytes",
                name,
                payload,
                Fate.DEAD,
                marker=marker if route == SUBMIT else None,
                stream_field=stream_field,
            )
        ]

    def _mutation(self) -> list[Case]:
        rng = self.rng
        route = self._route()
        for _ in range(20):
            n = self._next()
            etype = rng.choice(ALL_TYPES)
            key = f"fzx{self.tag}-{n}" if etype.startswith("position_") else None
            built = self.build(etype, n, route, key=key)
            mutate = rng.choice(MUTATIONS)
            result = mutate(self, built, route)
            if result is None:
                continue
            payload, name, description = result
            if route == SUBMIT:
                payload = self._submit_form(payload, n)
                if payload is None:
                    continue
            return [
                Case(
                    n,
                    route,
                    "mutation",
                    name,
                    payload,
                    Fate.DEAD,
                    description=description,
                    marker=self._marker(n) if route == SUBMIT else None,
                )
            ]
        return self._garbage()

    def _submit_form(self, payload: Any, n: int) -> Any:
        """Mutated payloads for submit must carry the case's marker (to find its dead letter)."""
        marker = self._marker(n)
        if isinstance(payload, bytes):
            if marker.encode() not in payload[:4000]:
                return None
            return payload if self.rng.random() < 0.7 else payload.decode("utf-8", "surrogatepass")
        if isinstance(payload, dict):
            found = any(isinstance(v, str) and marker in v for v in payload.values())
            return payload if found else None
        return None

    # --- what the campaign reads back -----------------------------------------------------

    def position_rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The positions table the model expects: per (route, key), every column it sets."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for (route, key), standing in self.standing.items():
            opened = standing.get("open")
            closed = standing.get("close")
            if opened is None:
                continue  # every scenario sends a valid open; a close alone would wait
            row: dict[str, Any] = dict(opened.values)
            row["open_event_id"] = opened.event_id
            if closed is not None:
                row.update(closed.values)
                row["close_event_id"] = closed.event_id
                row["status"] = "CLOSED"
            else:
                for name, _ in tables.POSITION_EXIT_COLUMNS:
                    row[name] = None
                row["close_event_id"] = None
                row["status"] = "OPEN"
            out[(route, key)] = row
        return out


def _drop_entry(built: _Built) -> None:
    """A close without the entry columns (a close that repeats them gets the open's own)."""
    for name, _ in tables.POSITION_ENTRY_COLUMNS:
        built.wire.pop(name, None)
        built.expected.pop(name, None)


def _wire_of(payload: Any) -> dict[str, Any] | None:
    """The wire dict of a valid case's payload (numbers kept as ``Raw``)."""
    if isinstance(payload, Mapping):
        out: dict[str, Any] = {}
        for k, v in payload.items():
            if isinstance(v, Decimal | int | float) and not isinstance(v, bool):
                out[k] = Raw(str(v) if not isinstance(v, float) else repr(v))
            elif isinstance(v, dt.datetime):
                out[k] = v.isoformat()
            else:
                out[k] = v
        return out
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    try:
        decoded = events.decode_json(data.strip())
    except Exception:  # noqa: BLE001 - a payload that no longer decodes is simply not reused
        return None
    if not isinstance(decoded, dict):
        return None
    return {k: (Raw(v) if isinstance(v, events.JsonNumber) else v) for k, v in decoded.items()}


# --- mutations: each returns (payload, name, description) or None when it does not apply -------

Mutation = Callable[["Generator", _Built, str], "tuple[Any, str, str] | None"]


def _pick(
    g: Generator, built: _Built, kinds: tuple[type, ...], *, required: bool = False
) -> str | None:
    spec = events.EVENT_TYPES[built.etype]
    names = [
        f.name
        for f in spec.fields
        if isinstance(f.kind, kinds) and (f.required or not required) and f.name != "position_key"
    ]
    return g.rng.choice(names) if names else None


def _as_bytes(g: Generator, wire: dict[str, Any]) -> bytes:
    return g.json.dumps(wire)


def m_naive_time(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    name = events.EVENT_TYPES[b.etype].time_field
    naive = re.sub(r"([Zz]|[+-][0-9]{2}:[0-9]{2})\Z", "", str(b.wire[name]))
    if route == SUBMIT and g.rng.random() < 0.5:
        wire = g._to_python(b.wire, b.expected)
        wire[name] = dt.datetime(2025, 11, 15, 3, 40, 15)  # noqa: DTZ001 - the point of the test
        return wire, "naive_datetime_object", f"{name} is a naive datetime"
    b.wire[name] = naive
    return _as_bytes(g, b.wire), "naive_time", f"{name}={naive!r}"


_BAD_TIMES: Final = (
    "2025-02-30T00:00:00Z",
    "2025-11-15T24:00:00Z",
    "2025-11-15",
    "2025-11-15T03:40Z",
    "2025-11-15T03:40:15+25:00",
    "0000-01-01T00:00:00Z",
    "",
    "2025-11-15T03:40:15.Z",
    "\uff12\uff10\uff12\uff15-11-15T03:40:15Z",  # full-width digits
    "9999-12-31T23:59:59.9999999Z",
    "2025-11-15T03:40:15Z\n",
    "now",
)


def m_bad_time(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    spec = events.EVENT_TYPES[b.etype]
    name = spec.time_field
    value: Any = g.rng.choice((*_BAD_TIMES, Raw("1731642015"), True, Raw("[]")))
    b.wire[name] = value
    return _as_bytes(g, b.wire), "bad_time", f"{name}={value!r}"


def m_old_time(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    table = TABLE_OF_TYPE.get(b.etype)
    days = g.retention_days.get(table or "")
    if not days:
        return None
    old = b.time - dt.timedelta(days=days + 30)
    wire, _ = g.values.time(old.replace(microsecond=0))
    b.wire["timestamp"] = wire
    return (
        _as_bytes(g, b.wire),
        "older_than_retention",
        f"{table} timestamp {wire} ({days + 30} days old; retention {days} days)",
    )


_BAD_NUMBERS: Final = (
    "NaN", "nan", "Infinity", "-Infinity", "inf", "1e5", " 1.5", "1.5 ", "+1.5", "1,5", ".5", "5.",
    "0x1F", "١٢٣", "1_000", "", "--1", "1.2.3", "½", "1e-2", "sNaN",
)  # fmt: skip


def m_bad_number(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    name = _pick(g, b, (tables.Numeric,), required=True)
    if name is None:
        return None
    value: Any = g.rng.choice(_BAD_NUMBERS)
    if route == SUBMIT and g.rng.random() < 0.4:
        wire = g._to_python(b.wire, b.expected)
        obj = g.rng.choice(
            (Decimal("NaN"), float("nan"), float("inf"), Decimal("-Infinity"), "NaN")
        )
        wire[name] = obj
        return wire, "nan_object", f"{name}={obj!r}"
    b.wire[name] = value
    return _as_bytes(g, b.wire), "bad_number", f"{name}={value!r}"


def m_huge_number(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    name = _pick(g, b, (tables.Numeric,), required=True)
    if name is None:
        return None
    kind = dict(tables_of(b.etype))[name]
    assert isinstance(kind, tables.Numeric)
    digits = kind.precision - kind.scale
    choices: tuple[Any, ...] = (
        Raw("9" * (digits + 1)),
        "1" + "0" * digits,
        Raw(f"1e{digits}"),
        Raw("123456789012345678901234567890.5"),
        Raw("1e400"),
        Raw("-1e99999999999999999999"),
        "9" * digits + ".999999999",  # rounds up to one digit too many
        Raw("9" * 5000),
    )
    value = g.rng.choice(choices)
    if route == SUBMIT and g.rng.random() < 0.3:
        wire = g._to_python(b.wire, b.expected)
        wire[name] = 10 ** (digits + g.rng.choice((0, 5, 50)))
        return wire, "huge_int_object", f"{name}=10**{digits}+"
    b.wire[name] = value
    return _as_bytes(g, b.wire), "huge_number", f"{name}={str(value)[:60]!r}"


def tables_of(etype: str) -> list[tuple[str, tables.ColumnType]]:
    """(field, kind) of an event type."""
    return [(f.name, f.kind) for f in events.EVENT_TYPES[etype].fields]


def m_wrong_type(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    spec = events.EVENT_TYPES[b.etype]
    f = g.rng.choice([f for f in spec.fields if f.required] or list(spec.fields))
    rng = g.rng
    if isinstance(f.kind, tables.Numeric):
        value: Any = rng.choice(
            (True, False, Raw("[]"), Raw("{}"), Raw('["1.5"]'), Raw('{"v": 1}'))
        )
    elif isinstance(f.kind, tables.Varchar):
        value = rng.choice((Raw("123"), True, Raw("[]"), Raw('{"a": 1}'), Raw("1.5")))
    elif isinstance(f.kind, tables.Boolean):
        value = rng.choice(("true", Raw("1"), Raw("0"), "yes", Raw("[]")))
    else:
        value = rng.choice((Raw("1.5"), True, Raw("{}")))
    b.wire[f.name] = value
    return _as_bytes(g, b.wire), "wrong_type", f"{f.name}={value!r}"


def m_string_limits(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    spec = events.EVENT_TYPES[b.etype]
    fields = [f for f in spec.fields if isinstance(f.kind, tables.Varchar) and f.required]
    if not fields:
        return None
    f = g.rng.choice(fields)
    assert isinstance(f.kind, tables.Varchar)
    choice = g.rng.choice(("empty", "too_long", "nul", "lone_surrogate", "too_long_emoji"))
    value = {
        "empty": "",
        "too_long": "x" * (f.kind.length + 1),
        "nul": "a\x00b",
        "lone_surrogate": "a\ud800b",
        "too_long_emoji": "😀" * (f.kind.length + 1),
    }[choice]
    if f.name == "component" and choice != "too_long":
        value = value or ""
    b.wire[f.name] = value
    if route == SUBMIT and choice == "lone_surrogate" and g.rng.random() < 0.5:
        return dict(b.wire), "lone_surrogate_object", f"{f.name} holds a lone surrogate"
    return _as_bytes(g, b.wire), f"string_{choice}", f"{f.name}={value[:20]!r}"


_FIELD_NAMES: Final = (
    "extra",
    "Symbol",
    "symbol ",
    "status",
    "__proto__",
    "a" * 300,
    "한국어",
    "",
    "\x1b[31mred",
    f"x\n{FORGE} 2026-01-01 00:00:00,000 CRITICAL ingestd action=crash forged line",
    f"x\r{FORGE} carriage return",
    f"x\u2028{FORGE} line separator",
)


def m_unknown_field(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    name = g.rng.choice(_FIELD_NAMES)
    if name in events.EVENT_TYPES[b.etype].field_names:
        return None
    b.wire[name] = g.rng.choice(("x", Raw("1"), None, True, Raw("[]")))
    return _as_bytes(g, b.wire), "unknown_field", f"field {name[:60]!r}"


def m_forged_value(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    """A log line forged through a value that makes the event bad (an unknown type)."""
    b.wire["type"] = f"spread\n{FORGE} 2026-01-01 00:00:00,000 INFO ingestd action=started forged"
    return _as_bytes(g, b.wire), "forged_type", "type with a line break and a fake log line"


def m_missing(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    spec = events.EVENT_TYPES[b.etype]
    names = [f.name for f in spec.fields if f.required] + ["type"]
    name = g.rng.choice(names)
    del b.wire[name]
    if g.rng.random() < 0.3 and name != "type":
        b.wire[name] = None
        return _as_bytes(g, b.wire), "required_null", f"{name} is null"
    return _as_bytes(g, b.wire), "required_missing", f"{name} is missing"


def m_type_field(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    value: Any = g.rng.choice(
        ("candle", "SPREAD", "spread ", Raw("1"), None, Raw("[]"), "position", "", "spread\x00")
    )
    b.wire["type"] = value
    return _as_bytes(g, b.wire), "bad_type", f"type={value!r}"


def m_envelope(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    rng = g.rng
    field = rng.choice(("event_id", "producer"))
    other = "producer" if field == "event_id" else "event_id"
    marker = g.marker_of(b)
    if route == SUBMIT:
        b.wire[other] = marker  # the marker stays findable whatever happens to this field
    limit = 100 if field == "event_id" else 50
    value: Any = rng.choice(("", "m" + "x" * limit, Raw("42"), True, "a\x00", Raw("[]")))
    b.wire[field] = value
    return _as_bytes(g, b.wire), f"bad_{field}", f"{field}={str(value)[:30]!r}"


def m_nesting(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    rng = g.rng
    depth = rng.choice((64, 200, 1000, 20_000, 100_000))
    name = _pick(g, b, (tables.Varchar, tables.Numeric), required=True) or "type"
    if route == SUBMIT and rng.random() < 0.4:
        nested: Any = []
        for _ in range(min(depth, 50_000)):
            nested = [nested]
        wire = dict(b.wire)
        wire[name] = nested
        return wire, "deep_nesting_object", f"{name} nested {min(depth, 50_000)} lists deep"
    if rng.random() < 0.5:
        b.wire[name] = Raw("[" * depth + "]" * depth)
        return _as_bytes(g, b.wire), "deep_nesting", f"{name} nested {depth} arrays deep"
    b.wire[name] = Raw('{"a":' * depth + "1" + "}" * depth)
    return _as_bytes(g, b.wire), "deep_nesting", f"{name} nested {depth} objects deep"


def m_oversize(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    if not g.big_payloads or g.rng.random() < 0.7:
        return None  # 1 MiB each: rare
    payload = _as_bytes(g, b.wire)
    size = g.max_event_bytes + g.rng.choice((1, 1, 1000, 500_000))
    padded = payload[:-1] + b" " * (size - len(payload)) + b"}"
    return padded, "oversize", f"a valid event padded with whitespace to {size} bytes"


def m_reserved_component(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    if b.etype != "heartbeat":
        return None
    b.wire["component"] = g.rng.choice(("ingestd", "ingestd:e2e-1", "ingestd:"))
    return _as_bytes(g, b.wire), "reserved_component", f"component={b.wire['component']!r}"


def m_rounding_overflow(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    name = _pick(g, b, (tables.Numeric,), required=True)
    if name is None:
        return None
    kind = dict(tables_of(b.etype))[name]
    assert isinstance(kind, tables.Numeric)
    text = "9" * (kind.precision - kind.scale) + "." + "9" * (kind.scale + 1)
    b.wire[name] = g.rng.choice((text, Raw(text)))
    return (
        _as_bytes(g, b.wire),
        "rounding_overflow",
        f"{name}={text} rounds past NUMERIC({kind.precision}, {kind.scale})",
    )


def m_position_status(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    if not b.etype.startswith("position_"):
        return None
    b.wire["status"] = g.rng.choice(("OPEN", "CLOSED"))
    return _as_bytes(g, b.wire), "position_with_status", "a position event that sends status"


def m_non_str_key(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    if route != SUBMIT:
        return None
    wire: dict[Any, Any] = dict(b.wire)
    wire[g.rng.choice((1, None, ("a",), 2.5))] = "x"
    return wire, "non_str_key", "a mapping with a key that is not a string"


def m_odd_object(g: Generator, b: _Built, route: str) -> tuple[Any, str, str] | None:
    if route != SUBMIT:
        return None
    name = _pick(g, b, (tables.Varchar, tables.Numeric), required=True)
    if name is None:
        return None
    wire = g._to_python(b.wire, b.expected)
    value = g.rng.choice((b"bytes", {1, 2}, object(), bytearray(b"x"), complex(1, 2)))
    wire[name] = value
    return wire, "odd_object", f"{name} is a {type(value).__name__}"


MUTATIONS: Final[tuple[Mutation, ...]] = (
    m_naive_time,
    m_bad_time,
    m_old_time,
    m_old_time,
    m_bad_number,
    m_huge_number,
    m_wrong_type,
    m_string_limits,
    m_unknown_field,
    m_unknown_field,
    m_forged_value,
    m_missing,
    m_type_field,
    m_envelope,
    m_nesting,
    m_oversize,
    m_reserved_component,
    m_rounding_overflow,
    m_position_status,
    m_non_str_key,
    m_odd_object,
)
