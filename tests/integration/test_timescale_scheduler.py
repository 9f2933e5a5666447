"""TimescaleDB's own background scheduler runs the policies, and late data lands once.

The migration's retention, compression and continuous-aggregate refresh policies are put on a
short schedule in a fresh database; TimescaleDB's scheduler (not ``CALL run_job``) runs them, and
the test checks what each did, that ``job_stats`` records no failure and that ``ingestd stats``
shows them succeeding. Then late and redelivered spreads go through ingestd's sink into chunks the
scheduler has compressed and into hours it has materialized: each lands once, and the next
scheduled runs put them into the aggregate and compress the chunk again.

Needs a TimescaleDB build whose scheduler works on the PostgreSQL it runs on (scripts/services.sh
builds one); skipped, or failed with CI=true, where there is none.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import load_settings
from tests.conftest import PgServer
from tests.daemons import run_cli
from tests.sink_items import fx, item, order, spread

pytestmark = [pytest.mark.pg, pytest.mark.timescale]

UTC = dt.UTC
# How long the scheduler gets for one round of every job. A bound on a hung scheduler, not on
# speed: on an idle machine a round takes a few seconds.
DEADLINE_S = 240.0
# In the order the test has the scheduler run them.
POLICIES = ("policy_retention", "policy_compression", "policy_refresh_continuous_aggregate")
# _timescaledb_catalog.chunk.status bits: compressed; partially (rows outside the columnstore).
CHUNK_COMPRESSED = 1
CHUNK_PARTIALLY_COMPRESSED = 8


def iso(moment: dt.datetime) -> str:
    """RFC 3339 UTC."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def hour_of(moment: dt.datetime) -> dt.datetime:
    """The UTC hour bucket."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def mean(values: Iterable[Decimal]) -> Decimal:
    """The exact mean, to compare with PostgreSQL's AVG(numeric) rounded to its scale."""
    vals = list(values)
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        return sum(vals, Decimal(0)) / len(vals)


def same_avg(got: Decimal, values: Iterable[Decimal]) -> bool:
    """``got`` is the exact mean rounded half away from zero at the scale PostgreSQL chose."""
    scale = -int(got.as_tuple().exponent)
    return got == mean(values).quantize(Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP)


@pytest.fixture
async def dsn(timescale_server: PgServer) -> AsyncIterator[str]:
    """A freshly migrated database with TimescaleDB, its scheduler running (not a clone: the
    scheduler of the template would keep it open)."""
    url = await timescale_server.create_migrated("ingestd_sched")
    yield url
    await timescale_server.drop(url)


async def policy_jobs(conn: asyncpg.Connection) -> dict[tuple[str, str], asyncpg.Record]:
    """The policies' jobs of this database with their stats, by (policy, target table/view)."""
    rows = await conn.fetch(
        """
        SELECT j.job_id, j.proc_name::text AS proc, j.config,
               coalesce(ca.view_name::text, j.hypertable_name::text) AS target,
               s.last_run_started_at, s.last_successful_finish, s.last_run_status::text AS status,
               coalesce(s.total_runs, 0) AS runs, coalesce(s.total_successes, 0) AS successes,
               coalesce(s.total_failures, 0) AS failures
        FROM timescaledb_information.jobs j
        LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
        LEFT JOIN timescaledb_information.continuous_aggregates ca
          ON ca.materialization_hypertable_name = j.hypertable_name
        WHERE j.proc_name = ANY($1::text[])
        """,
        list(POLICIES),
    )
    return {(r["proc"], r["target"]): r for r in rows}


