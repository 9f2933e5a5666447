"""Fixtures: real PostgreSQL and real Redis, never mocks.

Server addresses come from the environment when given: ``INGESTD_TEST_DATABASE_URL`` (an admin
DSN of a server where databases may be created), ``INGESTD_TEST_REDIS_URL`` and
``INGESTD_TEST_TIMESCALE_URL`` (a server with timescaledb preloaded). Else the local servers
(PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379, a TimescaleDB cluster on 127.0.0.1:5433
when one runs), else a testcontainers server where a Docker engine answers. Each test gets its
own database, cloned from a migrated template (fast isolation), and a flushed Redis database.
Each session migrates a template of its own (a fresh name unless ``INGESTD_TEST_TEMPLATE``
gives one) and drops it at its end; two runs at once on one server still need their own Redis
database (``INGESTD_TEST_REDIS_URL``), since each test flushes it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
import pytest
import redis

import ingestd.daemon.db as ingestd_db
from ingestd.daemon import migrations
from ingestd.daemon.sinks.postgres import PostgresSink
from ingestd.settings import Settings, load_settings
from ingestd.wire import events
from tests.scheduler import hold_policy_jobs, stop_own_scheduler

# Throwaway TLS/ACL servers of our own for the security tests (tests/private_servers.py).
pytest_plugins = ["tests.private_servers"]

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_TIMESCALE = "postgresql://postgres@127.0.0.1:5433/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
# Two test runs at once on one server (two checkouts) each need their own template; so does each
# pytest-xdist worker of one run (each is a session of its own, and creating a template drops the
# one of that name first). Without INGESTD_TEST_TEMPLATE each session names its own (a fixed
# default let one checkout's run drop, or migrate with other migration files, the template
# another run was cloning from). Each session drops its own template at its end, and only its own.
TEMPLATE = os.environ.get("INGESTD_TEST_TEMPLATE", f"ingestd_tpl_{uuid.uuid4().hex[:12]}") + (
    f"_{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else ""
)


def with_db(dsn: str, name: str, user: str | None = None) -> str:
    """The DSN of database ``name`` on the server of ``dsn`` (optionally as ``user``)."""
    base, _, query = dsn.partition("?")
    base = base.rsplit("/", 1)[0]
    if user is not None:
        scheme, _, rest = base.partition("://")
        base = f"{scheme}://{user}@{rest.rpartition('@')[2]}"
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def _can_connect(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return False
    return True


def database_name(dsn: str) -> str:
    """The database ``dsn`` names."""
    return dsn.partition("?")[0].rsplit("/", 1)[1]


@dataclass
class PgServer:
    """An admin DSN of a server where the tests may create databases."""

    admin_dsn: str
    timescale: bool

    async def as_admin(self, *statements: str) -> None:
        """Run ``statements`` in order on one admin connection (CREATE/ALTER/DROP DATABASE)."""
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            for statement in statements:
                await admin.execute(statement)
        finally:
            await admin.close()

    async def create_template(self) -> None:
        await self.as_admin(
            f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)", f"CREATE DATABASE {TEMPLATE}"
        )
        conn = await asyncpg.connect(with_db(self.admin_dsn, TEMPLATE))
        try:
            await migrations.migrate(conn)
            if self.timescale:
                await hold_policy_jobs(conn)
        finally:
            await conn.close()

    async def drop_template(self) -> None:
        await self.as_admin(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")

    async def create_empty(self, prefix: str) -> str:
        """A new, empty database (neither cloned nor migrated) named ``prefix_<random>``: its
        DSN. ``drop`` drops it."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        await self.as_admin(f"CREATE DATABASE {name}")
        return with_db(self.admin_dsn, name)

    async def create_migrated(
        self, prefix: str, *, stop_scheduler: bool = False, hold_jobs: bool = False
    ) -> str:
        """A new database migrated here, not cloned from the template: its DSN.

        Not a clone where a test needs what a clone lacks: the database-level TimeZone that
        migration 0003 sets is not inherited, and TimescaleDB's scheduler keeps a session on the
        template (CREATE DATABASE ... TEMPLATE fails, "accessed by other users"). On a
        TimescaleDB server ``stop_scheduler`` stops the scheduler before migrating (for tests that
        run the policies themselves with run_job) and ``hold_jobs`` holds the policy jobs after
        it (for tests whose samples are older than the retention). Asserts that the extension is
        created exactly where the server has it.
        """
        url = await self.create_empty(prefix)
        conn = await asyncpg.connect(url)
        try:
            if stop_scheduler and self.timescale:
                await stop_own_scheduler(conn)
            await migrations.migrate(conn)
            assert await migrations.timescaledb_enabled(conn) == self.timescale
            if hold_jobs and self.timescale:
                await hold_policy_jobs(conn)
        finally:
            await conn.close()
        return url

    async def clone(self) -> str:
        name = f"ingestd_test_{uuid.uuid4().hex[:12]}"
        await self.as_admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return with_db(self.admin_dsn, name)

    async def drop(self, dsn: str) -> None:
        """Drop the database of ``dsn`` (one ``clone`` or ``create_empty`` made)."""
        await self.as_admin(f"DROP DATABASE IF EXISTS {database_name(dsn)} WITH (FORCE)")


