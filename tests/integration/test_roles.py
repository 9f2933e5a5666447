"""Least privilege: what the writer and reader roles may do, and what they may not.

On clusters of our own (roles are cluster-wide, and password authentication must be real), over
TLS; the plain one and, where TimescaleDB is installed, the TimescaleDB one.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingestd import Service, errors, load_settings
from ingestd.clients import redis_async
from ingestd.commands.roles import READER_GROUP, WRITER_GROUP, Login, apply_roles, scram_verifier
from ingestd.daemon import migrations
from ingestd.daemon.db import create_pool
from ingestd.daemon.maintenance import (
    TASK_BACKFILL,
    TASK_POLICIES,
    TASK_RETENTION,
    TASKS,
    Maintenance,
)
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import MaintenanceSettings, PostgresSettings, RetentionSettings
from tests.commands import operator_env, run_ingestd
from tests.ledger import Expected, assert_landed_exactly_once
from tests.mixed_feed import MALFORMED, mixed_feed, submit_all
from tests.private_servers import PrivatePostgres
from tests.samples import POSITION_HEADER, SPREAD_HEADER, spread_rows, write_csv
from tests.sink_items import item, spread

pytestmark = [pytest.mark.pg, pytest.mark.redis]

WRITER_PW = "writer-" + os.urandom(6).hex()
READER_PW = "reader-pässwörd-" + os.urandom(4).hex()  # non-ASCII: SASLprep must match the server


@pytest.fixture
async def roles_db(
    private_database: tuple[PrivatePostgres, str],
) -> AsyncIterator[tuple[PrivatePostgres, str, asyncpg.Connection]]:
    """A migrated database with the roles applied and two logins; yields an owner connection."""
    cluster, name = private_database
    owner = await asyncpg.connect(cluster.admin_dsn(name))
    suffix = name[-10:]
    await apply_roles(
        owner,
        [
            Login(f"w_{suffix}", WRITER_GROUP, WRITER_PW),
            Login(f"r_{suffix}", READER_GROUP, READER_PW),
        ],
    )
    yield cluster, name, owner
    for login in (f"w_{suffix}", f"r_{suffix}"):
        await owner.execute(f'DROP OWNED BY "{login}"')
    await owner.close()
    await cluster.drop_database(name)
    admin = await asyncpg.connect(cluster.admin_dsn())
    try:
        for login in (f"w_{suffix}", f"r_{suffix}"):
            await admin.execute(f'DROP ROLE IF EXISTS "{login}"')
    finally:
        await admin.close()


def _logins(name: str) -> tuple[str, str]:
    return f"w_{name[-10:]}", f"r_{name[-10:]}"


async def _connect(
    cluster: PrivatePostgres, user: str, password: str, db: str
) -> asyncpg.Connection:
    return await asyncpg.connect(cluster.tls_dsn(user, password, db), timeout=10)


WRITER_DENIED = [
    "DROP TABLE spreads",
    "TRUNCATE spreads",
    "DELETE FROM spreads",
    "DELETE FROM positions",
    "DELETE FROM dead_letters",
    "UPDATE spreads SET symbol = 'X'",
    "UPDATE dead_letters SET error = 'x'",
    "ALTER TABLE spreads ADD COLUMN x int",
    "CREATE TABLE public.intruder (x int)",
    "CREATE FUNCTION public.intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA intruder",
    "INSERT INTO ingestd_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
    "UPDATE ingestd_migrations SET name = 'x'",
    "DELETE FROM ingestd_migrations",
    "SELECT * FROM pg_authid",
    "SELECT * FROM secret.vault",
    "SET ROLE postgres",
]


async def test_writer_runs_ingestd_and_can_do_nothing_else(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection], redis_url: str
) -> None:
    cluster, name, owner = roles_db
    writer, _ = _logins(name)
    await owner.execute("CREATE SCHEMA secret; CREATE TABLE secret.vault (x text)")
    await owner.execute("INSERT INTO secret.vault VALUES ('owner only')")
    settings = load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": cluster.tls_dsn(writer, WRITER_PW, name),
            "storage.redis.url": redis_url,
            "metrics_port": 0,
            "pipeline.batch_max_age_ms": 20,
        },
    )
    feed = mixed_feed(300)
    sent = feed.events
    async with Service(settings, stream_intake=False) as service:
        # The ordered part one by one: the close before its open is parked, the repeated event
        # meets its stored copy (the staging merge through a TEMP table).
        await submit_all(service, feed)
        for payload in MALFORMED:
            with pytest.raises(errors.InvalidEvent):
                await service.submit(payload)
        assert service.metrics.flush_retries == 0
        assert service.metrics.duplicates == 1
    await assert_landed_exactly_once(owner, Expected.of(sent))
    assert await owner.fetchval("SELECT count(*) FROM dead_letters") == len(MALFORMED)
    assert await owner.fetchval("SELECT count(*) FROM position_closes_pending") == 0
    assert await owner.fetchval("SELECT count(*) FROM orders WHERE position_id IS NULL") == 0

    conn = await _connect(cluster, writer, WRITER_PW, name)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        for statement in WRITER_DENIED:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
    finally:
        await conn.close()
    assert (
        await owner.fetchval("SELECT count(*) FROM spreads") == Expected.of(sent).counts["spreads"]
    )


INSERT_FX = (
    "INSERT INTO fx_rates (event_id, pair, rate, timestamp) VALUES ('x', 'USDKRW', 1, now())"
)
READER_DENIED = [
    INSERT_FX,
    "UPDATE positions SET status = 'CLOSED'",
    "DELETE FROM spreads",
    "TRUNCATE dead_letters",
    "DROP TABLE spreads",
    "CREATE TEMP TABLE scratch (x int)",
    "CREATE TABLE public.intruder (x int)",
    "SELECT nextval('spreads_id_seq')",
]


async def test_reader_reads_every_table_and_writes_nothing(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    cluster, name, owner = roles_db
    _, reader = _logins(name)
    # A table a later migration adds (created by the owner) is readable through default
    # privileges, without re-running `ingestd roles`.
    await owner.execute("CREATE TABLE later_table (x int); INSERT INTO later_table VALUES (1)")
    conn = await _connect(cluster, reader, READER_PW, name)
    try:
        tables = await owner.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        assert len(tables) >= 8
        for row in tables:
            await conn.fetchval(f'SELECT count(*) FROM "{row["tablename"]}"')
        assert await conn.fetchval("SELECT x FROM later_table") == 1
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        assert await conn.fetchval("SHOW statement_timeout") == "30s"
        # Read-only is a session default; privileges hold even with it switched off.
        await conn.execute("SET default_transaction_read_only = off")
        for statement in READER_DENIED:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


# Every function of ingestd's own (not PostgreSQL's, not an extension's) that a group may execute,
# and why calling it cannot remove a row or shorten retention. Anything else a group may execute
# fails test_no_function_the_groups_may_execute_can_erase_history.
GROUP_FUNCTIONS: dict[str, tuple[set[str], str]] = {
    "ingestd_refresh_aggregate(text)": (
        {WRITER_GROUP},
        "recomputes daily_pnl_summary or hourly_spread_avg from the tables: writes only the "
        "materialized view, reads the tables, refuses any other name",
    ),
    "ingestd_queue_backfill(timestamp with time zone,timestamp with time zone)": (
        {WRITER_GROUP},
        "appends one hour range to ingestd_aggregate_backfill (the continuous aggregate's refresh "
        "queue); deletes nothing, changes no data table",
    ),
    "time_bucket(interval,timestamp with time zone)": (
        {WRITER_GROUP, READER_GROUP},
        "plain PostgreSQL only (TimescaleDB brings its own): IMMUTABLE SQL over date_bin(), "
        "runs with the caller's rights and touches no table",
    ),
}
# Retention and the other owner-only functions: executable by no group (nor PUBLIC).
OWNER_ONLY_FUNCTIONS = (
    "ingestd_delete_expired(text,interval,integer)",
    "ingestd_set_retention(text,interval)",
    "ingestd_refresh_aggregates()",
    "ingestd_backfill_cutoff()",
)
# What a role may execute: the privilege (its own, its groups' or PUBLIC's) and USAGE on the schema.
EXECUTABLE_SQL = """
SELECT p.oid::regprocedure::text AS fn, n.nspname AS schema, p.prosecdef AS definer,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
               AND d.objid = p.oid AND d.deptype = 'e') AS extension_member
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE has_function_privilege($1, p.oid, 'EXECUTE') AND has_schema_privilege($1, n.oid, 'USAGE')
"""
TIME_SERIES = ("spreads", "fx_rates", "orders", "trades")


async def _pause_retention_jobs(owner: asyncpg.Connection) -> None:
    """TimescaleDB: the owner's policies would drop old seeded rows mid-test; keep them idle."""
    if await owner.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"):
        await owner.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_retention'"
        )


