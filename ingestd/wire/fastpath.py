"""The typed fast path of event decoding: the usual events, decoded and checked in C.

Most events a producer sends have one shape: decimals as strings within their column's digits,
times in the usual RFC 3339 form, no unknown fields. For those, msgspec decodes the JSON straight
into a typed struct per event type (a tagged union on ``type``) and checks lengths, patterns,
required fields and unknown fields while it parses, with no intermediate dict. This module only
ever accepts a subset of what ``ingestd.wire.events.parse_event`` accepts, giving the same event:
anything else (a JSON number for a decimal, digits to round, a rarer time form, an error of any
kind) is declined here (``decode`` returns None) and goes through ``parse_event``, which defines
the rules and words the errors. ``tests/unit/test_fastpath.py`` holds the two paths to that.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable
from typing import Annotated, Any, Final, Union

import msgspec

from ingestd.errors import InvalidEvent
from ingestd.wire import events, keys, tables

_Converter = Callable[[Any], tuple[dict[str, str | None], dt.datetime]]


def _annotation(kind: tables.ColumnType) -> Any:
    # Lengths are checked by msgspec; patterns in the converter below, where re's C matcher is
    # called directly (msgspec's pattern checks cost about twice as much per field).
    if isinstance(kind, tables.Varchar):
        return Annotated[str, msgspec.Meta(min_length=1, max_length=kind.length)]
    if isinstance(kind, tables.Boolean):
        return bool
    return str


_EVENT_ID: Final = Annotated[str, msgspec.Meta(min_length=1, max_length=tables.EVENT_ID.length)]
_PRODUCER: Final = Annotated[str, msgspec.Meta(min_length=1, max_length=tables.PRODUCER.length)]
_SEQ: Final = Annotated[int, msgspec.Meta(ge=0, le=events.MAX_SEQ)]
_SESSION: Final = Annotated[str, msgspec.Meta(min_length=1, max_length=events.SESSION_LEN)]


def _struct(spec: events.EventType) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        ("event_id", _EVENT_ID | None, None),
        ("producer", _PRODUCER | None, None),
        ("seq", _SEQ | None, None),
        ("session", _SESSION | None, None),
    ]
    for f in spec.fields:
        annotation = _annotation(f.kind)
        if f.required:
            fields.append((f.name, annotation))
        else:
            fields.append((f.name, annotation | None, None))
    return msgspec.defstruct(
        f"Fast_{spec.name}",
        fields,
        tag=spec.name,
        tag_field="type",
        forbid_unknown_fields=True,
        kw_only=True,
    )


class _Decline(Exception):
    """Not for the fast path (e.g. a NUL in a text field): the general path decides."""


def _converter(spec: events.EventType) -> _Converter:
    """``convert(struct) -> (values, event time)``, generated as straight-line code."""
    namespace: dict[str, Any] = {"common_time": events.common_time, "_Decline": _Decline}
    body: list[str] = []
    for n, f in enumerate(spec.fields):
        attr = f"o.{f.name}"
        kind = f.kind
        if isinstance(kind, tables.Timestamptz):
            target = "moment" if f.name == spec.time_field else "_"
            namespace[f"shape_{n}"] = re.compile(events.RFC3339_COMMON_PATTERN).match
            body += [
                f"if {attr} is None:",
                f"    v{n} = None",
                f"elif shape_{n}({attr}) is None:",
                "    raise _Decline",
                "else:",
                f"    v{n}, {target} = common_time({attr}, {f.name!r})",
            ]
        elif isinstance(kind, tables.Numeric):
            namespace[f"fits_{n}"] = re.compile(events.fits_pattern(kind)).match
            body += [
                f"v{n} = {attr}",
                f"if v{n} is not None and fits_{n}(v{n}) is None:",
                "    raise _Decline",
            ]
        elif isinstance(kind, tables.Boolean):
            default = "'false'" if (spec.name, f.name) == ("spread", "is_opportunity") else "None"
            body.append(f"v{n} = {default} if {attr} is None else ('true' if {attr} else 'false')")
        elif isinstance(kind, tables.Varchar):
            body += [
                f"v{n} = {attr}",
                f"if v{n} is not None and '\\x00' in v{n}:",
                "    raise _Decline",
            ]
        else:
            body.append(f"v{n} = {attr}")
    values = ", ".join(f"{f.name!r}: v{n}" for n, f in enumerate(spec.fields))
    body.append(f"return {{{values}}}, moment")
    source = "def convert(o):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, f"<ingestd fast path {spec.name}>", "exec"), namespace)  # noqa: S102
    convert: _Converter = namespace["convert"]
    return convert


@dataclasses.dataclass(frozen=True, slots=True)
class _Fast:
    spec: events.EventType
    convert: _Converter


_TYPES: Final = {spec.name: spec for spec in events.EVENT_TYPES.values()}
_STRUCTS: Final = {name: _struct(spec) for name, spec in _TYPES.items()}
_BY_STRUCT: Final = {_STRUCTS[name]: _Fast(spec, _converter(spec)) for name, spec in _TYPES.items()}
_DECODER: Final = msgspec.json.Decoder(Union[tuple(_STRUCTS.values())])  # noqa: UP007


def decode(payload: bytes | str, default_event_id: str | None) -> events.Event | None:
    """The event, if ``payload`` has the usual shape and is valid; None to take the general path.

    Never raises for bad input: every refusal is the general path's to word.
    """
    try:
        obj = _DECODER.decode(payload)
        fast = _BY_STRUCT[type(obj)]
        values, moment = fast.convert(obj)
    except (msgspec.ValidationError, msgspec.DecodeError, _Decline, InvalidEvent):
        return None
    except RecursionError:
        # A deep value before the "type" tag, skipped while the tag is looked for: the general
        # path refuses it with the nesting limit's reason.
        return None
    spec = fast.spec
    if spec.name == "heartbeat" and keys.is_reserved_component(str(values["component"])):
        return None
    producer: str | None = obj.producer
    event_id: str | None = obj.event_id
    if event_id is None:
        event_id = default_event_id or events.content_event_id(spec.name, producer, values)
    if "\x00" in event_id or (producer is not None and "\x00" in producer):
        return None
    try:
        events.complete(spec.name, values, moment)
    except InvalidEvent:
        return None
    session: str | None = obj.session
    if session is not None and "\x00" in session:
        return None
    return events.Event(spec.name, event_id, producer, moment, values, spec.table, obj.seq, session)