async def _preloaded(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        libs = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
    finally:
        await conn.close()
    return "timescaledb" in str(libs) and bool(available)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Plain PostgreSQL (or whatever the env names) with a migrated template database."""
    dsn = os.environ.get("INGESTD_TEST_DATABASE_URL", DEFAULT_PG)
    container = None
    if not asyncio.run(_can_connect(dsn)):
        if not _docker_available():
            pytest.fail(
                f"no PostgreSQL at {dsn} and no Docker engine: start PostgreSQL "
                "(scripts/services.sh does) or set INGESTD_TEST_DATABASE_URL"
            )
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None).start()
        dsn = container.get_connection_url()
    server = PgServer(dsn, timescale=asyncio.run(_preloaded(dsn)))
    asyncio.run(server.create_template())
    yield server
    if container is not None:
        container.stop()
    else:
        asyncio.run(server.drop_template())


def _no_timescale(reason: str) -> NoReturn:
    """Skip a TimescaleDB test, saying how to get one; in CI (``CI=true``) fail instead."""
    how = (
        "scripts/services.sh builds TimescaleDB and starts a cluster where the vendored source "
        "is at ../shared/vendor/timescaledb (or INGESTD_TIMESCALEDB_SOURCE); else set "
        "INGESTD_TEST_TIMESCALE_URL to a server with timescaledb preloaded (docs/development.md: "
        "Running the TimescaleDB tests)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI runs every TimescaleDB test, but {reason}: {how}", pytrace=False)
    pytest.skip(f"{reason}: {how}")


@pytest.fixture(scope="session")
def timescale_server() -> Iterator[PgServer]:
    """A server with timescaledb preloaded; the test skips, saying why, where there is none."""
    dsn = os.environ.get("INGESTD_TEST_TIMESCALE_URL", DEFAULT_TIMESCALE)
    if not asyncio.run(_can_connect(dsn)):
        _no_timescale(f"no server answers at {dsn}")
    if not asyncio.run(_preloaded(dsn)):
        _no_timescale(f"the server at {dsn} does not preload timescaledb")
    server = PgServer(dsn, timescale=True)
    asyncio.run(server.create_template())
    yield server
    asyncio.run(server.drop_template())


@pytest.fixture(params=["postgres", pytest.param("timescale", marks=pytest.mark.timescale)])
def server(request: pytest.FixtureRequest) -> tuple[str, PgServer]:
    """Plain PostgreSQL, then TimescaleDB (skipped where absent): the parameter's name and server.

    Synchronous on purpose: the session fixtures use asyncio.run, which cannot run from inside
    the event loop of an async fixture. ``PLAIN_ONLY`` and ``TIMESCALE_ONLY`` narrow it.
    """
    name: str = request.param
    srv: PgServer = request.getfixturevalue(
        "pg_server" if name == "postgres" else "timescale_server"
    )
    return name, srv


PLAIN_ONLY = pytest.mark.parametrize("server", ["postgres"], indirect=True)
TIMESCALE_ONLY = pytest.mark.parametrize(
    "server", [pytest.param("timescale", marks=pytest.mark.timescale)], indirect=True
)


@pytest.fixture
async def db_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    dsn = await pg_server.clone()
    yield dsn
    await pg_server.drop(dsn)


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    conn = await asyncpg.connect(db_dsn)
    yield conn
    await conn.close()


_DEFAULTS = load_settings(None, environ={})


@pytest.fixture(autouse=True)
def _default_staleness() -> None:
    """The stale-spread limits are process-wide (each Service start and import-csv sets them from
    its settings): every test begins with the defaults, whatever an earlier test started."""
    events.configure_staleness_from(_DEFAULTS)


async def ingestd_pool(dsn: str) -> asyncpg.Pool:
    """ingestd's own pool (its settings' sizes and session set-up) on the database of ``dsn``."""
    settings = load_settings(
        None, environ={}, overrides={"storage.postgres.dsn": dsn, "metrics_port": 0}
    )
    return await ingestd_db.create_pool(settings.storage.postgres)


# --- on the ``dsn`` of the module that asks ----------------------------------------------------
# Tests on either server, in a database migrated here rather than cloned, use ``dsn`` (a module
# that needs another kind defines its own); these give the same things on it in every module.


@pytest.fixture
async def dsn(server: tuple[str, PgServer]) -> AsyncIterator[str]:
    """A database migrated here (``create_migrated``) on the ``server`` parameter's server; a
    module that needs another kind defines its own ``dsn``. On TimescaleDB its scheduler is
    stopped: the tests run maintenance and the policies themselves, and the scheduler's own
    compression ran in the middle of them (a chunk it compressed copied a test role's grants
    between DROP OWNED and DROP ROLE; "tuple concurrently updated" on the same grants)."""
    kind, srv = server
    url = await srv.create_migrated("ingestd_it", stop_scheduler=True)
    assert srv.timescale == (kind == "timescale")
    yield url
    await srv.drop(url)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A side connection to the module's ``dsn``, for set-up and assertions."""
    c = await asyncpg.connect(dsn)
    yield c
    await c.close()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """ingestd's own pool on the module's ``dsn``."""
    p = await ingestd_pool(dsn)
    yield p
    await p.close()


