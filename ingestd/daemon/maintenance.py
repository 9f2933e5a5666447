"""Periodic database maintenance: the part of the TimescaleDB layer that the database does not do
by itself.

Five tasks, each on its own interval (``maintenance:`` settings):

- ``retention_policies`` (TimescaleDB): makes each hypertable's retention policy match the
  ``retention:`` settings, at start and then hourly (``ingestd_set_retention``);
- ``retention_delete``: on plain PostgreSQL deletes expired rows of the time-series tables in
  bounded batches, one transaction per batch (``ingestd_delete_expired``); on both flavours trims
  the trading-safety history (cleared alerts, closed producer gaps, the seq ranges of quiet
  sessions, old liveness intervals; never an open alert or gap) with fixed statements;
- ``refresh_aggregates``: refreshes the aggregates that are plain materialized views
  (``daily_pnl_summary`` on both flavours, ``hourly_spread_avg`` on plain PostgreSQL;
  ``ingestd_refresh_aggregate``); the continuous aggregate is refreshed by its own policy;
- ``backfill_aggregates`` (TimescaleDB): refreshes the continuous aggregate over the hours
  queued in ``ingestd_aggregate_backfill`` (spreads written before its policy's window: CSV
  imports, late batches; migration 0009), each merged range with ``CALL
  refresh_continuous_aggregate``, on the refresh interval, as the owner of the aggregate;
- ``metrics_keys``: writes ``metrics:daily_pnl:{YYYY-MM-DD}`` and
  ``metrics:hourly_spread:{YYYY-MM-DD-HH}`` from the two aggregates, TTL 1 day.

Several replicas may run this: a replica claims a task's round in ``ingestd_maintenance`` under
``pg_try_advisory_xact_lock`` (never waiting), and only when the last round started at least an
interval ago, so one replica does each round and the others skip it. Refreshing a view needs its
ownership and goes through the SECURITY DEFINER ``ingestd_refresh_aggregate``, because ingestd
usually runs as the writer role, with DML only. Retention is the owner's alone (migration 0007):
the two retention tasks run only where the session's role owns the time-series tables (``ingestd
retention``, or ``ingestd run`` as the owner) and are skipped, said once in the log, elsewhere; the
periods always come from the ``retention:`` settings. The backfill likewise needs the ownership of
the continuous aggregate (``refresh_continuous_aggregate`` checks it and cannot run inside a
function); elsewhere it is skipped, said once, and the queue waits for the owner. A failed round
is logged with ``action=maintenance_failed``, recorded, and retried next round; it never stops the
service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from ingestd.daemon.db import Connection
from ingestd.daemon.gaps import LOCK_ID as GAPS_LOCK_ID
from ingestd.settings import MaintenanceSettings, RetentionSettings
from ingestd.wire.events import utc_iso

log = logging.getLogger("ingestd.daemon.maintenance")

TASK_POLICIES: Final = "retention_policies"
TASK_RETENTION: Final = "retention_delete"
TASK_REFRESH: Final = "refresh_aggregates"
TASK_METRICS: Final = "metrics_keys"
TASK_BACKFILL: Final = "backfill_aggregates"
# Order within one wake-up: the keys are written from freshly refreshed views.
TASKS: Final = (TASK_POLICIES, TASK_RETENTION, TASK_REFRESH, TASK_BACKFILL, TASK_METRICS)

# "ingestd maintenance" in the advisory-lock space, one key per task (migrations use 0x1D6E57D).
# The backfill's key comes last: replicas of an older version keep their keys for the others.
_LOCK_BASE: Final = 0x1D6E600
_LOCK_IDS: Final = {
    task: _LOCK_BASE + i
    for i, task in enumerate((TASK_POLICIES, TASK_RETENTION, TASK_REFRESH, TASK_METRICS))
} | {TASK_BACKFILL: _LOCK_BASE + 4}


def advisory_lock_id(task: str) -> int:
    """The advisory-lock key of a task (a replica holding it has that task's round)."""
    return _LOCK_IDS[task]


# The continuous aggregate the backfill refreshes (a fixed identifier, never a value).
BACKFILL_VIEW: Final = "hourly_spread_avg"
# One CALL refreshes at most this much history, so that each statement stays well inside the
# statement timeout and a 90-day import is refreshed in bounded steps.
BACKFILL_STEP: Final = dt.timedelta(days=1)

# Refreshed in this order, each in its own transaction (migration 0005).
AGGREGATE_VIEWS: Final = ("daily_pnl_summary", "hourly_spread_avg")

METRICS_TTL_S: Final = 86_400  # the metrics:* keys live 1 day
DAILY_PNL_KEY: Final = "metrics:daily_pnl:{day}"
HOURLY_SPREAD_KEY: Final = "metrics:hourly_spread:{hour}"

# Tables with a retention setting, in the order they are handled.
RETENTION_TABLES: Final = ("spreads", "fx_rates", "orders")
# At most this many batches per table per round, so one round stays bounded; the rest waits.
MAX_BATCHES_PER_ROUND: Final = 100

# The trading-safety history (plain tables on both flavours), trimmed by the owner's retention
# round with fixed statements: $1 the period, $2 the batch size. Only what is over is deleted: a
# cleared alert, a closed gap, the seq ranges of a session quiet for the period and without an
# open gap (a running session keeps its ranges, or a hole right after the trim would go unseen),
# a liveness interval whose last heartbeat is older than the period.
HISTORY_TABLES: Final = ("alerts", "producer_gaps", "producer_seq_ranges", "heartbeat_history")
_SQL_TRIM_HISTORY: Final = {
    "alerts": """
DELETE FROM alerts WHERE id = ANY (ARRAY(
    SELECT id FROM alerts WHERE cleared_at < now() - $1::interval
    ORDER BY cleared_at LIMIT $2::int))
""",
    "producer_gaps": """
DELETE FROM producer_gaps WHERE id = ANY (ARRAY(
    SELECT id FROM producer_gaps WHERE closed_at < now() - $1::interval
    ORDER BY closed_at LIMIT $2::int))
""",
    "producer_seq_ranges": """
DELETE FROM producer_seq_ranges r
USING (
    SELECT producer, session FROM (
        SELECT producer, session FROM producer_seq_ranges GROUP BY producer, session
        HAVING max(coalesce(last_recorded_at, recorded_at)) < now() - $1::interval
        EXCEPT
        SELECT producer, session FROM producer_gaps WHERE closed_at IS NULL
    ) AS quiet
    LIMIT $2::int
) AS q
WHERE r.producer = q.producer AND r.session = q.session
""",
    "heartbeat_history": """
DELETE FROM heartbeat_history WHERE id = ANY (ARRAY(
    SELECT id FROM heartbeat_history WHERE last_seen < now() - $1::interval
    ORDER BY last_seen LIMIT $2::int))
""",
}

_SQL_CLAIM: Final = """
INSERT INTO ingestd_maintenance AS m (task, last_started_at, runs)
VALUES ($1, now(), 1)
ON CONFLICT (task) DO UPDATE SET last_started_at = now(), runs = m.runs + 1
WHERE $3 OR m.last_started_at IS NULL
   OR m.last_started_at <= now() - make_interval(secs => $2)
RETURNING true
"""

_SQL_SUCCEEDED: Final = """
UPDATE ingestd_maintenance
SET last_finished_at = clock_timestamp(), last_status = 'success', last_detail = $2,
    last_error = NULL
WHERE task = $1
"""

_SQL_FAILED: Final = """
INSERT INTO ingestd_maintenance AS m (task, last_finished_at, last_status, last_error, failures)
VALUES ($1, clock_timestamp(), 'failed', $2, 1)
ON CONFLICT (task) DO UPDATE SET last_finished_at = clock_timestamp(), last_status = 'failed',
    last_error = $2, failures = m.failures + 1
"""

# Retention needs the rights of the owner of every table it trims (DELETE; TimescaleDB checks
# ownership of the hypertable before it changes a policy): membership in the owning role counts.
SQL_OWNS_RETENTION_TABLES: Final = """
SELECT count(*) = cardinality($1::text[])
       AND bool_and(pg_has_role(current_user, c.relowner, 'USAGE'))
FROM pg_class c
WHERE c.oid = ANY (ARRAY(SELECT to_regclass(t) FROM unnest($1::text[]) AS t))
"""

SQL_HYPERTABLES: Final = """
SELECT hypertable_name::text AS name
FROM timescaledb_information.hypertables
WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass
      = to_regclass(hypertable_name::text)
"""

_SQL_DAILY: Final = """
SELECT trade_date, symbol, trade_count::bigint AS trade_count,
       total_pnl_krw::text AS total_pnl_krw, avg_pnl_pct::text AS avg_pnl_pct,
       max_pnl_krw::text AS max_pnl_krw, min_pnl_krw::text AS min_pnl_krw
FROM daily_pnl_summary
WHERE trade_date >= $1
ORDER BY trade_date, symbol
"""

_SQL_HOURLY: Final = """
SELECT hour, symbol, avg_spread_pct::text AS avg_spread_pct,
       avg_net_spread_pct::text AS avg_net_spread_pct,
       max_spread_pct::text AS max_spread_pct, min_spread_pct::text AS min_spread_pct
FROM hourly_spread_avg
WHERE hour >= $1
ORDER BY hour, symbol
"""

# Errors a round can meet while the database or Redis is down or slow: logged, retried later.
_EXPECTED: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    redis.exceptions.RedisError,
)


