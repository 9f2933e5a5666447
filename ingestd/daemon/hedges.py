"""Half-hedge alerts: a position whose filled legs on its two venues do not match.

An arbitrage position is hedged when the quantity filled on one venue (e.g. ``upbit``) matches
the quantity filled on the other (e.g. ``binance_futures``). Both venues quote these positions in
coin units (Upbit's ``KRW-BTC`` volume and Binance USDⓈ-M futures' quantity are both in BTC), so
the ``qty`` of the orders compares directly, as exact decimals.

The rule, per position (``producer``, ``position_key``), over its orders on the two venues:

- a leg is *filled* when its order has an effective price (``price_effective`` is set);
- ``filled(venue)`` is the sum of ``qty`` of its filled legs on that venue (opening and closing
  legs alike: after a complete open both venues have ``size``, after a complete close ``2 * size``);
- the legs *match* when ``|filled(a) - filled(b)| <= tolerance * max(filled(a), filled(b))``
  (tolerance 0.001 = 0.1 % by default; the comparison is exact, on the boundary they match);
- a position whose legs have not matched for ``after_s`` (default 30 s), counted from its newest
  filled leg on the heavier venue (by event time, and by arrival in the database, whichever is
  later, so a leg that arrives late after an outage gets its partner's full grace period), is
  *half-hedged*: it is raised, and stays raised until its legs match again.

This is computed from the database, not from the events one replica happens to see (with several
replicas each sees only part of the stream). One replica at a time runs a round, under a
session-level advisory lock it tries without waiting (the others skip the round and only read the
count for their gauge); and at most one open alert per position (a partial unique index on kind,
producer, key), so a half hedge is raised, counted and cleared once. Each round then makes Redis
match the table: one ``alerts:half_hedge:{position_key}`` key per position_key with an open alert
(JSON, no TTL), every other key under that prefix deleted.

A position is named by ``(producer, position_key)``: two producers (a paper and a live trader
counting from the same ``pos_001``) have two positions, and each has its own alert, raised and
cleared on its own legs. The Redis key has only the position_key in its name, so its value says
whose position it is (``producer``, ``mode``) and, when several producers have an open half hedge
under that position_key, lists each of them in ``alerts`` (the top-level fields are those of the
earliest raised): the key goes away only when none is left, and no producer's alert replaces or
clears another's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from decimal import Decimal
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis

from ingestd import errors
from ingestd.daemon.db import Connection
from ingestd.daemon.metrics import Metrics
from ingestd.settings import HalfHedgeSettings
from ingestd.wire.events import utc_iso

log = logging.getLogger("ingestd.daemon.hedges")

KIND: Final = "half_hedge"
KEY_PREFIX: Final = "alerts:half_hedge:"
# "ingestd half hedge" in the advisory-lock space (maintenance uses 0x1D6E600 + n, migrations
# 0x1D6E57D).
LOCK_ID: Final = 0x1D6E700


def redis_key(position_key: str) -> str:
    """``alerts:half_hedge:{position_key}``."""
    return KEY_PREFIX + position_key


# Positions with a leg inside the look-back window, plus those with an open alert (so an alert
# never clears just because its legs grew old), and the filled quantity per venue of each.
_SQL_LEGS: Final = """
WITH candidates AS (
    SELECT DISTINCT producer, position_key
    FROM orders
    WHERE position_key IS NOT NULL AND timestamp >= now() - make_interval(secs => $3)
    UNION
    SELECT nullif(producer, ''), key FROM alerts WHERE kind = $4 AND cleared_at IS NULL
)
SELECT o.producer, o.position_key, min(o.symbol) AS symbol, min(o.mode) AS mode,
       coalesce(sum(o.qty) FILTER (WHERE o.venue = $1), 0) AS qty_a,
       coalesce(sum(o.qty) FILTER (WHERE o.venue = $2), 0) AS qty_b,
       max(o.timestamp) FILTER (WHERE o.venue = $1) AS since_a,
       max(o.timestamp) FILTER (WHERE o.venue = $2) AS since_b,
       max(greatest(o.timestamp, o.created_at)) FILTER (WHERE o.venue = $1) AS seen_a,
       max(greatest(o.timestamp, o.created_at)) FILTER (WHERE o.venue = $2) AS seen_b
FROM orders o
JOIN candidates c
  ON o.position_key = c.position_key AND o.producer IS NOT DISTINCT FROM c.producer
