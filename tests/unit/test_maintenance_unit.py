"""The pure parts of maintenance and stats: settings, ``metrics:*`` documents, JSON values."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd.commands.stats import render, to_json
from ingestd.daemon.maintenance import (
    BackfillRange,
    daily_pnl_documents,
    hourly_spread_documents,
    merge_backfill_ranges,
)
from ingestd.errors import ConfigError
from ingestd.settings import load_settings


def test_retention_defaults_are_the_seeds() -> None:
    got = load_settings(None, environ={})
    assert (got.retention.spreads_days, got.retention.fx_rates_days) == (90, 180)
    assert got.retention.orders_days == 365
    assert got.retention.delete_batch_rows == 10_000
    assert got.maintenance.enabled is True


def test_retention_and_maintenance_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.yml"
    path.write_text(
        "retention:\n  spreads_days: 30\n  orders_days: 0\n"
        "maintenance:\n  refresh_interval_s: 5\n  metrics_hours: 24\n",
        encoding="utf-8",
    )
    got = load_settings(path, environ={})
    assert got.retention.spreads_days == 30 and got.retention.orders_days == 0
    assert got.retention.fx_rates_days == 180
    assert got.maintenance.refresh_interval_s == 5.0 and got.maintenance.metrics_hours == 24


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retention.spreads_days", -1, "retention.spreads_days"),
        ("retention.delete_batch_rows", 0, "delete_batch_rows"),
        ("maintenance.refresh_interval_s", 0, "maintenance.refresh_interval_s"),
        ("maintenance.metrics_days", 0, "metrics_days"),
    ],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(None, environ={}, overrides={key: value})


def test_unknown_retention_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.yml"
    path.write_text("retention:\n  trades_days: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("retention.trades_days")):
        load_settings(path, environ={})


def _daily_row(day: dt.date, symbol: str, n: int, total: str, mx: str, mn: str) -> dict[str, Any]:
    return {
        "trade_date": day,
        "symbol": symbol,
        "trade_count": n,
        "total_pnl_krw": total,
        "avg_pnl_pct": "0.1000",
        "max_pnl_krw": mx,
        "min_pnl_krw": mn,
    }


def test_daily_documents_total_exactly_and_keep_decimal_strings() -> None:
    day = dt.date(2025, 11, 15)
    rows: Any = [
        _daily_row(day, "BTC", 2, "0.10", "0.30", "-0.20"),
        _daily_row(day, "ETH", 1, "0.20", "0.20", "0.20"),
        _daily_row(day + dt.timedelta(days=1), "BTC", 1, "99999999999999.99", "1", "1"),
    ]
    docs = daily_pnl_documents(rows, "2025-11-16T00:00:00.000000Z")
    assert set(docs) == {"metrics:daily_pnl:2025-11-15", "metrics:daily_pnl:2025-11-16"}
    doc = orjson.loads(docs["metrics:daily_pnl:2025-11-15"])
    # 0.10 + 0.20 is 0.30 exactly (a float sum would give 0.30000000000000004).
    assert doc["total_pnl_krw"] == "0.30"
    assert doc["trade_count"] == 3
    assert (doc["max_pnl_krw"], doc["min_pnl_krw"]) == ("0.30", "-0.20")
    assert doc["symbols"]["BTC"]["avg_pnl_pct"] == "0.1000"
    big = orjson.loads(docs["metrics:daily_pnl:2025-11-16"])
    assert Decimal(big["total_pnl_krw"]) == Decimal("99999999999999.99")


def test_hourly_documents_are_keyed_by_utc_hour() -> None:
    seoul = dt.timezone(dt.timedelta(hours=9))
    hour = dt.datetime(2025, 11, 15, 12, 0, tzinfo=seoul)  # 03:00 UTC
    row = {
        "hour": hour,
        "symbol": "BTC",
        "avg_spread_pct": "3.18360000000000000000",
        "avg_net_spread_pct": "2.9836",
        "max_spread_pct": "3.5000",
        "min_spread_pct": "2.0000",
    }
    docs: Any = hourly_spread_documents([row], "2025-11-15T03:30:00.000000Z")  # type: ignore[list-item]
    doc = orjson.loads(docs["metrics:hourly_spread:2025-11-15-03"])
    assert doc["hour"] == "2025-11-15T03:00:00.000000Z"
    assert doc["symbols"]["BTC"]["avg_spread_pct"] == "3.18360000000000000000"


def test_stats_render_without_timescale_or_redis() -> None:
    report: dict[str, Any] = {
        "database": {
            "name": "x",
            "server_version": "15",
            "timescaledb": None,
            "flavour": "plain PostgreSQL",
            "timezone": "UTC",
        },
        "tables": [
            {
                "schemaname": "public",
                "tablename": "spreads",
                "size": "8 kB",
                "hypertable": False,
                "hypertable_size": None,
                "rows": 3,
                "rows_exact": False,
            }
        ],
        "hypertables": [],
        "aggregates": [],
        "jobs": [],
        "maintenance": [],
        "slow_queries": {"available": False, "hint": "add pg_stat_statements", "rows": []},
        "redis": {"error": "ConnectionError: refused"},
    }
    text = render(report)
    assert "plain (no timescaledb)" in text
    assert "~3" in text  # an estimate is marked as one
    assert "add pg_stat_statements" in text
    assert "unavailable: ConnectionError" in text
    assert orjson.loads(to_json(report))["tables"][0]["rows"] == 3


def test_backfill_ranges_merge_overlapping_and_adjacent_hours_once_each() -> None:
    h = [dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(hours=n) for n in range(12)]
    rows = [(3, h[5], h[7]), (1, h[0], h[2]), (2, h[2], h[3]), (4, h[6], h[8]), (5, h[10], h[11])]
    assert merge_backfill_ranges(rows) == [
        BackfillRange(h[0], h[3], (1, 2)),  # adjacent: one refresh
        BackfillRange(h[5], h[8], (3, 4)),  # overlapping
        BackfillRange(h[10], h[11], (5,)),
    ]
    assert merge_backfill_ranges([]) == []