# The session's role may refresh the continuous aggregate (it owns it, or is a member of its
# owner); false on plain PostgreSQL, where the view is refreshed whole by refresh_aggregates.
SQL_OWNS_CONTINUOUS_AGGREGATE: Final = """
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND coalesce(pg_has_role(current_user, c.relowner, 'USAGE'), false)
       AND c.relkind = 'v'
FROM pg_class c
WHERE c.oid = to_regclass($1)
"""

_SQL_IS_CONTINUOUS_AGGREGATE: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'v')"
)

_SQL_BACKFILL_QUEUE: Final = """
SELECT id, range_start, range_end FROM ingestd_aggregate_backfill ORDER BY range_start, id
"""

_SQL_BACKFILL_DONE: Final = "DELETE FROM ingestd_aggregate_backfill WHERE id = ANY($1::bigint[])"

_SQL_BACKFILL_REFRESH: Final = (
    f"CALL refresh_continuous_aggregate('{BACKFILL_VIEW}', $1::timestamptz, $2::timestamptz)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class BackfillRange:
    """Queued hours merged into one range to refresh, with the queue rows it settles."""

    start: dt.datetime
    end: dt.datetime
    ids: tuple[int, ...]


def merge_backfill_ranges(rows: list[tuple[int, dt.datetime, dt.datetime]]) -> list[BackfillRange]:
    """Overlapping or adjacent ranges merged, in time order (each queue row in exactly one)."""
    merged: list[BackfillRange] = []
    for row_id, start, end in sorted(rows, key=lambda r: (r[1], r[0])):
        if merged and start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = BackfillRange(last.start, max(last.end, end), (*last.ids, row_id))
        else:
            merged.append(BackfillRange(start, end, (row_id,)))
    return merged


async def may_backfill(conn: Connection) -> bool:
    """True on TimescaleDB when this session's role may refresh the continuous aggregate."""
    return bool(await conn.fetchval(SQL_OWNS_CONTINUOUS_AGGREGATE, BACKFILL_VIEW))


async def drain_backfill(conn: Connection, *, statement_timeout_s: float) -> str:
    """Refresh the continuous aggregate over every queued range, then drop those queue rows.

    ``conn`` must not be in a transaction: refresh_continuous_aggregate commits on its own. A
    range leaves the queue only after its last step is refreshed, so a failure or a crash leaves
    it queued (refreshing an hour twice is harmless). Returns a summary for the log.
    """
    rows = await conn.fetch(_SQL_BACKFILL_QUEUE, timeout=statement_timeout_s)
    ranges = merge_backfill_ranges([(r["id"], r["range_start"], r["range_end"]) for r in rows])
    if not ranges:
        return "nothing queued"
    # Session level, as each CALL is a transaction of its own; the pool's reset restores it.
    await conn.execute(
        "SELECT set_config('statement_timeout', $1, false)", f"{int(statement_timeout_s * 1000)}ms"
    )
    # The hours from here on are the refresh policy's (its window): not refreshed twice.
    cutoff: dt.datetime = await conn.fetchval(
        "SELECT ingestd_backfill_cutoff()", timeout=statement_timeout_s
    )
    hours = 0
    for rng in ranges:
        end = min(rng.end, cutoff)
        step_start = rng.start
        while step_start < end:
            step_end = min(end, step_start + BACKFILL_STEP)
            await conn.execute(
                _SQL_BACKFILL_REFRESH, step_start, step_end, timeout=statement_timeout_s
            )
            step_start = step_end
        await conn.execute(_SQL_BACKFILL_DONE, list(rng.ids), timeout=statement_timeout_s)
        hours += max(0, int((end - rng.start) / dt.timedelta(hours=1)))
    first, last = utc_iso(ranges[0].start), utc_iso(ranges[-1].end)
    return (
        f"refreshed {BACKFILL_VIEW} over {hours} queued hours "
        f"({len(ranges)} ranges, {first} to {last})"
    )


async def backfill_now(conn: Connection, *, statement_timeout_s: float) -> str:
    """Drain the backfill queue now, outside the maintenance schedule (after ``import-csv``).

    Returns what happened; leaves the queue to the maintenance task when this role may not
    refresh the aggregate or a replica is draining it right now.
    """
    if not await conn.fetchval(_SQL_IS_CONTINUOUS_AGGREGATE, BACKFILL_VIEW):
        return "nothing to backfill (a materialized view, refreshed whole by `ingestd run`)"
    if not await may_backfill(conn):
        return "left to the owner's job ingestd_backfill_job (this role does not own the view)"
    lock = _LOCK_IDS[TASK_BACKFILL]
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
        return "another ingestd is refreshing it now"
    try:
        return await drain_backfill(conn, statement_timeout_s=statement_timeout_s)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", lock)


async def hypertable_names(conn: Connection) -> set[str]:
    """The hypertables among this schema's tables (empty without timescaledb)."""
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1)", "timescaledb"
    ):
        return set()
    return {r["name"] for r in await conn.fetch(SQL_HYPERTABLES)}


