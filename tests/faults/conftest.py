"""The fault suite's servers: a PostgreSQL and a Redis of its own, which tests stop and crash.

They are started once per session (initdb takes a few seconds) in a temporary directory, on
free loopback ports, never the machine's servers. Each test gets a fresh database cloned from a
migrated template and a flushed Redis database, and after each test the servers are brought
back to running (thawed, started) whatever the test did to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from ingestd.settings import Settings, load_settings
from ingestd.tools.throwaway import ServerUnavailable, ThrowawayPostgres, ThrowawayRedis
from tests.conftest import PgServer
from tests.daemons import start_daemon  # noqa: F401 - the fixture, for the fault tests

# Short deadlines so that faults are felt, and recovered from, within seconds.
FAULT_CONFIG = """\
storage:
  postgres:
    connect_timeout_s: 2
    command_timeout_s: 3
    acquire_timeout_s: 2
  redis:
    socket_timeout_s: 2
    mirror_socket_timeout_s: 1
stream:
  block_ms: 200
  claim_idle_ms: ${CLAIM_IDLE_MS:-30000}
  claim_interval_s: ${CLAIM_INTERVAL_S:-15}
pipeline:
  batch_max_rows: ${BATCH_MAX_ROWS:-2000}
  batch_max_age_ms: 50
  queue_max_events: ${QUEUE_MAX_EVENTS:-20000}
  flush_timeout_s: 6
  backoff_base_s: 0.1
  backoff_cap_s: 1
shutdown:
  grace_s: 15
"""


@dataclass
class FaultServers:
    """The session's own PostgreSQL (with a migrated template) and Redis."""

    pg: ThrowawayPostgres
    redis: ThrowawayRedis
    admin: PgServer

    def heal(self) -> None:
        """Bring both servers back to running, whatever a test left them in."""
        with contextlib.suppress(Exception):
            self.pg.thaw()
        if not self.pg.running():
            self.pg.start()
        with contextlib.suppress(Exception):
            self.redis.thaw()
        try:
            redis.Redis(port=self.redis.port, socket_timeout=2).ping()
        except redis.exceptions.ConnectionError:
            self.redis.crash()
            self.redis.start()


@pytest.fixture(scope="session")
def fault_servers() -> Iterator[FaultServers]:
    """Start the session's throwaway servers (skip, saying why, where the binaries are absent)."""
    # Not under pytest's basetemp: another pytest session on the machine prunes old basetemps
    # and resets their modes, which would pull the directory from under a running server.
    base = Path(tempfile.mkdtemp(prefix="ingestd-fault-servers-"))
    try:
        pg = ThrowawayPostgres(base / "pg")
        rd = ThrowawayRedis(base / "redis")
    except ServerUnavailable as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"the fault suite needs local server binaries: {exc}")
    pg.start()
    rd.start()
    admin = PgServer(pg.dsn(), timescale=False)
    asyncio.run(admin.create_template())
    servers = FaultServers(pg, rd, admin)
    yield servers
    pg.destroy()
    rd.destroy()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def fault_settings(fault_servers: FaultServers) -> AsyncIterator[Settings]:
    """Settings on a fresh database of the fault servers, with the fault suite's deadlines."""
    fault_servers.heal()
    dsn = await fault_servers.admin.clone()
    client = redis.Redis(port=fault_servers.redis.port)
    client.flushdb()
    settings = load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": dsn,
            "storage.redis.url": fault_servers.redis.url(0),
            "stream.consumer": "fault-1",
            "stream.block_ms": 200,
            "storage.postgres.connect_timeout_s": 2.0,
            "storage.postgres.command_timeout_s": 3.0,
            "storage.postgres.acquire_timeout_s": 2.0,
            "storage.redis.socket_timeout_s": 2.0,
            "pipeline.batch_max_age_ms": 50,
            "pipeline.flush_timeout_s": 6.0,
            "pipeline.backoff_base_s": 0.1,
            "pipeline.backoff_cap_s": 1.0,
            "mirror.heartbeat_interval_s": 0.5,
            "metrics_port": 0,
        },
    )
    yield settings
    fault_servers.heal()
    await fault_servers.admin.drop(dsn)
    client.flushdb()
    client.close()
