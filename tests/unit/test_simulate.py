"""The simulator: deterministic, valid, and realistic enough to open and close positions."""

from __future__ import annotations

import collections
import datetime as dt
import itertools
from decimal import Decimal
from typing import Any

import pytest

from ingestd.tools import simulate
from ingestd.wire import events

START = dt.datetime(2025, 11, 15, 3, 0, tzinfo=dt.UTC)
TICKS = 5_000


def run(seed: int, ticks: int, **kwargs: Any) -> list[dict[str, Any]]:
    sim = simulate.Simulator(seed=seed, start=START, **kwargs)
    out: list[dict[str, Any]] = []
    for _ in range(ticks):
        out.extend(sim.step())
    return out


@pytest.fixture(scope="module")
def feed() -> list[dict[str, Any]]:
    return run(7, TICKS)


def test_same_seed_gives_identical_events() -> None:
    a = run(11, 400)
    b = run(11, 400)
    assert a == b
    assert [e["event_id"] for e in a] == [e["event_id"] for e in b]


def test_events_iterator_matches_steps() -> None:
    stepped = run(11, 50)
    sim = simulate.Simulator(seed=11, start=START)
    assert list(itertools.islice(sim.events(), len(stepped))) == stepped


def test_different_seeds_differ() -> None:
    a = run(1, 200)
    b = run(2, 200)
    assert a != b
    ids_a = {e["event_id"] for e in a}
    ids_b = {e["event_id"] for e in b}
    assert not ids_a & ids_b  # the seed is part of every id
    rates_a = [e["rate"] for e in a if e["type"] == "fx_rate"]
    rates_b = [e["rate"] for e in b if e["type"] == "fx_rate"]
    assert rates_a != rates_b


def test_unknown_symbol_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown symbols"):
        simulate.Simulator(symbols=("BTC", "NOPE"))


def test_every_event_passes_the_wire_validation(feed: list[dict[str, Any]]) -> None:
    types: collections.Counter[str] = collections.Counter()
    for obj in feed:
        ev = events.parse_event(obj)
        assert ev.event_id == obj["event_id"]
        types[ev.type] += 1
    assert set(types) == set(events.EVENT_TYPES)


def test_event_ids_are_unique(feed: list[dict[str, Any]]) -> None:
    ids = [e["event_id"] for e in feed]
    assert len(ids) == len(set(ids))