@dataclasses.dataclass(frozen=True, slots=True)
class RoundResult:
    """What one task's round did: ``ran`` is False when another replica had it."""

    task: str
    ran: bool
    detail: str = ""


def _fmt_hour(hour: dt.datetime) -> str:
    return hour.astimezone(dt.UTC).strftime("%Y-%m-%d-%H")


def daily_pnl_documents(rows: list[asyncpg.Record], refreshed_at: str) -> dict[str, bytes]:
    """``metrics:daily_pnl:{day}`` values: per-symbol rows of the view plus exact day totals."""
    by_day: dict[dt.date, list[asyncpg.Record]] = {}
    for r in rows:
        by_day.setdefault(r["trade_date"], []).append(r)
    out: dict[str, bytes] = {}
    for day, day_rows in by_day.items():
        symbols = {
            r["symbol"]: {
                "trade_count": r["trade_count"],
                "total_pnl_krw": r["total_pnl_krw"],
                "avg_pnl_pct": r["avg_pnl_pct"],
                "max_pnl_krw": r["max_pnl_krw"],
                "min_pnl_krw": r["min_pnl_krw"],
            }
            for r in day_rows
        }
        totals = [Decimal(r["total_pnl_krw"]) for r in day_rows if r["total_pnl_krw"] is not None]
        maxima = [Decimal(r["max_pnl_krw"]) for r in day_rows if r["max_pnl_krw"] is not None]
        minima = [Decimal(r["min_pnl_krw"]) for r in day_rows if r["min_pnl_krw"] is not None]
        doc: dict[str, Any] = {
            "trade_date": day.isoformat(),
            "trade_count": sum(r["trade_count"] for r in day_rows),
            "total_pnl_krw": str(sum(totals, Decimal(0))) if totals else None,
            "max_pnl_krw": str(max(maxima)) if maxima else None,
            "min_pnl_krw": str(min(minima)) if minima else None,
            "symbols": symbols,
            "refreshed_at": refreshed_at,
        }
        out[DAILY_PNL_KEY.format(day=day.isoformat())] = orjson.dumps(doc)
    return out


