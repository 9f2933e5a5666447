"""Items as a source builds them, for the pipeline's sink and mirror tests (shared helpers)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ingestd.daemon.batching import Acknowledger, Item
from ingestd.daemon.deadletters import make_dead_letter
from ingestd.wire import decoding

MAX_BYTES = 65_536


def item(event: dict[str, Any], source: Acknowledger, *, token: Any = None) -> Item:
    """An Item from a wire event, decoded as a source decodes it."""
    raw = orjson.dumps(event)
    ev = decoding.decode_event(raw, max_bytes=MAX_BYTES)
    return Item(ev, None, source, token, raw, time.monotonic())


def dead_item(raw: bytes, error: str, source: Acknowledger, *, token: Any) -> Item:
    """A dead-letter Item, as a source builds it for bad input."""
    letter = make_dead_letter(raw, error, source=source.name, dedup_key=f"{source.name}:{token}")
    return Item(None, letter, source, token, raw, time.monotonic())