async def job_errors(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """What the scheduler recorded about failed runs (empty when none failed)."""
    rows = await conn.fetch(
        "SELECT job_id, proc_name::text, sqlerrcode, err_message"
        " FROM timescaledb_information.job_errors WHERE proc_name = ANY($1::text[])",
        list(POLICIES),
    )
    return [dict(r) for r in rows]


def _after(moment: dt.datetime | None, than: dt.datetime) -> bool:
    """``moment`` is a real time later than ``than`` (a job that never ran has no time, or
    -infinity, which asyncpg gives as a naive datetime.min)."""
    return moment is not None and moment.tzinfo is not None and moment > than


async def first_runs(conn: asyncpg.Connection) -> None:
    """Wait until the scheduler has run every policy job once, successfully."""
    deadline = time.monotonic() + DEADLINE_S
    jobs: dict[tuple[str, str], asyncpg.Record] = {}
    while time.monotonic() < deadline:
        jobs = await policy_jobs(conn)
        assert not any(j["failures"] for j in jobs.values()), await job_errors(conn)
        if len(jobs) == 6 and all(
            j["successes"] >= 1 and _after(j["last_successful_finish"], j["last_run_started_at"])
            for j in jobs.values()
        ):
            return
        await asyncio.sleep(0.3)
    pytest.fail(f"the scheduler did not run the new policies within {DEADLINE_S:.0f} s: {jobs}")


async def scheduled_run(conn: asyncpg.Connection, key: tuple[str, str]) -> None:
    """Have the scheduler start job ``key`` now, and wait until that run has succeeded; fail at
    once if the scheduler records a failed run of any policy job."""
    job = (await policy_jobs(conn))[key]
    asked = await conn.fetchval("SELECT now()")
    await conn.execute("SELECT alter_job($1, next_start => $2)", job["job_id"], asked)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        jobs = await policy_jobs(conn)
        failed = [f"{k}: {j['status']}" for k, j in jobs.items() if j["failures"]]
        assert not failed, (failed, await job_errors(conn))
        j = jobs[key]
        if _after(j["last_run_started_at"], asked) and _after(
            j["last_successful_finish"], j["last_run_started_at"]
        ):
            return
        await asyncio.sleep(0.3)
    pytest.fail(f"the scheduler did not run {key} within {DEADLINE_S:.0f} s: {dict(j)}")


async def materialized(conn: asyncpg.Connection) -> dict[tuple[dt.datetime, str], Decimal]:
    """avg_spread_pct per (hour, symbol) as stored in hourly_spread_avg's materialization (what
    the refresh wrote, not the real-time part computed from raw rows)."""
    table = await conn.fetchval(
        "SELECT format('%I.%I', materialization_hypertable_schema,"
        " materialization_hypertable_name)"
        " FROM timescaledb_information.continuous_aggregates WHERE view_name = 'hourly_spread_avg'"
    )
    rows = await conn.fetch(f"SELECT hour, symbol, avg_spread_pct FROM {table}")
    return {(r["hour"], r["symbol"]): r["avg_spread_pct"] for r in rows}


async def chunk_state(conn: asyncpg.Connection, moment: dt.datetime) -> tuple[bool, bool]:
    """(compressed, partially compressed) of the spreads chunk holding ``moment``."""
    row = await conn.fetchrow(
        """
        SELECT (c.status & $2) <> 0 AS compressed, (c.status & $3) <> 0 AS partial
        FROM timescaledb_information.chunks i
        JOIN _timescaledb_catalog.chunk c
          ON c.schema_name = i.chunk_schema AND c.table_name = i.chunk_name
        WHERE i.hypertable_name = 'spreads' AND i.range_start <= $1 AND i.range_end > $1
        """,
        moment,
        CHUNK_COMPRESSED,
        CHUNK_PARTIALLY_COMPRESSED,
    )
    assert row is not None, f"no spreads chunk holds {moment}"
    return bool(row["compressed"]), bool(row["partial"])


async def age_past_retention(conn: asyncpg.Connection, today: dt.datetime) -> None:
    """Rows stored when they were fresh that have since outlived their table's retention
    (spreads 90 days, fx_rates 180, orders 365): copies of stored rows with older times. ingestd
    refuses such events when they arrive, so they cannot come through the sink."""
    spreads_at = [today - dt.timedelta(days=100, hours=-h) for h in (1, 2)]
    await conn.execute(
        """
        INSERT INTO spreads (event_id, producer, symbol, upbit_price, binance_price,
                             binance_price_krw, spread_pct, net_spread_pct, is_opportunity,
                             "timestamp")
        SELECT 's-exp-' || n, producer, symbol, upbit_price, binance_price, binance_price_krw,
               spread_pct, net_spread_pct, is_opportunity, ($1::timestamptz[])[n]
        FROM (SELECT * FROM spreads ORDER BY event_id LIMIT 1) s, generate_series(1, 2) n
        """,
        spreads_at,
    )
    await conn.execute(
        """
        INSERT INTO fx_rates (event_id, producer, pair, rate, source, "timestamp")
        SELECT 'fx-exp', producer, pair, rate, source, $1 FROM fx_rates WHERE event_id = 'fx-kept'
        """,
        today - dt.timedelta(days=200),
    )
    await conn.execute(
        """
        INSERT INTO orders (event_id, producer, symbol, venue, side, qty, price_theoretical,
                            price_effective, slippage_bps, leg_id, "timestamp")
        SELECT 'o-exp', producer, symbol, venue, side, qty, price_theoretical, price_effective,
               slippage_bps, leg_id, $1
        FROM orders WHERE event_id = 'o-kept'
        """,
        today - dt.timedelta(days=400),
    )


async def test_the_scheduler_runs_the_policies_and_late_data_lands_once(
    dsn: str, conn: asyncpg.Connection, sink: PostgresSink, redis_url: str
) -> None:
    now = dt.datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # Hours the refresh policy materializes (3 days ago .. 1 hour ago): one in a chunk old enough
    # to be compressed (its whole day ended more than 2 days ago), one in a row-store chunk.
    old_hour = today - dt.timedelta(days=3) + dt.timedelta(hours=12)
    recent_hour = hour_of(now) - dt.timedelta(hours=3)

    # The scheduler runs each policy once as soon as the migration has created it: let those
    # first runs (on empty tables) finish before the data comes.
    await first_runs(conn)

    spreads: dict[tuple[dt.datetime, str], list[Decimal]] = defaultdict(list)
    batch = []
    for hour in (old_hour, recent_hour):
        for symbol in ("BTC", "ETH"):
            for i in range(20):
                pct = Decimal(f"{2 + i % 7}.{(i * 37) % 10000:04d}")
                eid = f"s-{hour:%d%H}-{symbol}-{i}"
                at = iso(hour + dt.timedelta(minutes=2 * i))
                batch.append(item(spread(eid, symbol, at, spread_pct=str(pct))))
                spreads[(hour, symbol)].append(pct)
    # Enough old chunks that compression has work beyond the one the late data goes to.
    for days in (4, 5):
        batch.append(item(spread(f"s-old-{days}", "XRP", iso(today - dt.timedelta(days=days)))))
    batch.append(item(fx("fx-kept", ts=iso(recent_hour))))
    batch.append(item(order("o-kept", None, ts=iso(recent_hour))))
    outcome = await sink.write(batch)
    assert outcome.duplicates == 0
    await age_past_retention(conn, today)
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 84
    assert await conn.fetchval("SELECT count(*) FROM fx_rates") == 2
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2
    before = len(await conn.fetch("SELECT show_chunks('spreads')"))

    # Only TimescaleDB's scheduler runs the policies from here, one job at a time: retention and
    # compression of one hypertable started together can deadlock (each needs the other's chunk
    # lock; the loser is recorded as failed and retried later), which is not what this tests.
    jobs = await policy_jobs(conn)
    assert {p for p, _ in jobs} == set(POLICIES)
    # The refresh window reaches 7 days back here (3 in production) so that the hour in the
    # compressed chunk is inside it at any time of day, not only before 22:00 UTC.
    refresh = jobs[("policy_refresh_continuous_aggregate", "hourly_spread_avg")]
    config = orjson.loads(refresh["config"])
    assert config["start_offset"] == "3 days"
    config["start_offset"] = "7 days"
    await conn.execute(
        "SELECT alter_job($1, config => $2::jsonb)",
        refresh["job_id"],
        orjson.dumps(config).decode(),
    )
    for job_key in sorted(jobs, key=lambda k: POLICIES.index(k[0])):
        await scheduled_run(conn, job_key)

    # Retention dropped the expired chunks of all three tables, and only those.
    assert await conn.fetchval("SELECT count(*) FROM spreads WHERE event_id LIKE 's-exp-%'") == 0
    assert await conn.fetchval("SELECT array_agg(event_id) FROM fx_rates") == ["fx-kept"]
    assert await conn.fetchval("SELECT array_agg(event_id) FROM orders") == ["o-kept"]
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 82
    assert len(await conn.fetch("SELECT show_chunks('spreads')")) == before - 1
    # Compression: every chunk whose range ended more than 2 days ago, and no other.
    assert await chunk_state(conn, old_hour) == (True, False)
    assert await chunk_state(conn, today - dt.timedelta(days=5)) == (True, False)
    assert (await chunk_state(conn, recent_hour))[0] is False
    # The refresh materialized both hours.
    stored = await materialized(conn)
    for key, values in spreads.items():
        assert key in stored, f"{key} not materialized"
        assert same_avg(stored[key], values), (key, stored[key])

    # Late data: new spreads for both materialized hours (one in the compressed chunk), sent
    # with a redelivery of events already stored there, and the whole batch redelivered again.
    late = []
    for hour in (old_hour, recent_hour):
        for i in range(5):
            pct = Decimal(f"9.{i:04d}")
            at = iso(hour + dt.timedelta(minutes=2 * i, seconds=30))
            late.append(item(spread(f"late-{hour:%d%H}-{i}", "BTC", at, spread_pct=str(pct))))
            spreads[(hour, "BTC")].append(pct)
        first_btc = iso(hour)
        late.append(item(spread(f"s-{hour:%d%H}-BTC-0", "BTC", first_btc, spread_pct="2.0000")))
    outcome = await sink.write(late)
    assert outcome.inserted == {"spreads": 10} and outcome.duplicates == 2
    again = await sink.write(late)
    assert again.inserted == {"spreads": 0} and again.duplicates == 12
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 92
    assert await conn.fetchval("SELECT count(DISTINCT event_id) FROM spreads") == 92
    assert await chunk_state(conn, old_hour) == (True, True)  # the late rows wait row-store

    # The next scheduled runs compress the late rows and refresh the invalidated hours.
    for job_key in sorted(jobs, key=lambda k: POLICIES.index(k[0])):
        if job_key[0] != "policy_retention":
            await scheduled_run(conn, job_key)
    stored = await materialized(conn)
    for key, values in spreads.items():
        assert same_avg(stored[key], values), (key, stored[key], "late spreads not in")
    view = {
        (r["hour"], r["symbol"]): r["avg_spread_pct"]
        for r in await conn.fetch("SELECT hour, symbol, avg_spread_pct FROM hourly_spread_avg")
    }
    for key, values in spreads.items():
        assert same_avg(view[key], values), (key, view[key])
    assert await chunk_state(conn, old_hour) == (True, False)
    assert await conn.fetchval("SELECT count(*) FROM spreads") == 92
    assert await job_errors(conn) == []

    # `ingestd stats` shows each policy's scheduled runs succeeding.
    done = run_stats_for(dsn, redis_url)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    shown = {(j["proc_name"], j["target"]): j for j in report["jobs"]}
    assert set(shown) == set(await policy_jobs(conn))
    for job_key, j in shown.items():
        assert j["last_run_status"] == "Success", (job_key, j)
        assert j["total_failures"] == 0 and j["total_successes"] >= 2, (job_key, j)
    text = run_stats_for(dsn, redis_url, text=True)
    assert text.returncode == 0, text.stderr
    jobs_table = text.stdout.split("TimescaleDB jobs (policies)", 1)[1].split("\n\n", 1)[0]
    assert jobs_table.count("Success") == len(shown), jobs_table
    assert "Failed" not in jobs_table


def run_stats_for(dsn: str, redis_url: str, *, text: bool = False) -> Any:
    """``ingestd stats`` on the test database, in another process (JSON unless ``text``)."""
    settings = load_settings(
        None,
        environ={},
        overrides={"storage.postgres.dsn": dsn, "storage.redis.url": redis_url, "metrics_port": 0},
    )
    return run_cli(settings, "stats") if text else run_cli(settings, "stats", "--json")


async def test_stats_shows_why_a_scheduled_run_failed(
    dsn: str, conn: asyncpg.Connection, sink: PostgresSink, redis_url: str
) -> None:
    today = dt.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await first_runs(conn)
    await sink.write(
        [item(fx("fx-kept", ts=iso(today))), item(order("o-kept", None, ts=iso(today)))]
    )
    await sink.write([item(spread("s-kept", "BTC", iso(today)))])
    await age_past_retention(conn, today)
    job = (await policy_jobs(conn))[("policy_retention", "fx_rates")]
    # The job's session takes the database's settings: it gives up waiting for a lock quickly.
    name = dsn.rsplit("/", 1)[1].partition("?")[0]
    await conn.execute(f"ALTER DATABASE {name} SET lock_timeout = '200ms'")
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE fx_rates IN ACCESS EXCLUSIVE MODE")
            asked = await conn.fetchval("SELECT now()")
            await conn.execute("SELECT alter_job($1, next_start => $2)", job["job_id"], asked)
            deadline = time.monotonic() + DEADLINE_S
            while True:
                j = (await policy_jobs(conn))[("policy_retention", "fx_rates")]
                if j["failures"] and _after(j["last_run_started_at"], asked):
                    break
                assert time.monotonic() < deadline, f"the run never failed: {dict(j)}"
                await asyncio.sleep(0.3)
            # Paused while the lock is held, so that no retry succeeds before stats reads it.
            await conn.execute("SELECT alter_job($1, scheduled => false)", job["job_id"])
    finally:
        await holder.close()
    assert await conn.fetchval("SELECT count(*) FROM fx_rates") == 2  # nothing was dropped

    done = run_stats_for(dsn, redis_url)
    assert done.returncode == 0, done.stderr
    shown = {(j["proc_name"], j["target"]): j for j in orjson.loads(done.stdout)["jobs"]}
    failed = shown[("policy_retention", "fx_rates")]
    assert failed["last_run_status"] == "Failed" and failed["total_failures"] == 1
    assert "lock timeout" in failed["last_error"], failed
    for key, j in shown.items():
        if key != ("policy_retention", "fx_rates"):
            assert j["last_run_status"] == "Success" and j["last_error"] is None, (key, j)
    text = run_stats_for(dsn, redis_url, text=True)
    assert text.returncode == 0, text.stderr
    jobs_table = text.stdout.split("TimescaleDB jobs (policies)", 1)[1].split("\n\n", 1)[0]
    (row,) = [line for line in jobs_table.splitlines() if "Failed" in line]
    # The error under the table, whole (the table's columns fit 100 characters).
    assert f"job {row.split()[0]} last error: " in jobs_table, jobs_table
    assert "lock timeout" in " ".join(jobs_table.split()), jobs_table