def hourly_spread_documents(rows: list[asyncpg.Record], refreshed_at: str) -> dict[str, bytes]:
    """``metrics:hourly_spread:{YYYY-MM-DD-HH}`` values: that hour's averages per symbol."""
    by_hour: dict[dt.datetime, dict[str, dict[str, str]]] = {}
    for r in rows:
        by_hour.setdefault(r["hour"], {})[r["symbol"]] = {
            "avg_spread_pct": r["avg_spread_pct"],
            "avg_net_spread_pct": r["avg_net_spread_pct"],
            "max_spread_pct": r["max_spread_pct"],
            "min_spread_pct": r["min_spread_pct"],
        }
    return {
        HOURLY_SPREAD_KEY.format(hour=_fmt_hour(hour)): orjson.dumps(
            {"hour": utc_iso(hour), "symbols": symbols, "refreshed_at": refreshed_at}
        )
        for hour, symbols in by_hour.items()
    }


async def may_run_retention(conn: Connection) -> bool:
    """True when this session's role owns (or is a member of the owner of) the retention tables."""
    return bool(
        await conn.fetchval(SQL_OWNS_RETENTION_TABLES, [*RETENTION_TABLES, *HISTORY_TABLES])
    )


def retention_days(retention: RetentionSettings) -> dict[str, int]:
    """Configured retention per table in days (0: keep forever)."""
    r = retention
    return {"spreads": r.spreads_days, "fx_rates": r.fx_rates_days, "orders": r.orders_days}


