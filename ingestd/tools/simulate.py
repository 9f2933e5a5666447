"""``ingestd simulate``: a realistic, deterministic collector/paper feed.

Binance USDT futures prices random-walk per symbol, USDKRW random-walks, and the Upbit KRW price is
the Binance price in KRW times (1 + a mean-reverting kimchi premium). The collector emits spreads
and FX; a paper trader opens a position when the net spread (after fees) crosses the entry
threshold and closes it when the premium reverts, logging both order legs and the trades; every
component sends heartbeats. The same seed gives the same events, ids included.

Given a ``trading_gate`` (``ingestd simulate`` passes one that reads ``trading:state``), the paper
trader asks it before opening a position, as a live trader should: it opens only while the state
is ACTIVE (REDUCING and HALTED, an absent key included, allow closing only), and logs each refusal
with the state's reasons. Closes are never held back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from ingestd.trading import State, TradingState

log = logging.getLogger("ingestd.tools.simulate")

BASE_USDT: dict[str, Decimal] = {
    "BTC": Decimal("98000"),
    "ETH": Decimal("3400"),
    "XRP": Decimal("2.35"),
    "SOL": Decimal("185"),
    "DOGE": Decimal("0.38"),
}
FEES_PCT = Decimal("0.20")  # both venues' taker fees, round trip
ENTRY_NET_PCT = Decimal("3.20")
EXIT_NET_PCT = Decimal("2.60")
DIRECTION = "upbit_short_binance_long"

_Q = {n: Decimal(1).scaleb(-n) for n in range(9)}


def q(value: Decimal, places: int) -> Decimal:
    """Round half away from zero, as the database does."""
    return value.quantize(_Q[places], rounding=ROUND_HALF_UP)


@dataclasses.dataclass(slots=True)
class _Open:
    key: str
    size: Decimal
    upbit: Decimal
    binance: Decimal
    spread: Decimal
    opened: dt.datetime


class Simulator:
    """Generates the event mix of one collector plus one paper trader."""

    def __init__(
        self,
        *,
        seed: int = 1,
        symbols: tuple[str, ...] = ("BTC", "ETH", "XRP"),
        start: dt.datetime | None = None,
        tick_s: float = 0.1,
        producer_prefix: str = "sim",
        stale_fraction: float = 0.01,
        trading_gate: Callable[[], TradingState] | None = None,
    ) -> None:
        unknown = [s for s in symbols if s not in BASE_USDT]
        if unknown:
            raise ValueError(f"unknown symbols {unknown}; known: {sorted(BASE_USDT)}")
        self.rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not security
        # Which spreads get stale input times: an RNG of its own, so that the market (and every
        # event id) of a seed stays what it was before spreads carried their input times.
        self.stale_rng = random.Random(seed ^ 0x57A1E)  # noqa: S311
        self.stale_fraction = stale_fraction
        self.n_stale = 0
        self.seed = seed
        self.symbols = symbols
        self.now = start or dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.tick = dt.timedelta(seconds=tick_s)
        self.prefix = f"{producer_prefix}{seed}"
        self.usdkrw = Decimal("1385.50")
        self.binance = dict(BASE_USDT)
        self.premium = {s: Decimal("0.030") for s in symbols}
        self.open: dict[str, _Open] = {}
        self.n_events = 0
        self.n_positions = 0
        self.ticks = 0
        self.trading_gate = trading_gate
        self.opens_refused = 0
        self._refusing: State | None = None

    def _id(self, kind: str) -> str:
        self.n_events += 1
        return f"{self.prefix}-{kind}-{self.n_events}"

    def _ts(self, offset_ms: int = 0) -> str:
        return (self.now + dt.timedelta(milliseconds=offset_ms)).isoformat(timespec="milliseconds")

    def events(self) -> Iterator[dict[str, Any]]:
        """An endless, deterministic stream of events."""
        while True:
            yield from self.step()

    def step(self) -> list[dict[str, Any]]:
        """One tick of the market: FX, spreads, maybe trades, sometimes heartbeats."""
        rng = self.rng
        out: list[dict[str, Any]] = []
        self.ticks += 1
        self.now += self.tick
        self.usdkrw = q(self.usdkrw * (1 + Decimal(rng.gauss(0, 0.00005))), 2)
        out.append(
            {
                "type": "fx_rate",
                "event_id": self._id("fx"),
                "producer": "collector",
                "pair": "USDKRW",
                "rate": str(q(self.usdkrw, 8)),
                "source": "upbit",
                "timestamp": self._ts(),
            }
        )
        for i, sym in enumerate(self.symbols):
            self.binance[sym] = self.binance[sym] * (1 + Decimal(rng.gauss(0, 0.0004)))
            # Mean-reverting premium around 3 %, with occasional spikes (the opportunities).
            p = self.premium[sym]
            p += (Decimal("0.030") - p) * Decimal("0.02") + Decimal(rng.gauss(0, 0.0012))
            if rng.random() < 0.002:
                p += Decimal("0.006")
            self.premium[sym] = p
            binance = q(self.binance[sym], 8)
            binance_krw = q(binance * self.usdkrw, 2)
            upbit = q(binance_krw * (1 + p), 2)
            spread = q((upbit - binance_krw) / binance_krw * 100, 4)
            net = spread - FEES_PCT
            ts = self._ts(i + 1)
            out.append(
                {
                    "type": "spread",
                    "event_id": self._id("sp"),
                    "producer": "collector",
                    "symbol": sym,
                    "upbit_price": str(upbit),
                    "binance_price": str(binance),
                    "binance_price_krw": str(binance_krw),
                    "spread_pct": str(spread),
                    "net_spread_pct": str(net),
                    "is_opportunity": net >= ENTRY_NET_PCT,
                    "timestamp": ts,
                    **self._input_times(i + 1),
                }
            )
            pos = self.open.get(sym)
            if pos is None and net >= ENTRY_NET_PCT and self._may_open(sym):
                out.extend(self._open(sym, upbit, binance, spread))
            elif pos is not None and (
                net <= EXIT_NET_PCT or self.now - pos.opened > dt.timedelta(minutes=30)
            ):
                out.extend(self._close(sym, pos, upbit, binance, spread))
        if self.ticks % max(1, int(1 / self.tick.total_seconds())) == 0:
            for component in ("collector", "paper"):
                out.append(
                    {
                        "type": "heartbeat",
                        "event_id": self._id("hb"),
                        "producer": component,
                        "component": component,
                        "timestamp": self._ts(),
                    }
                )
        return out

    def _input_times(self, offset_ms: int) -> dict[str, str]:
        """When the spread's two prices and its FX rate were taken: a few hundred milliseconds
        before it, the rate this tick's; a ``stale_fraction`` of spreads instead has a Binance
        price 3 to 5 s behind, or a rate 5 to 10 s old (ingestd flags both as stale)."""
        rng = self.stale_rng
        upbit_ms = offset_ms - rng.randint(20, 300)
        binance_ms = offset_ms - rng.randint(20, 300)
        fx_ms = 0
        if rng.random() < self.stale_fraction:
            self.n_stale += 1
            if rng.random() < 0.5:
                binance_ms -= rng.randint(3000, 5000)
            else:
                fx_ms -= rng.randint(5000, 10_000)
        return {
            "upbit_ts": self._ts(upbit_ms),
            "binance_ts": self._ts(binance_ms),
            "fx_ts": self._ts(fx_ms),
        }

    def _may_open(self, sym: str) -> bool:
        """Ask the trading gate (if any): open only while trading:state is ACTIVE."""
        if self.trading_gate is None:
            return True
        current = self.trading_gate()
        if current.state is State.ACTIVE:
            if self._refusing is not None:
                log.info(
                    "paper trader: trading:state is ACTIVE again; opening positions",
                    extra={"action": "paper_trading_resumed"},
                )
                self._refusing = None
            return True
        self.opens_refused += 1
        # Logged when the state changes, not for every refused tick of a long halt.
        if self._refusing is not current.state:
            log.warning(
                "paper trader: trading:state is %s (%s): not opening a %s position",
                current.state.value,
                "; ".join(current.reasons) or "no reason given",
                sym,
                extra={"action": "paper_open_refused"},
            )
            self._refusing = current.state
        return False

    def _legs(
        self, key: str, sym: str, size: Decimal, upbit: Decimal, binance: Decimal, closing: bool
    ) -> list[dict[str, Any]]:
        rng = self.rng
        legs = []
        sides = (
            ("upbit", "buy" if closing else "sell", upbit),
            ("binance_futures", "short" if closing else "long", binance),
        )
        for n, (venue, side, price) in enumerate(sides):
            slip_bps = q(Decimal(abs(rng.gauss(0, 3))), 2)
            sign = 1 if side in ("buy", "long") else -1
            effective = q(price * (1 + sign * slip_bps / 10_000), 8)
            legs.append(
                {
                    "type": "order",
                    "event_id": self._id("ord"),
                    "producer": "paper",
                    "mode": "paper",
                    "position_key": key,
                    "symbol": sym,
                    "venue": venue,
                    "side": side,
                    "qty": str(size),
                    "price_theoretical": str(q(price, 8)),
                    "price_effective": str(effective),
                    "slippage_bps": str(slip_bps),
                    "leg_id": f"{key}_leg_{n + (2 if closing else 0)}",
                    "timestamp": self._ts(10 + n),
                }
            )
        return legs

    def _size(self, binance: Decimal) -> Decimal:
        notional_usdt = Decimal(self.rng.choice((500, 1000, 2000)))
        return q(notional_usdt / binance, 8)

    def _open(
        self, sym: str, upbit: Decimal, binance: Decimal, spread: Decimal
    ) -> list[dict[str, Any]]:
        self.n_positions += 1
        key = f"{self.prefix}_pos_{self.n_positions:05d}"
        size = self._size(binance)
        self.open[sym] = _Open(key, size, upbit, binance, spread, self.now)
        common = {"symbol": sym, "direction": DIRECTION, "size": str(size)}
        return [
            {
                "type": "position_open",
                "event_id": self._id("po"),
                "producer": "paper",
                "mode": "paper",
                "position_key": key,
                **common,
                "entry_upbit_price": str(upbit),
                "entry_binance_price": str(binance),
                "entry_spread_pct": str(spread),
                "timestamp_open": self._ts(5),
            },
            *self._legs(key, sym, size, upbit, binance, closing=False),
            {
                "type": "trade",
                "event_id": self._id("tr"),
                "producer": "paper",
                "mode": "paper",
                "position_key": key,
                **common,
                "side": "OPEN",
                "price_upbit": str(upbit),
                "price_binance": str(binance),
                "timestamp": self._ts(20),
            },
        ]

    def _close(
        self, sym: str, pos: _Open, upbit: Decimal, binance: Decimal, spread: Decimal
    ) -> list[dict[str, Any]]:
        del self.open[sym]
        # Short Upbit spot at entry, long Binance futures: gain when Upbit falls / Binance rises.
        upbit_leg = (pos.upbit - upbit) * pos.size
        binance_leg_krw = (binance - pos.binance) * pos.size * self.usdkrw
        fees = (pos.upbit + upbit) * pos.size * FEES_PCT / 200
        pnl = q(upbit_leg + binance_leg_krw - fees, 2)
        pnl_pct = q(pnl / (pos.upbit * pos.size) * 100, 4)
        common = {"symbol": sym, "direction": DIRECTION, "size": str(pos.size)}
        return [
            *self._legs(pos.key, sym, pos.size, upbit, binance, closing=True),
            {
                "type": "position_close",
                "event_id": self._id("pc"),
                "producer": "paper",
                "mode": "paper",
                "position_key": pos.key,
                "exit_upbit_price": str(upbit),
                "exit_binance_price": str(binance),
                "exit_spread_pct": str(spread),
                "pnl_krw": str(pnl),
                "pnl_pct": str(pnl_pct),
                "timestamp_close": self._ts(30),
            },
            {
                "type": "trade",
                "event_id": self._id("tr"),
                "producer": "paper",
                "mode": "paper",
                "position_key": pos.key,
                **common,
                "side": "CLOSE",
                "price_upbit": str(upbit),
                "price_binance": str(binance),
                "pnl_krw": str(pnl),
                "pnl_pct": str(pnl_pct),
                "timestamp": self._ts(40),
            },
        ]


class WallClockPacer:
    """How far the simulated clock is ahead of the wall clock since the start (to sleep it off).

    ``ingestd simulate`` paced to the wall clock must pace by the simulator's own clock, not by
    the number of events sent: a fault scenario drops events (a collector pause drops every
    collector event), and pacing by what was sent let the simulated clock race ahead through the
    dropped stretch and stay ahead (the collector's heartbeats then came dated seconds in the
    future, read as no fresh heartbeat, and trading:state never returned to ACTIVE); positions
    add events, so pacing by count also let it fall behind over a long run.
    """

    def __init__(self, sim: Simulator, clock: Callable[[], float]) -> None:
        self._sim = sim
        self._clock = clock
        self._sim_start = sim.now
        self._wall_start = clock()

    def ahead_s(self) -> float:
        """Seconds the simulated clock is ahead of the wall clock (negative: behind)."""
        simulated = (self._sim.now - self._sim_start).total_seconds()
        return simulated - (self._clock() - self._wall_start)
