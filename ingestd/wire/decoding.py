"""Decoding one wire event: the typed fast path first, the general rules for the rest.

The wire format is three modules in one direction, with no circle: ``ingestd.wire.events`` defines
the event types and the general decoder (the definition of the rules), ``ingestd.wire.fastpath``
builds the typed decoder from those definitions, and this module, the entry point every source
uses, tries the fast path and falls back to the general one.
"""

from __future__ import annotations

from ingestd.errors import InvalidEvent
from ingestd.wire import events, fastpath


def decode_event(
    payload: bytes | str,
    *,
    max_bytes: int,
    default_event_id: str | None = None,
    max_depth: int = events.DEFAULT_MAX_DEPTH,
    retention: events.Retention | None = None,
) -> events.Event:
    """Size-check, decode and validate one wire event (and, given ``retention``, its age)."""
    # A str is measured in UTF-8 bytes, as it would travel; a character is at most 4 of them.
    size = len(payload)
    if isinstance(payload, str) and size * 4 > max_bytes:
        size = len(payload.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise InvalidEvent(f"event is {size} bytes, larger than max_event_bytes={max_bytes}")
    try:
        # Most events have the usual shape and take the typed decoder (``ingestd.wire.fastpath``);
        # the
        # rest, and every error, take the general path, which is the definition of the rules.
        event = fastpath.decode(payload, default_event_id)
        if event is None:
            event = events.parse_event(
                events.decode_json(payload, max_depth=max_depth), default_event_id=default_event_id
            )
    except InvalidEvent:
        raise
    except Exception as exc:
        raise events.internal_error(exc) from exc
    if retention is not None:
        retention.check(event)
    return event