def history_retention_days(retention: RetentionSettings) -> dict[str, int]:
    """Configured retention of the trading-safety history in days (0: keep forever)."""
    r = retention
    return {
        "alerts": r.alerts_days,
        "producer_gaps": r.producer_gaps_days,
        "producer_seq_ranges": r.producer_seq_ranges_days,
        "heartbeat_history": r.heartbeat_history_days,
    }


async def reconcile_retention_policies(
    conn: Connection, retention: RetentionSettings, *, statement_timeout_s: float
) -> str:
    """TimescaleDB: each retention policy set to the settings (as the owner); returns a summary."""
    outcomes: list[str] = []
    for table, days in retention_days(retention).items():
        keep = dt.timedelta(days=days) if days > 0 else None
        outcome = await conn.fetchval(
            "SELECT ingestd_set_retention($1, $2)", table, keep, timeout=statement_timeout_s
        )
        if outcome != "plain":
            kept = f"{days} days" if days else "kept forever"
            outcomes.append(f"{table} ({kept}): {outcome}")
        if outcome in {"added", "changed", "removed"}:
            log.info(
                "retention policy of %s %s (%s days)",
                table,
                outcome,
                days or "forever",
                extra={"action": "retention_policy_set", "table": table},
            )
    return "; ".join(outcomes) if outcomes else "no hypertables"


