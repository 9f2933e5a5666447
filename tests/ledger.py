"""The oracle ledger: what was sent, computed independently of ingestd, and what landed."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg

from ingestd.wire import tables

NUMERIC_COLUMNS: dict[str, list[tuple[str, int]]] = {
    t.name: [(name, kind.scale) for name, kind in t.columns if isinstance(kind, tables.Numeric)]
    for t in tables.APPEND_TABLES
}
TABLE_OF_TYPE = {"spread": "spreads", "fx_rate": "fx_rates", "order": "orders", "trade": "trades"}


def _dec(value: Any, scale: int) -> Decimal:
    return Decimal(str(value)).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


@dataclasses.dataclass
class Expected:
    """Counts, numeric sums and event ids per table, from the events a test sent."""

    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sums: dict[str, dict[str, Decimal]] = dataclasses.field(default_factory=dict)
    ids: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    positions_open: set[str] = dataclasses.field(default_factory=set)
    positions_closed: set[str] = dataclasses.field(default_factory=set)
    pnl_krw: Decimal = Decimal(0)

    @classmethod
    def of(cls, events: Iterable[Mapping[str, Any]]) -> Expected:
        """Tally events (each event_id once, as ingestd promises)."""
        exp = cls()
        seen: set[str] = set()
        for ev in events:
            if ev["event_id"] in seen:
                continue
            seen.add(ev["event_id"])
            table = TABLE_OF_TYPE.get(ev["type"])
            if table is not None:
                exp.counts[table] += 1
                exp.ids.setdefault(table, set()).add(ev["event_id"])
                sums = exp.sums.setdefault(table, {})
                for column, scale in NUMERIC_COLUMNS[table]:
                    if ev.get(column) is not None:
                        sums[column] = sums.get(column, Decimal(0)) + _dec(ev[column], scale)
            elif ev["type"] == "position_open":
                exp.positions_open.add(ev["position_key"])
            elif ev["type"] == "position_close":
                exp.positions_closed.add(ev["position_key"])
                exp.pnl_krw += _dec(ev["pnl_krw"], 2)
        return exp


async def assert_landed_exactly_once(conn: asyncpg.Connection, exp: Expected) -> None:
    """Counts, sums and the set of event ids per table equal what was sent: no loss, no dup."""
    for table in ("spreads", "fx_rates", "orders", "trades"):
        rows = await conn.fetch(f"SELECT event_id FROM {table}")
        landed = [r["event_id"] for r in rows]
        assert len(landed) == len(set(landed)), f"{table}: duplicated event ids"
        want = exp.ids.get(table, set())
        missing = want - set(landed)
        unexpected = set(landed) - want
        assert not missing, f"{table}: {len(missing)} lost, e.g. {sorted(missing)[:3]}"
        assert not unexpected, f"{table}: {len(unexpected)} unexpected"
        for column, _ in NUMERIC_COLUMNS[table]:
            got = await conn.fetchval(f"SELECT coalesce(sum({column}), 0) FROM {table}")
            assert got == exp.sums.get(table, {}).get(column, Decimal(0)), f"{table}.{column}"
    rows = await conn.fetch("SELECT position_key, status FROM positions")
    status = {r["position_key"]: r["status"] for r in rows}
    assert set(status) == exp.positions_open | exp.positions_closed
    closed = {k for k, s in status.items() if s == "CLOSED"}
    assert closed == exp.positions_closed
    pnl = await conn.fetchval("SELECT coalesce(sum(pnl_krw), 0) FROM positions")
    assert pnl == exp.pnl_krw
    parked = await conn.fetchval("SELECT count(*) FROM position_closes_pending")
    assert parked == len(exp.positions_closed - exp.positions_open)


async def wait_until_landed_exactly_once(dsn: str, exp: Expected, timeout: float = 120.0) -> None:
    """Wait until every table holds what was sent, then judge: exactly once, no dead letters."""
    from tests.feeds import wait_for_rows  # feeds imports the e2e helpers; ledger stays light

    for table in ("spreads", "fx_rates", "orders", "trades"):
        await wait_for_rows(dsn, table, exp.counts[table], timeout=timeout)
    await assert_landed_in(dsn, exp, no_dead_letters=True)


async def assert_landed_in(dsn: str, exp: Expected, *, no_dead_letters: bool = False) -> None:
    """Judge the database of ``dsn`` now: exactly once (and with ``no_dead_letters``, none)."""
    conn = await asyncpg.connect(dsn)
    try:
        await assert_landed_exactly_once(conn, exp)
        if no_dead_letters:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        await conn.close()
