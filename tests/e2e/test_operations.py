"""End to end, operations: ``ingestd run`` as a subprocess, watched and deployed as in production.

The metrics endpoint is scraped over HTTP while the daemon runs; a least-privilege deployment
(writer login over verified TLS, Redis ACL users over rediss://) ingests a mixed feed; and no
log line of any failing command shows a password.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from ingestd import AsyncPublisher, load_settings
from ingestd.settings import Settings
from tests.commands import operator_env, run_ingestd
from tests.daemons import StartDaemon
from tests.feeds import pending, published_feed
from tests.http_client import Samples, by_label, get, scrape
from tests.ledger import Expected, assert_landed_exactly_once
from tests.mixed_feed import MALFORMED, mixed_feed
from tests.private_servers import (
    PrivatePostgres,
    PrivateRedis,
    acl_denials,
    free_port,
    ingestd_url,
    producer_url,
)

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]


async def scrape_until(
    port: int, ready: Callable[[Samples], bool], timeout: float = 60.0
) -> Samples:
    """Scrape /metrics until ``ready`` holds for a scrape (or fail with the last one)."""
    end = time.monotonic() + timeout
    while True:
        samples = await scrape(port)
        if ready(samples):
            return samples
        if time.monotonic() > end:
            raise AssertionError(f"metrics never got there: {samples}")
        await asyncio.sleep(0.2)


def _acked(n: int) -> Callable[[Samples], bool]:
    def done(samples: Samples) -> bool:
        return samples.get(("ingestd_stream_acks_total", ()), 0) >= n

    return done


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_metrics_endpoint_is_scraped_during_a_run(
    settings: Settings, start_daemon: StartDaemon, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    n = 5_000
    sent = published_feed(settings, n, seed=9)
    for payload in MALFORMED:
        rclient.xadd("ingestd:events", {"event": payload})
    entries = n + len(MALFORMED)
    port = free_port()
    daemon = start_daemon(settings, INGESTD_METRICS_PORT=str(port))
    await daemon.wait_for_log("action=endpoint_listening")

    samples = await scrape_until(
        port, lambda s: s.get(("ingestd_stream_acks_total", ()), 0) >= entries
    )
    by_type = collections.Counter(e["type"] for e in sent)
    assert by_label(samples, "ingestd_events_received_total", "type") == {
        **by_type,
        "invalid": len(MALFORMED),
    }
    assert by_label(samples, "ingestd_events_written_total", "type") == by_type
    assert by_label(samples, "ingestd_events_dead_lettered_total", "type") == {
        "invalid": len(MALFORMED)
    }
    exp = Expected.of(sent)
    rows = by_label(samples, "ingestd_rows_written_total", "table")
    assert rows == {t: exp.counts[t] for t in ("spreads", "fx_rates", "orders", "trades")}
    assert samples[("ingestd_stream_acks_total", ())] == entries
    assert samples[("ingestd_duplicates_total", ())] == 0
    assert samples[("ingestd_batch_events_sum", ())] == entries
    batches = samples[("ingestd_batches_total", ())]
    assert samples[("ingestd_batch_events_count", ())] == batches
    assert samples[("ingestd_flush_duration_seconds_count", ())] == batches
    assert samples[("ingestd_commit_latency_seconds_count", ())] == entries
    assert samples[("ingestd_queue_depth", ())] == 0
    assert samples[("ingestd_flush_retries_total", ())] == 0
    assert samples[("ingestd_healthy", ())] == 1
    assert _total(samples, "ingestd_build_info") == 1
    assert samples[("ingestd_process_resident_memory_bytes", ())] > 0

    # The stream gauges are sampled every few seconds: they settle at nothing pending, no lag.
    settled = await scrape_until(
        port,
        lambda s: (
            s.get(("ingestd_stream_pending", ())) == 0 and s.get(("ingestd_stream_lag", ())) == 0
        ),
    )
    assert settled[("ingestd_stream_sample_errors_total", ())] == 0
    assert pending(rclient) == 0
    healthz = await get(port, "/healthz")
    assert (healthz.status, healthz.text) == (200, "ok\n")
    readyz = await get(port, "/readyz")
    assert readyz.status == 200, readyz.text

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.log
    await assert_landed_exactly_once(db, exp)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == len(MALFORMED)


# --- a least-privilege deployment over TLS --------------------------------------------------

WRITER_PW = "writer-" + os.urandom(6).hex()
READER_PW = "reader-" + os.urandom(6).hex()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_ingestd(env, *args)


def clean_env() -> dict[str, str]:
    return operator_env(without_pg=True)


@pytest.fixture
async def deployed(
    production_pg: PrivatePostgres,
) -> AsyncIterator[tuple[PrivatePostgres, str, str]]:
    """What compose's migrate and roles services do, with the real commands, as the owner."""
    cluster = production_pg
    name = f"ingestd_deploy_{os.urandom(4).hex()}"
    writer = f"app_{name[-8:]}"
    await cluster.create_database(name, migrate=False)
    owner_env = {**clean_env(), "DATABASE_URL": cluster.admin_dsn(name)}
    migrated = cli(owner_env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    roles_env = {**owner_env, "INGESTD_WRITER_PASSWORD": WRITER_PW}
    roles = cli(roles_env, "roles", "--writer-login", writer)
    assert roles.returncode == 0, roles.stderr
    yield cluster, name, writer
    await cluster.drop_database_and_role(name, writer)


async def test_least_privilege_deployment_over_tls_ingests_a_mixed_feed(
    deployed: tuple[PrivatePostgres, str, str],
    compose_redis: PrivateRedis,
    start_daemon: StartDaemon,
) -> None:
    cluster, name, writer = deployed
    # As compose runs it: the writer login, its password in PGPASSWORD (not in the URL), TLS
    # verified against the CA; Redis over TLS as the ACL user `ingestd`.
    dsn = cluster.tls_dsn(writer, "unused", name).replace(":unused@", "@")
    settings = load_settings(
        None,
        environ={},
        overrides={"storage.postgres.dsn": dsn, "storage.redis.url": ingestd_url(compose_redis)},
    )
    port = free_port()
    daemon = start_daemon(settings, PGPASSWORD=WRITER_PW, INGESTD_METRICS_PORT=str(port))
    await daemon.wait_for_log("action=started", timeout=60)

    feed = mixed_feed(2_000)
    publisher = AsyncPublisher.from_url(producer_url(compose_redis), stream="ingestd:events")
    raw_producer = aioredis.Redis.from_url(producer_url(compose_redis))
    acks = 0
    try:
        acks += await publisher.publish_many(feed.bulk)
        for payload in MALFORMED:
            await raw_producer.xadd("ingestd:events", {"event": payload})
            acks += 1
        await scrape_until(port, _acked(acks))
        # One at a time, each after the previous one committed: the close before its open is
        # parked and later DELETEd; the repeated event meets its stored copy (staging merge).
        for ev in feed.ordered:
            await publisher.publish(ev)
            acks += 1
            await scrape_until(port, _acked(acks))
    finally:
        await publisher.aclose()
        await raw_producer.aclose()

    # As the container's HEALTHCHECK: the same consumer name as the daemon (start_daemon's).
    health_env = {
        **clean_env(),
        "REDIS_URL": ingestd_url(compose_redis),
        "INGESTD_CONSUMER": "e2e-1",
    }
    health = cli(health_env, "health")
    assert health.returncode == 0, health.stderr
    owner = await asyncpg.connect(cluster.admin_dsn(name))
    try:
        # It is the writer login that ingestd runs as, over TLS.
        backends = await owner.fetch(
            "SELECT a.usename, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = $1 AND a.application_name = 'ingestd'",
            name,
        )
    finally:
        await owner.close()
    assert backends
    assert {(r["usename"], r["ssl"]) for r in backends} == {(writer, True)}
    samples = await scrape(port)
    assert samples[("ingestd_flush_retries_total", ())] == 0
    assert samples[("ingestd_duplicates_total", ())] == 1
    assert samples[("ingestd_mirror_errors_total", ())] == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.log

    owner = await asyncpg.connect(cluster.admin_dsn(name))
    try:
        await assert_landed_exactly_once(owner, Expected.of(feed.events))
        assert await owner.fetchval("SELECT count(*) FROM dead_letters") == len(MALFORMED)
        assert await owner.fetchval("SELECT count(*) FROM position_closes_pending") == 0
        unlinked = await owner.fetchval("SELECT count(*) FROM orders WHERE position_id IS NULL")
        assert unlinked == 0
    finally:
        await owner.close()
    assert acl_denials(compose_redis) == []
    log = daemon.log
    assert WRITER_PW not in log
    assert "test-redis_ingestd_password" not in log
    assert "action=stopped" in log and "(clean)" in log


# --- passwords never reach a log line -------------------------------------------------------

SECRET = "S3cr3t-" + os.urandom(4).hex()


def _assert_clean(text: str, *, json_lines: bool = False, masked: bool = True) -> None:
    assert SECRET not in text
    if masked:  # the DSN or URL is shown, with its password masked
        assert "***" in text, text
    if json_lines:
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines
        for line in lines:
            doc: dict[str, Any] = json.loads(line)
            assert doc["action"], line


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_unreachable_servers_are_logged_without_passwords(
    start_daemon: StartDaemon, log_format: str, tmp_path: Path
) -> None:
    config = tmp_path / f"{log_format}.yml"
    config.write_text(f"log_format: {log_format}\n", encoding="utf-8")
    broken = load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": f"postgresql://ingestd_app:{SECRET}@127.0.0.1:{free_port()}/x",
            "storage.redis.url": f"redis://ingestd:{SECRET}@127.0.0.1:{free_port()}/0",
        },
    )
    daemon = start_daemon(broken, INGESTD_CONFIG=str(config))
    deadline = time.monotonic() + 30
    while daemon.log.count("db_wait") < 3 and time.monotonic() < deadline:
        assert daemon.proc.poll() is None, daemon.log
        await asyncio.sleep(0.1)
    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    assert daemon.log.count("db_wait") >= 3, daemon.log
    assert "Connect call failed" in daemon.log or "onnection refused" in daemon.log
    # While it waits, each line names the DSN (masked) and the driver's error text.
    _assert_clean(daemon.log, json_lines=log_format == "json")


