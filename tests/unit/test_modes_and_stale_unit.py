"""mode on orders/trades/positions and the staleness of a spread's inputs, at intake."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ingestd.daemon import metrics
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.errors import InvalidEvent
from ingestd.settings import load_settings
from ingestd.tools import simulate
from ingestd.wire import csv_format, decoding, events, fastpath
from tests.samples import SPREAD_PRICES

UTC = dt.UTC
T = dt.datetime(2025, 11, 15, 3, 40, 15, tzinfo=UTC)
S = dt.timedelta(seconds=1)


@pytest.fixture(autouse=True)
def default_limits() -> Iterator[None]:
    events.configure_staleness(max_skew_s=2.0, fx_ttl_s=3.0)
    yield
    events.configure_staleness(max_skew_s=2.0, fx_ttl_s=3.0)


def spread(**times: Any) -> dict[str, Any]:
    return {
        "type": "spread",
        "event_id": "s-1",
        "producer": "collector",
        **SPREAD_PRICES,
        "timestamp": T.isoformat(),
        **{k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in times.items()},
    }


def both_paths(obj: dict[str, Any]) -> events.Event:
    """The event, asserting that the fast and the general path give the same one."""
    payload = orjson.dumps(obj)
    general = events.parse_event(events.decode_json(payload))
    fast = fastpath.decode(payload, None)
    assert fast == general
    return general


@pytest.mark.parametrize(
    ("times", "stale"),
    [
        ({}, False),  # times not sent: unknown, not stale
        ({"upbit_ts": T, "binance_ts": T - 2 * S, "fx_ts": T - 3 * S}, False),  # at the limits
        ({"upbit_ts": T, "binance_ts": T - 2 * S - dt.timedelta(microseconds=1)}, True),
        ({"upbit_ts": T - 2.5 * S, "binance_ts": T}, True),  # either one behind
        ({"upbit_ts": T}, False),  # one price time alone says nothing about skew
        ({"fx_ts": T - 3 * S - dt.timedelta(milliseconds=1)}, True),
        ({"fx_ts": T + 60 * S}, False),  # a rate from after the spread is not old
        # Instants compare, whatever their offsets: 12:40:12 KST is 03:40:12 UTC, 3 s before T.
        ({"upbit_ts": T, "binance_ts": "2025-11-15T12:40:12+09:00"}, True),
        ({"upbit_ts": T, "binance_ts": "2025-11-15T12:40:14+09:00"}, False),
    ],
)
def test_is_stale_at_intake_on_both_paths(times: dict[str, Any], stale: bool) -> None:
    ev = both_paths(spread(**times))
    assert ev.values["is_stale"] == ("true" if stale else "false")


def test_the_limits_are_configurable() -> None:
    obj = spread(upbit_ts=T, binance_ts=T - 5 * S, fx_ts=T - 8 * S)
    assert both_paths(obj).values["is_stale"] == "true"
    settings = load_settings(
        None, environ={}, overrides={"spreads.stale_skew_s": 6.0, "fx.ttl_seconds": 10.0}
    )
    events.configure_staleness_from(settings)
    assert events.staleness() == events.Staleness(6 * S, 10 * S)
    assert both_paths(obj).values["is_stale"] == "false"


def test_defaults_are_two_seconds_and_the_fx_ttl() -> None:
    settings = load_settings(None, environ={})
    assert settings.spreads.stale_skew_s == 2.0
    events.configure_staleness_from(settings)
    assert events.staleness() == events.Staleness(2 * S, 3 * S)


def test_is_stale_is_not_a_wire_field_and_survives_the_round_trip() -> None:
    ev = both_paths(spread(upbit_ts=T, binance_ts=T - 3 * S))
    wire = events.to_wire(ev)
    assert "is_stale" not in wire
    assert wire["binance_ts"] == (T - 3 * S).isoformat()
    assert events.parse_event(wire) == ev
    with pytest.raises(InvalidEvent) as info:
        events.parse_event({**spread(), "is_stale": True})
    assert info.value.field == "is_stale"


def test_naive_input_time_is_bad_input() -> None:
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(orjson.dumps(spread(fx_ts="2025-11-15T03:40:15")), max_bytes=1 << 20)
    assert info.value.field == "fx_ts"


# --- mode ----------------------------------------------------------------------------------------


def position_open(**extra: Any) -> dict[str, Any]:
    return {
        "type": "position_open",
        "event_id": "po-1",
        "producer": "paper",
        "position_key": "pos_001",
        "symbol": "BTC",
        "direction": "upbit_short_binance_long",
        "size": "0.01",
        "entry_upbit_price": "140000000",
        "entry_binance_price": "98000",
        "entry_spread_pct": "3.1",
        "timestamp_open": "2025-11-15T03:00:00Z",
        **extra,
    }


@pytest.mark.parametrize("mode", ["paper", "live"])
def test_mode_is_kept(mode: str) -> None:
    assert both_paths(position_open(mode=mode)).values["mode"] == mode


def test_an_absent_mode_is_none_whatever_the_producer() -> None:
    assert both_paths(position_open()).values["mode"] is None
    assert both_paths(position_open(producer="live")).values["mode"] is None


@pytest.mark.parametrize("mode", ["Paper", "demo", "", 1, True])
def test_another_mode_is_bad_input_on_every_path(mode: object) -> None:
    payload = orjson.dumps(position_open(mode=mode))
    assert fastpath.decode(payload, None) is None
    with pytest.raises(InvalidEvent) as info:
        decoding.decode_event(payload, max_bytes=1 << 20)
    assert info.value.field == "mode"
    with pytest.raises(InvalidEvent) as info:
        events.normalize(position_open(mode=mode))
    assert info.value.field == "mode"


# --- metric --------------------------------------------------------------------------------------


class _Src:
    name = "test"

    async def acknowledge(self, items: Any, outcome: Any) -> None:
        """Nothing."""

    def dead_letter_key(self, item: Item) -> str | None:
        return None


def test_committed_stale_spreads_are_counted_by_symbol() -> None:
    stale = spread(upbit_ts=T, binance_ts=T - 3 * S)
    items = [
        Item(events.parse_event(obj), None, _Src(), None, None, 0.0)
        for obj in (stale, {**stale, "symbol": "ETH"}, {**stale, "symbol": "ETH"}, spread())
    ]
    m = metrics.Metrics()
    outcome = BatchOutcome(inserted={"spreads": 4})
    outcome.reject(items[2], "refused")
    m.observe_batch(items, outcome, 0.01)
    assert m.stale_spreads == {"BTC": 1, "ETH": 1}
    registry = metrics.create_registry(metrics.MetricsCollector(m))
    samples = {
        (s.name, s.labels.get("symbol")): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith("ingestd_stale_spreads")
    }
    assert samples == {
        ("ingestd_stale_spreads_total", "BTC"): 1.0,
        ("ingestd_stale_spreads_total", "ETH"): 1.0,
    }


# --- simulator -----------------------------------------------------------------------------------


def _spreads(**kwargs: Any) -> list[events.Event]:
    sim = simulate.Simulator(seed=3, start=T, **kwargs)
    out = []
    for _ in range(2_000):
        out += [events.normalize(e) for e in sim.step() if e["type"] == "spread"]
    return out


def test_the_simulator_sends_input_times_and_a_fraction_of_stale_spreads() -> None:
    spreads = _spreads(stale_fraction=0.05)
    assert all(ev.values["upbit_ts"] and ev.values["binance_ts"] for ev in spreads)
    assert all(ev.values["fx_ts"] for ev in spreads)
    stale = sum(ev.values["is_stale"] == "true" for ev in spreads)
    assert 0.03 * len(spreads) < stale < 0.07 * len(spreads)
    assert not any(ev.values["is_stale"] == "true" for ev in _spreads(stale_fraction=0.0))


def test_the_simulator_marks_its_paper_trades_as_paper() -> None:
    sim = simulate.Simulator(seed=7, start=T)
    traded = [
        e
        for _ in range(5_000)
        for e in sim.step()
        if e["type"] in ("order", "trade", "position_open", "position_close")
    ]
    assert traded
    assert {e["mode"] for e in traded} == {"paper"}


# --- CSV -----------------------------------------------------------------------------------------


def _convert(table: csv_format.CsvTable, text: str) -> list[events.Event]:
    records = list(csv_format.read_records(io.BytesIO(text.encode())))
    assert records[0].fields is not None
    conv = csv_format.RowConverter(table, records[0].fields, source="t.csv")
    return [conv.event(r.fields or [], r.line) for r in records[1:]]


def test_csv_files_may_carry_the_new_columns_and_old_ones_still_import() -> None:
    spreads = csv_format.CSV_TABLES_BY_NAME["spreads"]
    # CsvStorage keeps writing the header it always wrote (its existing files still append).
    assert not {"upbit_ts", "binance_ts", "fx_ts", "is_stale"} & set(spreads.columns)
    base = "symbol,upbit_price,binance_price,binance_price_krw,spread_pct,net_spread_pct,timestamp"
    row = "BTC,1,1,1,1,1,2025-11-15T03:40:15Z"
    (old,) = _convert(spreads, f"{base}\n{row}\n")
    assert (old.values["upbit_ts"], old.values["is_stale"]) == (None, "false")
    (new,) = _convert(
        spreads,
        f"{base},upbit_ts,binance_ts,fx_ts\n{row},"
        "2025-11-15T03:40:15Z,2025-11-15T03:40:10Z,2025-11-15T03:40:15Z\n",
    )
    assert new.values["binance_ts"] == "2025-11-15T03:40:10+00:00"
    assert new.values["is_stale"] == "true"
    with pytest.raises(csv_format.CsvLayoutError, match="is_stale"):
        _convert(spreads, f"{base},is_stale\n{row},true\n")

    positions = csv_format.POSITIONS
    header = ",".join(positions.columns)
    assert "mode" not in positions.columns
    cells = dict.fromkeys(positions.columns, "")
    cells.update(
        position_key="k",
        symbol="BTC",
        direction="d",
        size="1",
        entry_upbit_price="1",
        entry_binance_price="1",
        entry_spread_pct="1",
        status="OPEN",
        timestamp_open="2025-11-15T03:00:00Z",
    )
    line = ",".join(cells[c] for c in positions.columns)
    (pos,) = _convert(positions, f"{header},mode\n{line},live\n")
    assert pos.values["mode"] == "live"
    with pytest.raises(InvalidEvent):
        _convert(positions, f"{header},mode\n{line},demo\n")
