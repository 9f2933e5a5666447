"""The bench's events: the simulator's realistic mix (or its spreads alone), as JSON events, as
pre-built COPY rows, and as the exact contents the database must hold after writing them once."""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Final

import orjson

from ingestd.tools.simulate import Simulator
from ingestd.wire import tables

SYMBOLS: Final = ("BTC", "ETH", "XRP", "SOL", "DOGE")
TABLE_OF_TYPE: Final = {
    "spread": tables.SPREADS,
    "fx_rate": tables.FX_RATES,
    "order": tables.ORDERS,
    "trade": tables.TRADES,
}
# The columns whose exact sums each verification compares (money, prices, quantities).
SUM_COLUMNS: Final = {
    "spreads": ("upbit_price", "spread_pct"),
    "fx_rates": ("rate",),
    "orders": ("qty", "price_effective"),
    "trades": ("size", "pnl_krw"),
    "positions": ("size", "pnl_krw"),
}
VERIFIED_TABLES: Final = ("spreads", "fx_rates", "orders", "trades", "positions")

POSITION_OPEN_COLUMNS: Final = (
    "position_key",
    "producer",
    *(name for name, _ in tables.POSITION_ENTRY_COLUMNS),
    "open_event_id",
)
POSITION_CLOSE_COLUMNS: Final = (
    "position_key",
    *(name for name, _ in tables.POSITION_EXIT_COLUMNS),
    "close_event_id",
)
_POSITION_KINDS: Final[dict[str, tables.ColumnType]] = dict(
    (*tables.POSITION_ENTRY_COLUMNS, *tables.POSITION_EXIT_COLUMNS)
)
_COLUMN_KINDS: Final[dict[str, dict[str, tables.ColumnType]]] = {
    **{t.name: dict(t.columns) for t in tables.APPEND_TABLES},
    "positions": _POSITION_KINDS,
}
_SCALES: Final = {n: Decimal(1).scaleb(-n) for n in range(19)}


def _column_value(value: Any, kind: tables.ColumnType | None) -> Any:
    """A JSON field as a producer's own value: Decimal, aware datetime, bool or str."""
    if value is None:
        return None
    if isinstance(kind, tables.Numeric):
        return Decimal(str(value))
    if isinstance(kind, tables.Timestamptz):
        moment = dt.datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(f"naive time {value!r} in a generated event")
        return moment
    if isinstance(kind, tables.Boolean):
        return bool(value)
    return value


def append_row(ev: Mapping[str, Any], table: tables.Table) -> tuple[Any, ...]:
    """The binary-COPY row of one append-only event, in the table's column order."""
    # A column ingestd derives (a spread's is_stale) is what intake gives an event without
    # the inputs it is derived from: false.
    return tuple(
        False if name in table.derived else _column_value(ev.get(name), kind)
        for name, kind in table.columns
    )


def position_open_args(ev: Mapping[str, Any]) -> tuple[Any, ...]:
    """Bind arguments of a raw writer's position upsert (POSITION_OPEN_COLUMNS order)."""
    values = [
        _column_value(ev.get(name), _POSITION_KINDS.get(name))
        for name in POSITION_OPEN_COLUMNS[:-1]
    ]
    return (*values, ev["event_id"])


def position_close_args(ev: Mapping[str, Any]) -> tuple[Any, ...]:
    """Bind arguments of a raw writer's position close (POSITION_CLOSE_COLUMNS order)."""
    values = [
        _column_value(ev.get(name), _POSITION_KINDS.get(name))
        for name in POSITION_CLOSE_COLUMNS[:-1]
    ]
    return (*values, ev["event_id"])


def _scaled(value: Any, kind: tables.ColumnType | None) -> Decimal:
    d = Decimal(str(value))
    if isinstance(kind, tables.Numeric):
        # PostgreSQL rounds NUMERIC half away from zero, which is Python's ROUND_HALF_UP.
        return d.quantize(_SCALES[kind.scale], rounding=ROUND_HALF_UP)
    return d