WHERE o.price_effective IS NOT NULL AND o.venue IN ($1, $2)
GROUP BY o.producer, o.position_key
ORDER BY o.position_key, o.producer NULLS FIRST
"""

_SQL_OPEN: Final = """
SELECT producer, key, details::text AS details, raised_at FROM alerts
WHERE kind = $1 AND cleared_at IS NULL
ORDER BY key, raised_at, producer
"""

_SQL_RAISE: Final = """
INSERT INTO alerts (kind, producer, key, details) VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (kind, producer, key) WHERE cleared_at IS NULL DO NOTHING
RETURNING raised_at
"""

_SQL_CLEAR: Final = """
UPDATE alerts SET cleared_at = greatest(now(), raised_at)
WHERE kind = $1 AND producer = $2 AND key = $3 AND cleared_at IS NULL
RETURNING cleared_at
"""

# A position's identity in the alerts table: (producer, position_key), '' for no producer.
PositionId = tuple[str, str]

_SQL_COUNT_OPEN: Final = "SELECT count(*) FROM alerts WHERE kind = $1 AND cleared_at IS NULL"


@dataclasses.dataclass(frozen=True, slots=True)
class Legs:
    """One position's filled quantity per venue, and when each venue's newest leg came."""

    producer: str | None
    position_key: str
    symbol: str
    mode: str | None
    qty: tuple[Decimal, Decimal]
    since: tuple[dt.datetime | None, dt.datetime | None]  # newest filled leg, event time
    seen: tuple[dt.datetime | None, dt.datetime | None]  # ... or its arrival, if later


def legs_match(a: Decimal, b: Decimal, tolerance: Decimal) -> bool:
    """True when the two filled quantities hedge each other (exact; the boundary matches)."""
    return abs(a - b) <= tolerance * max(a, b)


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    """What one round did: open alerts after it, and those it raised and cleared."""

    open: int
    raised: list[str]
    cleared: list[str]


class HalfHedgeMonitor:
    """Raises and clears half-hedge alerts every ``check_interval_s`` (see the module doc)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        metrics: Metrics,
        *,
        settings: HalfHedgeSettings,
        key_prefix: str = "",
        acquire_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.metrics = metrics
        self.settings = settings
        self.prefix = key_prefix
        self.acquire_timeout_s = acquire_timeout_s
        self.venues = settings.venue_pair
        self.tolerance = settings.tolerance

    async def run(self) -> None:
        """Forever: one round per interval; a failed round is logged and retried next time."""
        while True:
            await self.run_once()
            await asyncio.sleep(self.settings.check_interval_s)

    async def run_once(self) -> Round | None:
        """One round (None when it failed or another replica held it and no count was read)."""
        try:
            result = await self._round()
        except Exception as exc:  # noqa: BLE001 - the next round retries; never die silently
            log.log(
                logging.WARNING if errors.is_retriable(exc) else logging.ERROR,
                "half-hedge check failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"action": "half_hedge_check_failed"},
            )
            return None
        self.metrics.half_hedges_open = result.open
        return result

    async def _round(self) -> Round:
        async with (
            self.pool.acquire(timeout=self.acquire_timeout_s) as conn,
            conn.transaction(),
        ):
            # A transaction-level lock: it ends with the transaction whatever happens (a pooled
            # connection never keeps it), and covers the Redis writes below, so two rounds never
            # write Redis out of order.
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_ID):
                # Another replica runs this round; the gauge still shows the table's truth.
                return Round(int(await conn.fetchval(_SQL_COUNT_OPEN, KIND)), [], [])
            raised, cleared, unmatched = await self._raise_and_clear(conn)
            current = await conn.fetch(_SQL_OPEN, KIND)
            # Before the commit, still under the lock: at worst a key is written for a change
            # whose commit then fails, and the next round puts Redis right.
            await self._sync_redis(self._values(current, unmatched))
        self._report(raised, cleared, unmatched)
        return Round(len(current), [key for _, key in raised], [key for _, key in cleared])

    async def _raise_and_clear(
        self, conn: Connection
    ) -> tuple[list[PositionId], list[PositionId], dict[PositionId, dict[str, Any]]]:
        s = self.settings
        raised: list[PositionId] = []
        cleared: list[PositionId] = []
        now: dt.datetime = await conn.fetchval("SELECT now()")
        rows = await conn.fetch(_SQL_LEGS, *self.venues, s.lookback_s, KIND)
        open_ids = {(r["producer"], r["key"]) for r in await conn.fetch(_SQL_OPEN, KIND)}
        unmatched: dict[PositionId, dict[str, Any]] = {}
        for row in rows:
            legs = Legs(
                row["producer"],
                row["position_key"],
                row["symbol"],
                row["mode"],
                (row["qty_a"], row["qty_b"]),
                (row["since_a"], row["since_b"]),
                (row["seen_a"], row["seen_b"]),
            )
            ident = (legs.producer or "", legs.position_key)
            if legs_match(*legs.qty, self.tolerance):
                continue
            heavy = 0 if legs.qty[0] > legs.qty[1] else 1
            seen = legs.seen[heavy]
            assert seen is not None  # the heavier venue has a filled leg
            # An open alert stays open until the legs match (a further partial leg that still
            # leaves them apart does not restart its time).
            if ident in open_ids or (now - seen).total_seconds() >= s.after_s:
                unmatched[ident] = self._details(legs, heavy)
        for ident, details in unmatched.items():
            if ident in open_ids:
                continue
            producer, key = ident
            if await conn.fetchval(_SQL_RAISE, KIND, producer, key, orjson.dumps(details).decode()):
                raised.append(ident)
        for ident in sorted(open_ids):
            if ident not in unmatched and await conn.fetchval(_SQL_CLEAR, KIND, *ident):
                cleared.append(ident)
        return raised, cleared, unmatched

    def _report(
        self,
        raised: list[PositionId],
        cleared: list[PositionId],
        unmatched: dict[PositionId, dict[str, Any]],
    ) -> None:
        # Counted and logged once committed.
        self.metrics.half_hedges_raised += len(raised)
        self.metrics.half_hedges_cleared += len(cleared)
        for ident in raised:
            d = unmatched[ident]
            log.warning(
                "half hedge: position %s of %s (%s) has %s %s filled on %s and %s on %s",
                ident[1],
                ident[0] or "(no producer)",
                d["mode"] or "mode not given",
                d["quantity"],
                d["symbol"],
                d["filled_venue"],
                d["other_quantity"],
                d["other_venue"],
                extra={"action": "half_hedge_raised"},
            )
        for ident in cleared:
            log.info(
                "half hedge cleared: position %s of %s is matched again",
                ident[1],
                ident[0] or "(no producer)",
                extra={"action": "half_hedge_cleared"},
            )

    def _details(self, legs: Legs, heavy: int) -> dict[str, Any]:
        other = 1 - heavy
        since = legs.since[heavy]
        assert since is not None
        return {
            "position_key": legs.position_key,
            "producer": legs.producer,
            "mode": legs.mode,
            "symbol": legs.symbol,
            "filled_venue": self.venues[heavy],
            "quantity": str(legs.qty[heavy]),
            "other_venue": self.venues[other],
            "other_quantity": str(legs.qty[other]),
            "since": utc_iso(since),
        }

    @staticmethod
    def _values(
        current: list[asyncpg.Record], unmatched: dict[PositionId, dict[str, Any]]
    ) -> dict[str, bytes]:
        """The value of each ``alerts:half_hedge:{position_key}``: the earliest raised open alert
        under that position_key at the top level, and every one of them (one per producer) in
        ``alerts``. ``current`` comes ordered by key, then raised_at."""
        by_key: dict[str, list[dict[str, Any]]] = {}
        for r in current:
            details: dict[str, Any] = orjson.loads(r["details"])
            # The quantities as they are now (a further partial leg may have landed since).
            details.update(unmatched.get((r["producer"], r["key"]), {}))
            details.setdefault("mode", None)
            details["raised_at"] = utc_iso(r["raised_at"])
            by_key.setdefault(r["key"], []).append(details)
        return {
            key: orjson.dumps({**alerts[0], "alerts": alerts}) for key, alerts in by_key.items()
        }

    async def _sync_redis(self, values: dict[str, bytes]) -> None:
        """Redis as the table says (still under the lock, so rounds never write out of order)."""
        try:
            stale = [
                key
                async for key in self.redis.scan_iter(
                    match=self.prefix + KEY_PREFIX + "*", count=1000
                )
                if key.decode()[len(self.prefix) + len(KEY_PREFIX) :] not in values
            ]
            async with self.redis.pipeline(transaction=False) as pipe:
                for position_key, value in values.items():
                    pipe.set(self.prefix + redis_key(position_key), value)
                if stale:
                    pipe.delete(*stale)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the table is the truth; the next round syncs
            log.warning(
                "writing the half-hedge keys to Redis failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"action": "half_hedge_redis_failed"},
            )