class Maintenance:
    """Runs the maintenance tasks on their intervals until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis_client: aioredis.Redis | None,
        *,
        settings: MaintenanceSettings,
        retention: RetentionSettings,
        key_prefix: str = "",
        acquire_timeout_s: float = 5.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._pool = pool
        self._redis = redis_client
        self.settings = settings
        self.retention = retention
        self.prefix = key_prefix
        self._acquire_timeout_s = acquire_timeout_s
        self._clock = clock
        self._tasks: dict[str, tuple[Callable[[bool], Awaitable[RoundResult]], float]] = {
            TASK_POLICIES: (self.reconcile_policies, settings.policy_interval_s),
            TASK_RETENTION: (self.delete_expired, settings.retention_interval_s),
            TASK_REFRESH: (self.refresh_aggregates, settings.refresh_interval_s),
            TASK_BACKFILL: (self.backfill_aggregates, settings.refresh_interval_s),
            TASK_METRICS: (self.write_metrics_keys, settings.metrics_interval_s),
        }
        self.failures = 0
        self._said_not_owner = False
        self._said_not_aggregate_owner = False

    def retention_days(self) -> dict[str, int]:
        """Configured retention per table in days (0: keep forever)."""
        return retention_days(self.retention)

    async def run(self) -> None:
        """Every task at start, then each on its interval; returns only when cancelled."""
        next_due = dict.fromkeys(TASKS, 0.0)
        while True:
            for task in TASKS:
                if time.monotonic() >= next_due[task]:
                    await self.run_task(task)
                    next_due[task] = time.monotonic() + self._tasks[task][1]
            await asyncio.sleep(max(0.05, min(next_due.values()) - time.monotonic()))

    async def run_task(self, task: str, *, force: bool = False) -> RoundResult | None:
        """One round of one task (``force``: even if a round ran within the interval).

        Returns None when the round failed (logged, recorded, retried next round).
        """
        run, _ = self._tasks[task]
        try:
            result = await run(force)
        except asyncio.CancelledError:
            raise
        except _EXPECTED as exc:
            await self._failed(task, exc)
            return None
        except Exception as exc:  # a bug in one task must not stop the service
            log.exception("maintenance task %s crashed", task, extra={"action": "maintenance_bug"})
            await self._failed(task, exc)
            return None
        if result.ran:
            log.info(
                "maintenance %s: %s",
                task,
                result.detail or "done",
                extra={"action": "maintenance_done", "task": task},
            )
        return result

    async def run_all(self, *, force: bool = True) -> list[RoundResult | None]:
        """One round of every task, in order (tests and ``ingestd stats --refresh``)."""
        return [await self.run_task(task, force=force) for task in TASKS]

    async def _failed(self, task: str, exc: BaseException) -> None:
        self.failures += 1
        log.warning(
            "maintenance %s failed, will retry next round: %s",
            task,
            exc,
            extra={"action": "maintenance_failed", "task": task},
        )
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                await conn.execute(_SQL_FAILED, task, f"{type(exc).__name__}: {exc}"[:2000])
        except _EXPECTED as record_exc:
            log.warning(
                "could not record the failure of maintenance %s: %s",
                task,
                record_exc,
                extra={"action": "maintenance_record_failed", "task": task},
            )

    async def _claim(self, conn: Connection, task: str, interval_s: float, force: bool) -> bool:
        """Inside a transaction: True if this replica does the round (lock free, round due)."""
        locked = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_IDS[task])
        if not locked:
            return False
        # 90 % of the interval: replicas whose clocks tick slightly apart still take turns.
        claimed = await conn.fetchval(_SQL_CLAIM, task, interval_s * 0.9, force)
        return bool(claimed)

    async def _set_timeout(self, conn: Connection) -> None:
        # A refresh over a large table outlasts the role's statement_timeout (and the pool's
        # command_timeout, which every call below overrides).
        await conn.execute(
            "SELECT set_config('statement_timeout', $1, true)",
            f"{int(self.settings.statement_timeout_s * 1000)}ms",
        )

    async def _not_the_owner(self, conn: Connection, task: str) -> RoundResult | None:
        """A skipped round when this role may not run retention (said once), else None."""
        if await may_run_retention(conn):
            return None
        if not self._said_not_owner:
            self._said_not_owner = True
            log.info(
                "retention is left to the owner of the tables: this role is not it "
                "(run `ingestd retention` as the owner)",
                extra={"action": "retention_not_owner"},
            )
        return RoundResult(task, ran=False, detail="not the owner")

    async def reconcile_policies(self, force: bool = False) -> RoundResult:
        """TimescaleDB: make each retention policy match the ``retention:`` settings."""
        timeout = self.settings.statement_timeout_s
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn, conn.transaction():
            if (skipped := await self._not_the_owner(conn, TASK_POLICIES)) is not None:
                return skipped
            if not await self._claim(conn, TASK_POLICIES, self.settings.policy_interval_s, force):
                return RoundResult(TASK_POLICIES, ran=False)
            await self._set_timeout(conn)
            detail = await reconcile_retention_policies(
                conn, self.retention, statement_timeout_s=timeout
            )
            await conn.execute(_SQL_SUCCEEDED, TASK_POLICIES, detail)
        return RoundResult(TASK_POLICIES, ran=True, detail=detail)

    async def delete_expired(self, force: bool = False) -> RoundResult:
        """Plain PostgreSQL: delete rows past their retention, a bounded batch per transaction."""
        timeout = self.settings.statement_timeout_s
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            if (skipped := await self._not_the_owner(conn, TASK_RETENTION)) is not None:
                return skipped
            async with conn.transaction():
                if not await self._claim(
                    conn, TASK_RETENTION, self.settings.retention_interval_s, force
                ):
                    return RoundResult(TASK_RETENTION, ran=False)
            hyper = await hypertable_names(conn)
            deleted: dict[str, int] = {}
            for table, days in self.retention_days().items():
                if days <= 0 or table in hyper:
                    continue
                total = 0
                for _ in range(MAX_BATCHES_PER_ROUND):
                    async with conn.transaction():
                        await self._set_timeout(conn)
                        n = int(
                            await conn.fetchval(
                                "SELECT ingestd_delete_expired($1, $2, $3)",
                                table,
                                dt.timedelta(days=days),
                                self.retention.delete_batch_rows,
                                timeout=timeout,
                            )
                        )
                    total += n
                    if n < self.retention.delete_batch_rows:
                        break
                deleted[table] = total
            by_policies = not deleted
            deleted |= await self._trim_history(conn)
            detail = ", ".join(f"{t}: {n} rows deleted" for t, n in deleted.items())
            if by_policies:
                detail = "retention is done by TimescaleDB policies" + (
                    f"; {detail}" if detail else ""
                )
            await conn.execute(_SQL_SUCCEEDED, TASK_RETENTION, detail)
        return RoundResult(TASK_RETENTION, ran=True, detail=detail)

    async def _trim_history(self, conn: Connection) -> dict[str, int]:
        """Delete what is over in the trading-safety history (bounded batches, as the owner)."""
        timeout = self.settings.statement_timeout_s
        batch = self.retention.delete_batch_rows
        deleted: dict[str, int] = {}
        for table, days in history_retention_days(self.retention).items():
            if days <= 0:
                continue
            total = 0
            for _ in range(MAX_BATCHES_PER_ROUND):
                async with conn.transaction():
                    await self._set_timeout(conn)
                    if table == "producer_seq_ranges":
                        # Not while a gap sweep rewrites a session's ranges (it merges them).
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", GAPS_LOCK_ID)
                    status = await conn.execute(
                        _SQL_TRIM_HISTORY[table],
                        dt.timedelta(days=days),
                        batch,
                        timeout=timeout,
                    )
                n = int(status.split()[-1])
                total += n
                # The seq ranges are deleted by sessions (a batch may hold more rows than that).
                if n == 0 or (table != "producer_seq_ranges" and n < batch):
                    break
            deleted[table] = total
        return deleted

    async def refresh_aggregates(self, force: bool = False) -> RoundResult:
        """Refresh the aggregates that are plain materialized views (CONCURRENTLY).

        Each view in a transaction of its own, daily_pnl_summary first: a slow recompute of
        hourly_spread_avg (plain PostgreSQL) must not roll back the daily refresh with it.
        """
        timeout = self.settings.statement_timeout_s
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            async with conn.transaction():
                if not await self._claim(
                    conn, TASK_REFRESH, self.settings.refresh_interval_s, force
                ):
                    return RoundResult(TASK_REFRESH, ran=False)
            refreshed: list[str] = []
            for view in AGGREGATE_VIEWS:
                async with conn.transaction():
                    await self._set_timeout(conn)
                    if await conn.fetchval(
                        "SELECT ingestd_refresh_aggregate($1)", view, timeout=timeout
                    ):
                        refreshed.append(view)
            detail = "refreshed " + ", ".join(refreshed) if refreshed else "nothing to refresh"
            await conn.execute(_SQL_SUCCEEDED, TASK_REFRESH, detail)
        return RoundResult(TASK_REFRESH, ran=True, detail=detail)

    async def backfill_aggregates(self, force: bool = False) -> RoundResult:
        """TimescaleDB: refresh hourly_spread_avg over the hours queued before its policy's window.

        One replica at a time: a session-level advisory lock (held across the refreshes, which
        commit on their own, so a transaction-level lock would not last) plus the usual claim.
        """
        lock = _LOCK_IDS[TASK_BACKFILL]
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            if not await conn.fetchval(_SQL_IS_CONTINUOUS_AGGREGATE, BACKFILL_VIEW):
                # Plain PostgreSQL: refresh_aggregates recomputes the whole view every round.
                async with conn.transaction():
                    if not await self._claim(
                        conn, TASK_BACKFILL, self.settings.refresh_interval_s, force
                    ):
                        return RoundResult(TASK_BACKFILL, ran=False)
                    detail = f"nothing to backfill: {BACKFILL_VIEW} is refreshed whole"
                    await conn.execute(_SQL_SUCCEEDED, TASK_BACKFILL, detail)
                return RoundResult(TASK_BACKFILL, ran=True, detail=detail)
            if not await may_backfill(conn):
                if not self._said_not_aggregate_owner:
                    self._said_not_aggregate_owner = True
                    log.info(
                        "the backfill of %s is left to its owner (this role does not own it): "
                        "the owner's job ingestd_backfill_job drains the queue",
                        BACKFILL_VIEW,
                        extra={"action": "backfill_not_owner"},
                    )
                return RoundResult(TASK_BACKFILL, ran=False, detail="not the owner")
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                return RoundResult(TASK_BACKFILL, ran=False)
            try:
                async with conn.transaction():
                    claimed = await conn.fetchval(
                        _SQL_CLAIM, TASK_BACKFILL, self.settings.refresh_interval_s * 0.9, force
                    )
                if not claimed:
                    return RoundResult(TASK_BACKFILL, ran=False)
                detail = await drain_backfill(
                    conn, statement_timeout_s=self.settings.statement_timeout_s
                )
                await conn.execute(_SQL_SUCCEEDED, TASK_BACKFILL, detail)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        return RoundResult(TASK_BACKFILL, ran=True, detail=detail)

    async def write_metrics_keys(self, force: bool = False) -> RoundResult:
        """Write the ``metrics:*`` keys of the last days and hours from the two aggregates."""
        timeout = self.settings.statement_timeout_s
        now = self._clock()
        first_day = now.astimezone(dt.UTC).date() - dt.timedelta(
            days=self.settings.metrics_days - 1
        )
        first_hour = now.astimezone(dt.UTC).replace(
            minute=0, second=0, microsecond=0
        ) - dt.timedelta(hours=self.settings.metrics_hours - 1)
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            async with conn.transaction():
                if not await self._claim(
                    conn, TASK_METRICS, self.settings.metrics_interval_s, force
                ):
                    return RoundResult(TASK_METRICS, ran=False)
                await self._set_timeout(conn)
                daily = await conn.fetch(_SQL_DAILY, first_day, timeout=timeout)
                hourly = await conn.fetch(_SQL_HOURLY, first_hour, timeout=timeout)
            stamp = utc_iso(now)
            docs = {**daily_pnl_documents(daily, stamp), **hourly_spread_documents(hourly, stamp)}
            if docs:
                if self._redis is None:
                    raise RuntimeError("metrics_keys needs a Redis client")
                pipe = self._redis.pipeline(transaction=False)
                for name, value in docs.items():
                    pipe.set(self.prefix + name, value, ex=METRICS_TTL_S)
                await pipe.execute()
            n_daily = sum(1 for k in docs if k.startswith("metrics:daily_pnl:"))
            detail = f"{n_daily} daily_pnl and {len(docs) - n_daily} hourly_spread keys written"
            await conn.execute(_SQL_SUCCEEDED, TASK_METRICS, detail)
        return RoundResult(TASK_METRICS, ran=True, detail=detail)