@dataclasses.dataclass(slots=True)
class Expected:
    """What the database must hold after the events are written once: counts and exact sums."""

    events: int = 0
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sums: dict[str, Decimal | None] = dataclasses.field(default_factory=dict)
    closed_positions: int = 0

    def add(self, ev: Mapping[str, Any]) -> None:
        """Account for one event."""
        self.events += 1
        kind = ev["type"]
        table = TABLE_OF_TYPE.get(kind)
        if table is not None:
            self.counts[table.name] += 1
            self._sum(table.name, ev)
        elif kind == "position_open":
            self.counts["positions"] += 1
            self._sum("positions", ev, ("size",))
        elif kind == "position_close":
            self.closed_positions += 1
            self._sum("positions", ev, ("pnl_krw",))

    def _sum(self, table: str, ev: Mapping[str, Any], only: Sequence[str] | None = None) -> None:
        kinds = _COLUMN_KINDS[table]
        for column in only or SUM_COLUMNS[table]:
            value = ev.get(column)
            if value is None:
                continue
            key = f"{table}.{column}"
            prev = self.sums.get(key)
            self.sums[key] = (prev or Decimal(0)) + _scaled(value, kinds.get(column))

    @property
    def rows(self) -> int:
        """Rows in the append-only tables plus positions."""
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON form (decimals as strings) for the producer process to report."""
        return {
            "events": self.events,
            "counts": dict(self.counts),
            "sums": {k: None if v is None else str(v) for k, v in self.sums.items()},
            "closed_positions": self.closed_positions,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Expected:
        """The inverse of ``to_json``."""
        return cls(
            events=int(doc["events"]),
            counts=collections.Counter({k: int(v) for k, v in doc["counts"].items()}),
            sums={k: None if v is None else Decimal(v) for k, v in doc["sums"].items()},
            closed_positions=int(doc["closed_positions"]),
        )


def expect(events: Iterable[Mapping[str, Any]]) -> Expected:
    """The expected database contents after writing ``events`` once."""
    out = Expected()
    for ev in events:
        out.add(ev)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """Events of one kind of run, with their COPY rows and expected contents built beforehand."""

    name: str
    events: list[dict[str, Any]]
    expected: Expected

    def prefix(self, n: int) -> Workload:
        """The first ``n`` events (positions are only closed after they were opened)."""
        events = self.events[:n]
        return Workload(self.name, events, expect(events))

    def type_counts(self) -> dict[str, int]:
        """Events per type (the mix, for the report)."""
        return dict(collections.Counter(ev["type"] for ev in self.events))


def simulated(seed: int = 1) -> Iterator[dict[str, Any]]:
    """The simulator's endless collector + paper-trader feed over five symbols."""
    return Simulator(seed=seed, symbols=SYMBOLS).events()


def make_mix(n: int, *, seed: int = 1) -> Workload:
    """``n`` events of the realistic mix: mostly spreads, some FX, few position events."""
    events: list[dict[str, Any]] = []
    for ev in simulated(seed):
        events.append(ev)
        if len(events) >= n:
            break
    return Workload("mix", events, expect(events))


def make_spreads(n: int, *, seed: int = 1) -> Workload:
    """``n`` spread events only (the cleanest comparison with a raw COPY)."""
    events: list[dict[str, Any]] = []
    for ev in simulated(seed):
        if ev["type"] == "spread":
            events.append(ev)
            if len(events) >= n:
                break
    return Workload("spreads", events, expect(events))


@dataclasses.dataclass(frozen=True, slots=True)
class RawBatch:
    """One batch as a raw writer holds it: COPY rows per table, position statements' args."""

    rows: dict[str, list[tuple[Any, ...]]]
    opens: list[tuple[Any, ...]]
    closes: list[tuple[Any, ...]]


def raw_batches(events: Sequence[Mapping[str, Any]], batch_rows: int) -> list[RawBatch]:
    """The events cut into batches of ``batch_rows`` events (in order), pre-built as rows."""
    out: list[RawBatch] = []
    for start in range(0, len(events), batch_rows):
        rows: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        opens: list[tuple[Any, ...]] = []
        closes: list[tuple[Any, ...]] = []
        for ev in events[start : start + batch_rows]:
            kind = ev["type"]
            table = TABLE_OF_TYPE.get(kind)
            if table is not None:
                rows[table.name].append(append_row(ev, table))
            elif kind == "position_open":
                opens.append(position_open_args(ev))
            elif kind == "position_close":
                closes.append(position_close_args(ev))
        out.append(RawBatch(dict(rows), opens, closes))
    return out


def write_jsonl(path: Path, events: Iterable[Mapping[str, Any]]) -> None:
    """One JSON event per line: what a producer process publishes."""
    with path.open("wb") as fh:
        for ev in events:
            fh.write(orjson.dumps(ev))
            fh.write(b"\n")


def write_spreads_csv(path: Path, events: Iterable[Mapping[str, Any]]) -> None:
    """The spreads as a CSV file in ``tables.SPREADS`` column order (for ``COPY ... FROM``)."""
    names = tables.SPREADS.column_names
    flags = {"is_opportunity", "is_stale"}  # is_stale: ingestd's judgement, false for these

    def cell(ev: Mapping[str, Any], name: str) -> Any:
        value = ev.get(name)
        if name in flags:
            return "true" if value else "false"
        return "" if value is None else value  # an empty unquoted CSV field is NULL to COPY

    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for ev in events:
            writer.writerow(cell(ev, n) for n in names)