def test_feed_shape(feed: list[dict[str, Any]]) -> None:
    counts = collections.Counter(e["type"] for e in feed)
    assert counts["fx_rate"] == TICKS
    assert counts["spread"] == TICKS * 3  # BTC, ETH, XRP each tick
    assert counts["heartbeat"] == 2 * (TICKS // 10)  # collector and paper, every second
    assert {e["symbol"] for e in feed if e["type"] == "spread"} == {"BTC", "ETH", "XRP"}


def test_positions_are_opened_and_closed_with_their_legs(feed: list[dict[str, Any]]) -> None:
    opens = [i for i, e in enumerate(feed) if e["type"] == "position_open"]
    closes = [i for i, e in enumerate(feed) if e["type"] == "position_close"]
    assert len(opens) >= 10
    assert len(closes) >= 10
    open_keys = [feed[i]["position_key"] for i in opens]
    assert len(open_keys) == len(set(open_keys))  # position keys are unique

    for i in opens:
        po = feed[i]
        key = po["position_key"]
        legs, trade = feed[i + 1 : i + 3], feed[i + 3]
        assert [e["type"] for e in legs] == ["order", "order"]
        assert [e["position_key"] for e in legs] == [key, key]
        assert [e["leg_id"] for e in legs] == [f"{key}_leg_0", f"{key}_leg_1"]
        assert {e["venue"] for e in legs} == {"upbit", "binance_futures"}
        assert trade["type"] == "trade"
        assert trade["side"] == "OPEN"
        assert trade["position_key"] == key
        assert trade["size"] == po["size"] == legs[0]["qty"] == legs[1]["qty"]

    for i in closes:
        pc = feed[i]
        key = pc["position_key"]
        legs, trade = feed[i - 2 : i], feed[i + 1]
        assert [e["type"] for e in legs] == ["order", "order"]
        assert [e["position_key"] for e in legs] == [key, key]
        assert [e["leg_id"] for e in legs] == [f"{key}_leg_2", f"{key}_leg_3"]
        assert trade["type"] == "trade"
        assert trade["side"] == "CLOSE"
        assert trade["position_key"] == key
        assert trade["pnl_krw"] == pc["pnl_krw"]
        assert trade["pnl_pct"] == pc["pnl_pct"]


def test_each_position_has_one_open_at_most_one_close(feed: list[dict[str, Any]]) -> None:
    by_key: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    opened_at: dict[str, dt.datetime] = {}
    for e in feed:
        key = e.get("position_key")
        if key is None:
            continue
        by_key[key][e["type"] + ":" + e.get("side", "")] += 1
        if e["type"] == "position_open":
            opened_at[key] = dt.datetime.fromisoformat(e["timestamp_open"])
        if e["type"] == "position_close":
            assert key in opened_at  # never closed before it was opened
            assert dt.datetime.fromisoformat(e["timestamp_close"]) > opened_at[key]
    closed = 0
    for counts in by_key.values():
        assert counts["position_open:"] == 1
        assert counts["trade:OPEN"] == 1
        assert counts["position_close:"] in (0, 1)
        assert counts["trade:CLOSE"] == counts["position_close:"]
        assert sum(v for k, v in counts.items() if k.startswith("order:")) == (
            2 + 2 * counts["position_close:"]
        )
        closed += counts["position_close:"]
    # at most one position per symbol stays open at the end
    assert len(by_key) - closed <= 3


def test_at_most_one_open_position_per_symbol(feed: list[dict[str, Any]]) -> None:
    open_now: dict[str, str] = {}
    key_symbol: dict[str, str] = {}
    for e in feed:
        if e["type"] == "position_open":
            assert e["symbol"] not in open_now
            open_now[e["symbol"]] = e["position_key"]
            key_symbol[e["position_key"]] = e["symbol"]
        elif e["type"] == "position_close":
            assert open_now.pop(key_symbol[e["position_key"]]) == e["position_key"]


def test_is_opportunity_matches_the_entry_threshold(feed: list[dict[str, Any]]) -> None:
    spreads = [e for e in feed if e["type"] == "spread"]
    for e in spreads:
        net = Decimal(e["net_spread_pct"])
        assert e["is_opportunity"] is (net >= simulate.ENTRY_NET_PCT)
        assert net == Decimal(e["spread_pct"]) - simulate.FEES_PCT
    flags = collections.Counter(e["is_opportunity"] for e in spreads)
    assert flags[True] > 0
    assert flags[False] > 0


def test_a_position_opens_right_after_an_opportunity(feed: list[dict[str, Any]]) -> None:
    for i, e in enumerate(feed):
        if e["type"] == "position_open":
            before = feed[i - 1]
            assert before["type"] == "spread"
            assert before["symbol"] == e["symbol"]
            assert before["is_opportunity"] is True
            assert before["upbit_price"] == e["entry_upbit_price"]
            assert before["spread_pct"] == e["entry_spread_pct"]


def test_times_advance_with_the_ticks(feed: list[dict[str, Any]]) -> None:
    fx_times = [dt.datetime.fromisoformat(e["timestamp"]) for e in feed if e["type"] == "fx_rate"]
    assert fx_times[0] == START + dt.timedelta(seconds=0.1)
    assert all(b - a == dt.timedelta(seconds=0.1) for a, b in itertools.pairwise(fx_times))
    assert all(t.utcoffset() == dt.timedelta(0) for t in fx_times)