@pytest.fixture
def sink(pool: asyncpg.Pool) -> PostgresSink:
    """ingestd's PostgreSQL writer on the module's ``dsn``."""
    return PostgresSink(pool)


@pytest.fixture
async def db_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A small plain asyncpg pool on this test's database."""
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def redis_base_url() -> str:
    """The test Redis (database 15 by default: the tests flush it)."""
    url = os.environ.get("INGESTD_TEST_REDIS_URL", DEFAULT_REDIS)
    try:
        redis.Redis.from_url(url, socket_timeout=3).ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(
            f"no Redis at {url}: start redis-server (scripts/services.sh does) "
            "or set INGESTD_TEST_REDIS_URL"
        )
    return url


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A flushed Redis database for this test."""
    client = redis.Redis.from_url(redis_base_url)
    client.flushdb()
    yield redis_base_url
    client.flushdb()
    client.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client for assertions."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def quick_settings(dsn: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings pointing at ``dsn`` and ``redis_url``, tuned for quick tests (a short stream
    block and batch age, no metrics port), then ``overrides`` (dotted names)."""
    return load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": dsn,
            "storage.redis.url": redis_url,
            "stream.consumer": "test-consumer",
            "stream.block_ms": 200,
            "pipeline.batch_max_age_ms": 50,
            "metrics_port": 0,
            **overrides,
        },
    )


@pytest.fixture
def settings(db_dsn: str, redis_url: str) -> Settings:
    """Settings pointing at this test's database and Redis, tuned for quick tests."""
    return quick_settings(db_dsn, redis_url)