async def _seed_expired_rows(owner: asyncpg.Connection) -> dict[str, int]:
    """A row 400 days old in each time-series table; returns the row counts."""
    await _pause_retention_jobs(owner)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    await owner.execute(
        "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
        " spread_pct, net_spread_pct, timestamp) VALUES ('old-s', 'BTC', 1, 1, 1, 1, 1, $1)",
        old,
    )
    await owner.execute(
        "INSERT INTO fx_rates (event_id, pair, rate, timestamp) VALUES ('old-fx', 'USDKRW', 1, $1)",
        old,
    )
    await owner.execute(
        "INSERT INTO orders (event_id, position_key, symbol, venue, side, qty, price_theoretical,"
        " leg_id, timestamp) VALUES ('old-o', 'pos_x', 'BTC', 'upbit', 'SELL', 1, 1, 'l0', $1)",
        old,
    )
    await owner.execute(
        "INSERT INTO trades (event_id, position_key, symbol, direction, size, side, timestamp)"
        " VALUES ('old-t', 'pos_x', 'BTC', 'upbit_short_binance_long', 1, 'OPEN', $1)",
        old,
    )
    return await _counts(owner)


async def _counts(owner: asyncpg.Connection) -> dict[str, int]:
    return {t: await owner.fetchval(f"SELECT count(*) FROM {t}") for t in TIME_SERIES}


