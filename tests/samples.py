"""Sample data with real values and exact decimals: model instances and CSV text for the storage
and CSV tests, and the parts of wire events (JSON mappings) that many tests build alike."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from ingestd.producer.storage.models import FxRate, OrderLeg, Position, SpreadOpportunity, Trade
from ingestd.wire.events import utc_iso

T0 = dt.datetime(2025, 11, 15, 3, 40, 15, 123000, tzinfo=dt.UTC)

SPREAD_HEADER = (
    "symbol,upbit_price,binance_price,binance_price_krw,spread_pct,net_spread_pct,"
    "is_opportunity,timestamp"
)
POSITION_HEADER = (
    "position_key,symbol,direction,size,entry_upbit_price,entry_binance_price,entry_spread_pct,"
    "exit_upbit_price,exit_binance_price,exit_spread_pct,pnl_krw,pnl_pct,status,"
    "timestamp_open,timestamp_close"
)


def at(seconds: float) -> dt.datetime:
    """T0 plus some seconds."""
    return T0 + dt.timedelta(seconds=seconds)


def spread(i: int, symbol: str = "BTC") -> SpreadOpportunity:
    """A spread snapshot whose values depend on ``i``."""
    return SpreadOpportunity(
        symbol=symbol,
        upbit_price=D("140123456.12") + i,
        binance_price=D("98012.12345678"),
        binance_price_krw=D("135800000.55"),
        spread_pct=D("3.1836"),
        net_spread_pct=D("2.9836") - D(i) / 10000,
        is_opportunity=i % 2 == 0,
        timestamp=at(i),
    )


def fx_rate(i: int, pair: str = "USDKRW") -> FxRate:
    """An FX rate."""
    return FxRate(pair=pair, rate=D("1385.5") + D(i) / 100, source="upbit", timestamp=at(i))


def position(key: str = "pos_001", i: int = 0) -> Position:
    """An OPEN position."""
    return Position(
        position_key=key,
        symbol="BTC",
        direction="upbit_short_binance_long",
        size=D("0.01"),
        entry_upbit_price=D("140123456.12"),
        entry_binance_price=D("98012.12345678"),
        entry_spread_pct=D("3.1836"),
        timestamp_open=at(i),
    )


def closed(pos: Position, i: int = 60) -> Position:
    """``pos``, CLOSED."""
    return pos.close(
        exit_upbit_price=D("140000000.00"),
        exit_binance_price=D("98100.5"),
        exit_spread_pct=D("0.5000"),
        pnl_krw=D("12345.67"),
        pnl_pct=D("0.8812"),
        timestamp_close=at(i),
    )


def order(i: int, key: str | None = "pos_001") -> OrderLeg:
    """An order leg of a position."""
    return OrderLeg(
        position_key=key,
        symbol="BTC",
        venue="upbit" if i % 2 == 0 else "binance_futures",
        side="sell" if i % 2 == 0 else "long",
        qty=D("0.01"),
        price_theoretical=D("140123456.12"),
        price_effective=D("140120000.5"),
        slippage_bps=D("2.47"),
        leg_id=f"{key or 'none'}_leg_{i}",
        order_id=f"ex-{i}",
        timestamp=at(i),
    )


def trade(i: int, key: str | None = "pos_001", side: str = "OPEN") -> Trade:
    """A trade of a position."""
    return Trade(
        position_key=key,
        symbol="BTC",
        direction="upbit_short_binance_long",
        size=D("0.01"),
        side=side,
        price_upbit=D("140123456.12"),
        price_binance=D("98012.12345678"),
        pnl_krw=None if side == "OPEN" else D("12345.67"),
        pnl_pct=None if side == "OPEN" else D("0.8812"),
        timestamp=at(i),
    )


# Two days back (fixed for the session): recent enough that the 90-day retention of spreads never
# refuses the rows of spread_rows, which the CSV commands import as real processes.
RECENT_DAY = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).date().isoformat()


def spread_rows(n: int, *, start: int = 0) -> list[str]:
    """``n`` valid spreads.csv rows (no event_id column), from ``RECENT_DAY``."""
    return [
        f"BTC,{140123456 + i}.12,98012.12345678,135800000.55,3.1836,2.9836,true,"
        f"{RECENT_DAY}T03:40:{(i % 60):02d}.{i:06d}Z"
        for i in range(start, start + n)
    ]


def write_csv(path: Path, header: str, rows: list[str], *, newline: str = "\n") -> Path:
    """A CSV file of a header and rows."""
    path.write_bytes((newline.join([header, *rows]) + newline).encode("utf-8"))
    return path


# --- wire events -------------------------------------------------------------------------------

# A spread's symbol and prices as the wire carries them (decimal text, never floats), in the order
# of the spreads.csv header.
SPREAD_PRICES: dict[str, str] = {
    "symbol": "BTC",
    "upbit_price": "140123456.12",
    "binance_price": "98012.12345678",
    "binance_price_krw": "135800000.55",
    "spread_pct": "3.1836",
    "net_spread_pct": "2.9836",
}

# The entry and exit columns of a position as the wire carries them (position_open and
# position_close events).
POSITION_ENTRY: dict[str, str] = {
    "direction": "upbit_short_binance_long",
    "size": "0.01",
    "entry_upbit_price": "140000000.00",
    "entry_binance_price": "98000.12345678",
    "entry_spread_pct": "3.1000",
    "timestamp_open": "2025-11-15T03:00:00Z",
}


def position_exit(pnl_krw: str = "25000.75", day: str = "2025-11-15") -> dict[str, str]:
    """The exit columns of a position_close event, closed at 04:00 UTC of ``day``."""
    return {
        "exit_upbit_price": "139000000.50",
        "exit_binance_price": "97900.00000001",
        "exit_spread_pct": "0.5000",
        "pnl_krw": pnl_krw,
        "pnl_pct": "1.2345",
        "timestamp_close": f"{day}T04:00:00Z",
    }


def fx_event(
    i: int, *, rate: str = "1385.5", event_id: str | None = None, **extra: str
) -> dict[str, Any]:
    """A valid fx_rate event, ``i`` seconds after 2026-11-30 UTC, with ``extra`` fields."""
    moment = dt.datetime(2026, 11, 30, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
    return {
        "type": "fx_rate",
        "event_id": event_id or f"fx-{i}",
        "producer": "collector",
        "pair": "USDKRW",
        "rate": rate,
        **extra,
        "timestamp": utc_iso(moment),
    }


def nested_lists(levels: int) -> list[Any]:
    """Lists nested ``levels`` deep (``[[[...]]]``), built without recursion."""
    outer: list[Any] = []
    current = outer
    for _ in range(levels - 1):
        inner: list[Any] = []
        current.append(inner)
        current = inner
    return outer
