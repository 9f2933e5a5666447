"""A small feed that exercises every statement ingestd issues (so that a missing grant shows).

Spreads and FX (COPY), an order and a trade before their position exists (then linked by
UPDATE), a close before its open (parked, then applied and DELETEd from the parking table), a
position opened and closed in order, a heartbeat, an event sent twice (the staging merge through
a TEMP table) and malformed payloads (dead letters).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
from typing import Any

from ingestd import Service
from ingestd.tools.simulate import Simulator
from ingestd.wire.events import utc_iso

START = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
MALFORMED: tuple[bytes, ...] = (
    b"{not json",
    b'{"type": "fx_rate", "event_id": "bad-naive", "pair": "USDKRW", "rate": "1.0",'
    b' "timestamp": "2025-11-15T03:40:15"}',
)


def _at(seconds: float) -> str:
    return utc_iso(START + dt.timedelta(seconds=seconds))


@dataclasses.dataclass(frozen=True)
class Feed:
    """``bulk`` may go in any order and at once; ``ordered`` one by one, after it."""

    bulk: list[dict[str, Any]]
    ordered: list[dict[str, Any]]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Everything sent, the repeated event twice."""
        return [*self.bulk, *self.ordered]


async def submit_all(service: Service, feed: Feed) -> None:
    """The bulk concurrently, then the ordered events each after the previous one committed."""
    await asyncio.gather(*(service.submit(ev) for ev in feed.bulk))
    for ev in feed.ordered:
        await service.submit(ev)


def mixed_feed(simulated: int = 600) -> Feed:
    """A simulated feed plus the hand-made events above (one is repeated on purpose)."""
    sim = Simulator(seed=21, symbols=("BTC", "ETH"), start=START)
    events = list(itertools.islice(sim.events(), simulated))
    late_key, early_key = "mix_pos_late_open", "mix_pos_in_order"
    entry = {
        "symbol": "BTC",
        "direction": "upbit_short_binance_long",
        "size": "0.01000000",
        "entry_upbit_price": "140000000.00",
        "entry_binance_price": "98000.00000000",
        "entry_spread_pct": "3.1000",
    }
    close = {
        "exit_upbit_price": "139000000.00",
        "exit_binance_price": "98100.00000000",
        "exit_spread_pct": "0.9000",
        "pnl_krw": "12345.67",
        "pnl_pct": "0.8800",
    }
    hand_made: list[dict[str, Any]] = [
        # order and trade first: position_id is filled in once the open lands
        {
            "type": "order", "event_id": "mix-ord-1", "producer": "paper",
            "position_key": late_key, "symbol": "BTC", "venue": "upbit", "side": "sell",
            "qty": "0.01000000", "price_theoretical": "140000000.00000000",
            "leg_id": f"{late_key}_leg_0", "timestamp": _at(1),
        },
        {
            "type": "trade", "event_id": "mix-tr-1", "producer": "paper",
            "position_key": late_key, "symbol": "BTC", "direction": "upbit_short_binance_long",
            "size": "0.01000000", "side": "OPEN", "timestamp": _at(1.5),
        },
        # the close before its open: parked in position_closes_pending
        {
            "type": "position_close", "event_id": "mix-pc-1", "producer": "paper",
            "position_key": late_key, **close, "timestamp_close": _at(3),
        },
        {
            "type": "position_open", "event_id": "mix-po-1", "producer": "paper",
            "position_key": late_key, **entry, "timestamp_open": _at(0.5),
        },
        {
            "type": "position_open", "event_id": "mix-po-2", "producer": "paper",
            "position_key": early_key, **entry, "symbol": "ETH", "timestamp_open": _at(4),
        },
        {
            "type": "position_close", "event_id": "mix-pc-2", "producer": "paper",
            "position_key": early_key, **close, "timestamp_close": _at(5),
        },
        {
            "type": "position_open", "event_id": "mix-po-3", "producer": "paper",
            "position_key": "mix_pos_stays_open", **entry, "timestamp_open": _at(5.5),
        },
        {
            "type": "heartbeat", "event_id": "mix-hb-1", "producer": "paper",
            "component": "paper", "timestamp": _at(6),
        },
        {
            "type": "fx_rate", "event_id": "mix-fx-1", "producer": "collector",
            "pair": "USDKRW", "rate": "1390.12345678", "source": "test", "timestamp": _at(7),
        },
    ]  # fmt: skip
    # The same FX event once more, later: the staging merge (TEMP table, ON CONFLICT) lands it once.
    return Feed(events, [*hand_made, hand_made[-1]])