async def _retention_policies(owner: asyncpg.Connection) -> dict[str, str]:
    if not await owner.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"):
        return {}
    rows = await owner.fetch(
        "SELECT hypertable_name, config->>'drop_after' AS keep FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_retention'"
    )
    return {r["hypertable_name"]: r["keep"] for r in rows}


async def test_no_function_the_groups_may_execute_can_erase_history(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    cluster, name, owner = roles_db
    writer, reader = _logins(name)
    before = await _seed_expired_rows(owner)
    policies = await _retention_policies(owner)
    for login, group in ((writer, WRITER_GROUP), (reader, READER_GROUP)):
        rows = await owner.fetch(EXECUTABLE_SQL, login)
        # PostgreSQL's own functions run with the caller's rights (none is SECURITY DEFINER), so
        # they can do no more than the role itself, which may not DELETE or TRUNCATE (the DENIED
        # lists). Extension functions that drop data check ownership themselves (below).
        builtin = [r for r in rows if r["schema"] in ("pg_catalog", "information_schema")]
        assert len(builtin) > 1000 and not [r["fn"] for r in builtin if r["definer"]]
        own = {
            r["fn"]
            for r in rows
            if r["schema"] not in ("pg_catalog", "information_schema") and not r["extension_member"]
        }
        allowed = {fn for fn, (groups, _) in GROUP_FUNCTIONS.items() if group in groups}
        assert own <= allowed, f"{group} may execute functions nobody justified: {own - allowed}"
        if not cluster.timescale:
            assert own == allowed
    w = await _connect(cluster, writer, WRITER_PW, name)
    r = await _connect(cluster, reader, READER_PW, name)
    try:
        # What the groups may call, called as they would: nothing disappears.
        assert await w.fetchval("SELECT ingestd_refresh_aggregate('daily_pnl_summary')") is True
        await w.fetchval("SELECT ingestd_refresh_aggregate('hourly_spread_avg')")
        for conn in (w, r):
            await conn.fetchval("SELECT time_bucket('1 hour', now())")
        # The retention functions, with the shortest period there is, are refused to both.
        for conn in (w, r):
            for table in TIME_SERIES:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(
                        "SELECT ingestd_delete_expired($1, '1 microsecond', 1000000)", table
                    )
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval("SELECT ingestd_set_retention($1, '1 microsecond')", table)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT ingestd_refresh_aggregates()")
        if cluster.timescale:  # the extension's own ways to drop data check ownership
            job = await owner.fetchval(
                "SELECT job_id FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_retention' AND hypertable_name = 'spreads'"
            )
            config = await owner.fetchval(
                "SELECT config FROM timescaledb_information.jobs WHERE job_id = $1", job
            )
            shorter = orjson.dumps({**orjson.loads(config), "drop_after": "1 second"}).decode()
            for statement, args in (
                ("SELECT drop_chunks('spreads', older_than => now())", ()),
                ("SELECT remove_retention_policy('spreads')", ()),
                ("SELECT add_retention_policy('trades', drop_after => INTERVAL '1 second')", ()),
                ("SELECT alter_job($1, config => $2::jsonb)", (job, shorter)),
                ("SELECT alter_job($1, scheduled => false)", (job,)),
                ("SELECT delete_job($1)", (job,)),
                ("CALL run_job($1)", (job,)),
            ):
                # The reader's sessions are read-only by default; its privileges hold without.
                await r.execute("SET default_transaction_read_only = off")
                for conn in (w, r):
                    with pytest.raises(asyncpg.PostgresError):
                        await conn.execute(statement, *args)
    finally:
        await w.close()
        await r.close()
    assert await _counts(owner) == before
    assert await _retention_policies(owner) == policies


async def test_every_migration_revokes_public_execute_on_its_functions(
    db: asyncpg.Connection,
) -> None:
    # Between `ingestd migrate` and `ingestd roles` (and wherever roles.sql is never run), what
    # PUBLIC may execute of ingestd's own is what the migrations left: only time_bucket.
    rows = await db.fetch(
        """
        SELECT p.oid::regprocedure::text AS fn
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
          AND EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))
                      AS a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
        """
    )
    assert {r["fn"] for r in rows} <= {"time_bucket(interval,timestamp with time zone)"}
    assert await db.fetchval(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'ingestd\\_%'"
    ) == len(OWNER_ONLY_FUNCTIONS) + sum(1 for f in GROUP_FUNCTIONS if f.startswith("ingestd_"))


async def test_a_function_a_later_migration_adds_is_nobodys_until_listed(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    cluster, name, owner = roles_db
    writer, reader = _logins(name)
    # As a careless migration would add it: named ingestd_*, SECURITY DEFINER, no REVOKE. (The
    # row is recent: on TimescaleDB the owner's scheduled retention would delete an old one.)
    await owner.execute(
        """
        CREATE FUNCTION ingestd_delete_spreads_before(cutoff timestamptz) RETURNS bigint
        LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
            WITH gone AS (DELETE FROM spreads WHERE "timestamp" < cutoff RETURNING 1)
            SELECT count(*) FROM gone
        $$;
        CREATE FUNCTION other_function() RETURNS int LANGUAGE sql AS 'SELECT 1';
        INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,
                             spread_pct, net_spread_pct, "timestamp")
        VALUES ('old-1', 'BTC', 1, 1, 1, 1, 1, now() - interval '1 hour');
        """
    )
    await apply_roles(owner)  # re-applied after the migration, as compose does
    w = await _connect(cluster, writer, WRITER_PW, name)
    r = await _connect(cluster, reader, READER_PW, name)
    try:
        for conn in (w, r):
            for call in ("SELECT ingestd_delete_spreads_before(now())", "SELECT other_function()"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(call)
    finally:
        await w.close()
        await r.close()
    assert await owner.fetchval("SELECT count(*) FROM spreads") == 1


async def test_passwords_are_stored_as_scram_verifiers_and_checked(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    cluster, name, owner = roles_db
    writer, reader = _logins(name)
    stored = await owner.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", writer)
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert WRITER_PW not in stored
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _connect(cluster, writer, WRITER_PW + "x", name)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _connect(cluster, reader, READER_PW.replace("ä", "a"), name)
    # A new password replaces the old one; re-running without a password keeps it.
    await apply_roles(owner, [Login(writer, WRITER_GROUP, "second-pw")])
    await apply_roles(owner, [Login(writer, WRITER_GROUP)])
    conn = await _connect(cluster, writer, "second-pw", name)
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _connect(cluster, writer, WRITER_PW, name)


async def test_a_login_belongs_to_one_group(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    cluster, name, owner = roles_db
    writer, _ = _logins(name)
    await apply_roles(owner, [Login(writer, READER_GROUP)])
    conn = await _connect(cluster, writer, WRITER_PW, name)
    try:
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        # The writer's own setting went with its group.
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "0"
        await conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(INSERT_FX)
    finally:
        await conn.close()


async def test_a_privileged_role_is_refused_as_login(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    _, _, owner = roles_db
    with pytest.raises(errors.ConfigError, match="least-privilege"):
        await apply_roles(owner, [Login("postgres", WRITER_GROUP, "x")])
    with pytest.raises(errors.ConfigError, match="give it a password"):
        await apply_roles(owner, [Login("nobody_yet", WRITER_GROUP)])
    with pytest.raises(errors.ConfigError, match="not a group name"):
        Login(WRITER_GROUP, WRITER_GROUP, "x")


def test_scram_verifier_format() -> None:
    v = scram_verifier("pencil", salt=b"\x00" * 16)
    algorithm, rest = v.split("$", 1)
    assert algorithm == "SCRAM-SHA-256"
    iterations_salt, keys = rest.split("$")
    assert iterations_salt == "4096:AAAAAAAAAAAAAAAAAAAAAA=="
    stored, server = keys.split(":")
    assert len(stored) == len(server) == 44  # base64 of 32 bytes
    assert scram_verifier("pencil", salt=b"\x00" * 16) == v
    assert scram_verifier("pencil") != scram_verifier("pencil")  # random salt


async def test_roles_command(private_database: tuple[PrivatePostgres, str]) -> None:
    cluster, name = private_database
    login = f"cli_{name[-10:]}"
    env = operator_env(DATABASE_URL=cluster.admin_dsn(name))
    cmd = ("roles", "--writer-login", login)
    missing = run_ingestd(env, *cmd, timeout=60)
    assert missing.returncode == 2
    assert "give it a password" in missing.stderr
    env["INGESTD_WRITER_PASSWORD"] = "cli-" + WRITER_PW
    done = run_ingestd(env, *cmd, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        assert f"{login} (ingestd_writer): created, password set" in done.stdout
        assert "cli-" + WRITER_PW not in done.stdout + done.stderr
        conn = await _connect(cluster, login, "cli-" + WRITER_PW, name)
        await conn.execute(INSERT_FX)
        await conn.close()
    finally:
        await cluster.drop_database_and_role(name, login)


async def test_an_owner_without_createrole_applies_the_grants(private_pg: PrivatePostgres) -> None:
    """The DBA creates the owner, the groups and the login; the owner migrates and grants."""
    cluster = private_pg
    tag = os.urandom(4).hex()
    name, owner_role, login = f"ingestd_own_{tag}", f"own_{tag}", f"app_{tag}"
    admin = await asyncpg.connect(cluster.admin_dsn())
    try:
        await admin.execute(f"CREATE ROLE {owner_role} LOGIN NOCREATEROLE")
        await admin.execute(f"CREATE ROLE {login} LOGIN")
        for role, password in ((owner_role, "owner-pw"), (login, "login-pw")):
            await admin.execute(f"ALTER ROLE {role} PASSWORD '{scram_verifier(password)}'")
        for group in (WRITER_GROUP, READER_GROUP):
            exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", group)
            if not exists:
                await admin.execute(f"CREATE ROLE {group} NOLOGIN")
        await admin.execute(f"GRANT {WRITER_GROUP} TO {login}")
        # Migration 0002 reads shared_preload_libraries, which only superusers and members of
        # pg_read_all_settings may.
        await admin.execute(f"GRANT pg_read_all_settings TO {owner_role}")
        await admin.execute(f"CREATE DATABASE {name} OWNER {owner_role}")
        if cluster.timescale:  # creating the extension is the DBA's part too
            dba = await asyncpg.connect(cluster.admin_dsn(name))
            await dba.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await dba.close()

        owner = await _connect(cluster, owner_role, "owner-pw", name)
        try:
            await migrations.migrate(owner)
            await apply_roles(owner)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await apply_roles(owner, [Login("someone_new", WRITER_GROUP, "pw")])
        finally:
            await owner.close()
        # The owner keeps its access once PUBLIC lost CONNECT; the login can write.
        await (await _connect(cluster, owner_role, "owner-pw", name)).close()
        app = await _connect(cluster, login, "login-pw", name)
        try:
            await app.execute(INSERT_FX)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("DELETE FROM fx_rates")
        finally:
            await app.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"DROP ROLE IF EXISTS {login}")
        await admin.execute(f"DROP ROLE IF EXISTS {owner_role}")
        await admin.close()


# --- maintenance and the CSV commands as the writer ----------------------------------------------


async def _seed_for_maintenance(owner: asyncpg.Connection) -> dt.datetime:
    """Rows the four maintenance tasks act on: today's spreads and closed position, and rows past
    their retention (deleted on plain PostgreSQL). Returns the time of the new rows."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old = now - dt.timedelta(days=400)
    for eid, ts in (("fresh-1", now), ("fresh-2", now - dt.timedelta(seconds=1)), ("old-1", old)):
        await owner.execute(
            "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
            " spread_pct, net_spread_pct, timestamp) VALUES ($1, 'BTC', 1, 1, 1, 3.5, 2.5, $2)",
            eid,
            ts,
        )
    await owner.execute(
        "INSERT INTO fx_rates (event_id, pair, rate, timestamp) VALUES ('old-fx', 'USDKRW', 1, $1)",
        old,
    )
    await owner.execute(
        "INSERT INTO positions (position_key, symbol, direction, size, entry_upbit_price,"
        " entry_binance_price, entry_spread_pct, exit_upbit_price, exit_binance_price,"
        " exit_spread_pct, pnl_krw, pnl_pct, status, timestamp_open, timestamp_close)"
        " VALUES ('pos_m', 'BTC', 'upbit_short_binance_long', 0.01, 1, 1, 1, 1, 1, 1,"
        " 12345.67, 0.88, 'CLOSED', $1, $1)",
        now,
    )
    return now


async def test_writer_runs_its_maintenance_and_retention_is_the_owners(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection], redis_url: str
) -> None:
    cluster, name, owner = roles_db
    writer, _ = _logins(name)
    await _pause_retention_jobs(owner)
    now = await _seed_for_maintenance(owner)
    pool = await create_pool(PostgresSettings(dsn=cluster.tls_dsn(writer, WRITER_PW, name)))
    client = redis_async(redis_url, socket_timeout_s=2)
    # The continuous aggregate's backfill needs its ownership too (refresh_continuous_aggregate):
    # the owner's job does it; on plain PostgreSQL the round has nothing to do and runs.
    timescale = await owner.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    not_mine = (
        (TASK_POLICIES, TASK_RETENTION, TASK_BACKFILL)
        if timescale
        else (
            TASK_POLICIES,
            TASK_RETENTION,
        )
    )
    mine = [t for t in TASKS if t not in not_mine]
    try:
        m = Maintenance(pool, client, settings=MaintenanceSettings(), retention=RetentionSettings())
        for _ in range(2):  # the second round is claimed by UPDATE on the rows the first inserted
            results = {r.task: r for r in await m.run_all() if r is not None}
            assert m.failures == 0
            assert [t for t in TASKS if results[t].ran] == mine, results
            assert all(results[t].detail == "not the owner" for t in not_mine), results
        day = now.date().isoformat()
        hour = now.strftime("%Y-%m-%d-%H")
        daily = await client.get(f"metrics:daily_pnl:{day}")
        hourly = await client.get(f"metrics:hourly_spread:{hour}")
    finally:
        await client.aclose()
        await pool.close()
    rounds = await owner.fetch("SELECT task, last_status, runs, failures FROM ingestd_maintenance")
    outcomes = {r["task"]: (r["last_status"], r["runs"], r["failures"]) for r in rounds}
    assert outcomes == dict.fromkeys(mine, ("success", 2, 0))
    assert daily is not None and orjson.loads(daily)["total_pnl_krw"] == "12345.67"
    assert hourly is not None and orjson.loads(hourly)["symbols"]["BTC"]["max_spread_pct"] in (
        "3.5",
        "3.5000",
        "3.50000000000000000000",
    )
    assert await owner.fetchval("SELECT count(*) FROM spreads") == 3  # nothing expired went

    def retention(dsn: str) -> subprocess.CompletedProcess[str]:
        return run_ingestd(operator_env(without_pg=True, DATABASE_URL=dsn), "retention")

    refused = retention(cluster.tls_dsn(writer, WRITER_PW, name))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "retention runs as the owner" in refused.stderr
    assert WRITER_PW not in refused.stderr and "Traceback" not in refused.stderr
    assert await owner.fetchval("SELECT count(*) FROM spreads") == 3
    done = retention(cluster.admin_dsn(name))
    assert done.returncode == 0, done.stdout + done.stderr
    if cluster.timescale:
        assert "spreads (90 days): unchanged" in done.stdout
    else:  # plain PostgreSQL: the owner deleted the expired rows
        assert "spreads: 1 rows deleted" in done.stdout
        assert await owner.fetchval("SELECT count(*) FROM spreads") == 2
        assert await owner.fetchval("SELECT count(*) FROM fx_rates") == 0


async def test_writer_runs_import_csv_and_verify_csv(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection], tmp_path: Path
) -> None:
    cluster, name, owner = roles_db
    writer, reader = _logins(name)
    if cluster.timescale:  # the sample rows are older than 90 days: keep the scheduler off them
        await owner.execute("SELECT remove_retention_policy('spreads', if_exists => true)")
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(40))
    pos = "pos_w,BTC,upbit_short_binance_long,0.01,1,1,1,,,,,,OPEN,2025-11-15T03:40:15Z,"
    write_csv(tmp_path / "positions.csv", POSITION_HEADER, [pos])
    env = operator_env(without_pg=True)
    env["DATABASE_URL"] = cluster.tls_dsn(writer, "unused", name).replace(":unused@", "@")
    env["PGPASSWORD"] = WRITER_PW  # as compose passes the writer's password

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_ingestd({**env, **extra}, *args)

    first = cli("import-csv", str(tmp_path), "--batch-rows", "16", "--progress", "off")
    assert first.returncode == 0, first.stderr
    with (tmp_path / "spreads.csv").open("a", encoding="utf-8") as f:
        f.write("\n".join(spread_rows(5, start=40)) + "\n")
    # The checkpoint is read (SELECT) and moved on (INSERT ... ON CONFLICT DO UPDATE).
    second = cli("import-csv", str(tmp_path), "--progress", "off")
    assert second.returncode == 0, second.stderr
    assert "resuming at line 42" in second.stderr
    assert await owner.fetchval("SELECT count(*) FROM spreads") == 45
    assert await owner.fetchval("SELECT count(*) FROM positions") == 1
    checkpoint = await owner.fetchval(
        "SELECT line FROM csv_import_checkpoints WHERE source = 'spreads.csv'"
    )
    assert checkpoint == 46
    verify = cli("verify-csv", str(tmp_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "MISMATCH" not in verify.stdout
    # The dashboards' reader may not create temporary tables: a clear refusal, not a traceback.
    env["DATABASE_URL"] = cluster.tls_dsn(reader, "unused", name).replace(":unused@", "@")
    refused = cli("verify-csv", str(tmp_path), PGPASSWORD=READER_PW)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert "verify-csv needs TEMPORARY on the database" in refused.stderr
    assert READER_PW not in refused.stderr


async def test_a_writers_late_spreads_queue_their_hours_and_the_owners_job_refreshes_them(
    roles_db: tuple[PrivatePostgres, str, asyncpg.Connection],
) -> None:
    """The writer login commits a spread five days old: the batch queues its hour (it may
    execute ingestd_queue_backfill, nothing else of the queue), and on TimescaleDB the owner's
    job puts the hour into hourly_spread_avg."""
    cluster, name, owner = roles_db
    writer, _ = _logins(name)
    timescale = await owner.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=5)
    stamp = (hour + dt.timedelta(minutes=7)).isoformat().replace("+00:00", "Z")
    pool = await create_pool(PostgresSettings(dsn=cluster.tls_dsn(writer, WRITER_PW, name)))
    try:
        outcome = await PostgresSink(pool).write([item(spread("late-w", ts=stamp))])
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM ingestd_aggregate_backfill")
    finally:
        await pool.close()
    assert outcome.inserted == {"spreads": 1}
    assert (outcome.backfill_queued is not None) == timescale
    queued = await owner.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill")
    assert queued == (1 if timescale else 0)
    if timescale:
        job = await owner.fetchval(
            "SELECT job_id FROM timescaledb_information.jobs"
            " WHERE proc_name = 'ingestd_backfill_job'"
        )
        await owner.execute(f"CALL run_job({int(job)})")
        assert await owner.fetchval("SELECT count(*) FROM ingestd_aggregate_backfill") == 0
        # Materialized (not the real-time part): the materialization table holds the hour.
        mat = await owner.fetchval(
            "SELECT format('%I.%I', materialization_hypertable_schema,"
            " materialization_hypertable_name) FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'hourly_spread_avg'"
        )
        materialized = await owner.fetchval(
            f"SELECT count(*) FROM {mat} WHERE hour = $1 AND symbol = 'BTC'", hour
        )
        assert materialized == 1