async def test_a_wrong_password_is_logged_without_it(
    production_pg: PrivatePostgres, start_daemon: StartDaemon, redis_url: str
) -> None:
    dsn = production_pg.tls_dsn("postgres", SECRET, "postgres")
    daemon = start_daemon(
        load_settings(
            None,
            environ={},
            overrides={"storage.postgres.dsn": dsn, "storage.redis.url": redis_url},
        )
    )
    deadline = time.monotonic() + 30
    while "password authentication failed" not in daemon.log and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    assert 'password authentication failed for user "postgres"' in daemon.log
    _assert_clean(daemon.log)


async def test_a_redis_that_refuses_the_password_is_logged_without_it(
    settings: Settings, start_daemon: StartDaemon, compose_redis: PrivateRedis
) -> None:
    wrong = compose_redis.url("ingestd", SECRET)
    daemon = start_daemon(settings.replace(**{"storage.redis.url": wrong}))
    await daemon.wait_for_log("action=started", timeout=60)
    await daemon.wait_for_log("action=stream_read_failed", timeout=30)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=40) == 0, daemon.log
    assert "invalid username-password pair" in daemon.log
    _assert_clean(daemon.log)


async def test_failing_commands_print_no_password(pg_server: Any) -> None:
    server = pg_server.admin_dsn.rsplit("/", 1)[0].split("://", 1)[1].split("@", 1)[1]
    env = {
        **clean_env(),
        # A database that does not exist: the server answers at once, and names the DSN's user.
        "DATABASE_URL": f"postgresql://owner:{SECRET}@{server}/ingestd_no_such_database",
        "REDIS_URL": f"redis://ingestd:{SECRET}@127.0.0.1:{free_port()}/0",
    }
    migrate = cli(env, "migrate")
    assert migrate.returncode == 2
    _assert_clean(migrate.stdout + migrate.stderr)
    roles = cli({**env, "INGESTD_WRITER_PASSWORD": "x"}, "roles", "--writer-login", "w")
    assert roles.returncode == 2
    _assert_clean(roles.stdout + roles.stderr)
    health = cli(env, "health")
    assert health.returncode == 2  # Redis unreachable: a connection error, as in every command
    _assert_clean(health.stdout + health.stderr)
    bad_port = {**env, "DATABASE_URL": f"postgresql://owner:{SECRET}@127.0.0.1:notaport/x"}
    run = cli(bad_port, "run", "--metrics-port", "0")
    assert run.returncode == 2, run.stderr
    # Refused with the configuration, before anything starts.
    assert "configuration error" in run.stderr and "not a valid URL" in run.stderr
    # A URL that does not parse cannot be masked reliably, so the line does not repeat it.
    _assert_clean(run.stdout + run.stderr, masked=False)
