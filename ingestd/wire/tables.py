"""The fixed allow-list of tables and columns that ingestd writes, with their SQL types.

This is the single place where identifiers come from: nothing from an event ever becomes an
identifier. ``tests/integration/test_schema.py`` checks it against the migrated database.
"""

from __future__ import annotations

import dataclasses
from typing import Final


@dataclasses.dataclass(frozen=True, slots=True)
class Numeric:
    """NUMERIC(precision, scale)."""

    precision: int
    scale: int


@dataclasses.dataclass(frozen=True, slots=True)
class Varchar:
    """VARCHAR(length)."""

    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Boolean:
    """BOOLEAN."""


@dataclasses.dataclass(frozen=True, slots=True)
class Timestamptz:
    """TIMESTAMPTZ: always aware, always with an offset on the wire."""


ColumnType = Numeric | Varchar | Boolean | Timestamptz

PRICE_KRW: Final = Numeric(18, 2)
PRICE: Final = Numeric(18, 8)
PCT: Final = Numeric(8, 4)
BPS: Final = Numeric(8, 2)
TIME: Final = Timestamptz()
BOOL: Final = Boolean()
EVENT_ID: Final = Varchar(100)
PRODUCER: Final = Varchar(50)
POSITION_KEY: Final = Varchar(100)
# Which book a producer trades: "paper" or "live" (MODES); the column is VARCHAR(10).
MODE: Final = Varchar(10)
MODES: Final = frozenset({"paper", "live"})


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """An append-only time-series table that ingestd COPYs into."""

    name: str
    time_column: str
    columns: tuple[tuple[str, ColumnType], ...]
    # Columns ingestd computes from the event (not sent by producers): a redelivery compared
    # under other settings must not differ in them (they are left out of the conflict check).
    derived: frozenset[str] = frozenset()

    @property
    def column_names(self) -> tuple[str, ...]:
        """Column names in COPY order."""
        return tuple(name for name, _ in self.columns)


SPREADS: Final = Table(
    "spreads",
    "timestamp",
    (
        ("event_id", EVENT_ID),
        ("producer", PRODUCER),
        ("symbol", Varchar(10)),
        ("upbit_price", PRICE_KRW),
        ("binance_price", PRICE),
        ("binance_price_krw", PRICE_KRW),
        ("spread_pct", PCT),
        ("net_spread_pct", PCT),
        ("is_opportunity", BOOL),
        ("timestamp", TIME),
        # The source times of the two prices and of the FX rate (optional), and ingestd's
        # judgement of them (ingestd.wire.events.Staleness).
        ("upbit_ts", TIME),
        ("binance_ts", TIME),
        ("fx_ts", TIME),
        ("is_stale", BOOL),
    ),
    derived=frozenset({"is_stale"}),
)

FX_RATES: Final = Table(
    "fx_rates",
    "timestamp",
    (
        ("event_id", EVENT_ID),
        ("producer", PRODUCER),
        ("pair", Varchar(20)),
        ("rate", PRICE),
        ("source", Varchar(50)),
        ("timestamp", TIME),
    ),
)

ORDERS: Final = Table(
    "orders",
    "timestamp",
    (
        ("event_id", EVENT_ID),
        ("producer", PRODUCER),
        ("position_key", POSITION_KEY),
        ("symbol", Varchar(10)),
        ("venue", Varchar(50)),
        ("side", Varchar(20)),
        ("qty", PRICE),
        ("price_theoretical", PRICE),
        ("price_effective", PRICE),
        ("slippage_bps", BPS),
        ("leg_id", Varchar(100)),
        ("order_id", Varchar(100)),
        ("timestamp", TIME),
        ("mode", MODE),
    ),
)

TRADES: Final = Table(
    "trades",
    "timestamp",
    (
        ("event_id", EVENT_ID),
        ("producer", PRODUCER),
        ("position_key", POSITION_KEY),
        ("symbol", Varchar(10)),
        ("direction", Varchar(50)),
        ("size", PRICE),
        ("side", Varchar(20)),
        ("price_upbit", PRICE_KRW),
        ("price_binance", PRICE),
        ("pnl_krw", PRICE_KRW),
        ("pnl_pct", PCT),
        ("timestamp", TIME),
        ("mode", MODE),
    ),
)

APPEND_TABLES: Final = (SPREADS, FX_RATES, ORDERS, TRADES)
APPEND_TABLES_BY_NAME: Final = {t.name: t for t in APPEND_TABLES}

# positions is a plain, mutable table (not a hypertable): written with upserts, not COPY.
POSITION_ENTRY_COLUMNS: Final = (
    ("symbol", Varchar(10)),
    ("direction", Varchar(50)),
    ("size", PRICE),
    ("entry_upbit_price", PRICE_KRW),
    ("entry_binance_price", PRICE),
    ("entry_spread_pct", PCT),
    ("timestamp_open", TIME),
)
POSITION_EXIT_COLUMNS: Final = (
    ("exit_upbit_price", PRICE_KRW),
    ("exit_binance_price", PRICE),
    ("exit_spread_pct", PCT),
    ("pnl_krw", PRICE_KRW),
    ("pnl_pct", PCT),
    ("timestamp_close", TIME),
)
