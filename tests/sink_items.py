"""Events and items as the sink tests build them: wire payloads of each type, an acknowledger that
remembers, and items decoded as a source decodes them (shared by the sink, maintenance, roles,
scheduler, gaps and write-once tests)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.deadletters import make_dead_letter
from ingestd.wire import decoding
from tests.samples import POSITION_ENTRY, SPREAD_PRICES, position_exit

MAX_BYTES = 1 << 20
T0 = "2025-11-15T03:40:15.123Z"


# --- a small acknowledger and item builders --------------------------------


class Source:
    """A test Acknowledger: remembers acknowledgements; keys dead letters by token."""

    def __init__(self, name: str = "test") -> None:
        self.name = name
        self.acked: list[tuple[Sequence[Item], BatchOutcome]] = []

    async def acknowledge(self, items: Sequence[Item], outcome: BatchOutcome) -> None:
        """Record the acknowledged batch."""
        self.acked.append((items, outcome))

    def dead_letter_key(self, item: Item) -> str | None:
        """Keyed like stream entries when a token is given."""
        return None if item.token is None else f"{self.name}:{item.token}"


SRC = Source()


def wire(obj: dict[str, Any], **numbers: str) -> bytes:
    """JSON bytes of ``obj`` plus fields written as literal JSON numbers (never via a float)."""
    text = orjson.dumps(obj)
    extra = b"".join(b',"%s":%s' % (k.encode(), v.encode()) for k, v in numbers.items())
    return text[:-1] + extra + b"}"


def item(obj: dict[str, Any] | bytes, *, token: Any = None, source: Source = SRC) -> Item:
    """An Item built from a wire payload, as a source builds it."""
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    ev = decoding.decode_event(raw, max_bytes=MAX_BYTES, default_event_id=None)
    return Item(ev, None, source, token, raw, time.monotonic())


def dead_item(raw: bytes | str, error: str, *, dedup_key: str | None) -> Item:
    """A dead-letter Item, as a source builds it for bad input."""
    dl = make_dead_letter(raw, error, source=SRC.name, dedup_key=dedup_key)
    return Item(None, dl, SRC, None, raw, time.monotonic())


def spread(eid: str, symbol: str = "BTC", ts: str = T0, **kw: Any) -> dict[str, Any]:
    """A spread event."""
    return {
        "type": "spread",
        "event_id": eid,
        "producer": "collector",
        **SPREAD_PRICES,
        "symbol": symbol,
        "is_opportunity": True,
        "timestamp": ts,
        **kw,
    }


def fx(eid: str, rate: str = "1385.12345678", ts: str = T0, pair: str = "USDKRW") -> dict[str, Any]:
    """An fx_rate event."""
    return {
        "type": "fx_rate",
        "event_id": eid,
        "producer": "collector",
        "pair": pair,
        "rate": rate,
        "source": "upbit",
        "timestamp": ts,
    }


def order(eid: str, key: str | None, symbol: str = "BTC", ts: str = T0) -> dict[str, Any]:
    """An order leg; ``key`` None means an order that belongs to no position."""
    obj: dict[str, Any] = {
        "type": "order",
        "event_id": eid,
        "producer": "paper",
        "symbol": symbol,
        "venue": "upbit",
        "side": "buy",
        "qty": "0.01",
        "price_theoretical": "140000000.5",
        "price_effective": "140010000.25",
        "slippage_bps": "0.71",
        "leg_id": f"{key or 'x'}_leg_0",
        "timestamp": ts,
    }
    if key is not None:
        obj["position_key"] = key
    return obj


def trade(eid: str, key: str | None, symbol: str = "BTC", ts: str = T0) -> dict[str, Any]:
    """A trade."""
    obj: dict[str, Any] = {
        "type": "trade",
        "event_id": eid,
        "producer": "paper",
        "symbol": symbol,
        "direction": "upbit_short_binance_long",
        "size": "0.01",
        "side": "OPEN",
        "price_upbit": "140000000",
        "price_binance": "98000.1",
        "timestamp": ts,
    }
    if key is not None:
        obj["position_key"] = key
    return obj


ENTRY = POSITION_ENTRY
EXIT = position_exit()
# Other exit values than EXIT: a second, different close of the same position.
EXIT_B = {
    "exit_upbit_price": "120000000.00",
    "exit_binance_price": "90000.5",
    "exit_spread_pct": "-1.0000",
    "pnl_krw": "-99999.99",
    "pnl_pct": "-7.5000",
    "timestamp_close": "2025-11-15T05:00:00Z",
}


def pos_open(key: str, symbol: str = "BTC", eid: str | None = None) -> dict[str, Any]:
    """A position_open event."""
    return {
        "type": "position_open",
        "event_id": eid or f"open-{key}",
        "producer": "paper",
        "position_key": key,
        "symbol": symbol,
        **ENTRY,
    }


def pos_close(
    key: str, symbol: str = "BTC", *, with_entry: bool = False, eid: str | None = None
) -> dict[str, Any]:
    """A position_close event, optionally repeating the entry columns."""
    obj: dict[str, Any] = {
        "type": "position_close",
        "event_id": eid or f"close-{key}",
        "producer": "paper",
        "position_key": key,
        **EXIT,
    }
    if with_entry:
        obj.update(symbol=symbol, **ENTRY)
    return obj


def heartbeat(component: str = "collector", ts: str = T0) -> dict[str, Any]:
    """A heartbeat."""
    return {
        "type": "heartbeat",
        "event_id": f"hb-{uuid.uuid4().hex}",
        "component": component,
        "timestamp": ts,
    }


def tampered(obj: dict[str, Any], **values: str) -> Item:
    """A valid event whose validated values are then changed behind the validator's back."""
    it = item(obj)
    assert it.event is not None
    it.event.values.update(values)
    return it
