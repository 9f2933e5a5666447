"""TLS to PostgreSQL and Redis, verified against a private CA, and the compose Redis ACL users.

The Redis here is started with exactly the ``--user`` rules of compose.yaml (test passwords
filled in), so a command ingestd needs but the ACL forgets fails this test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from ingestd import AsyncPublisher, Service, load_settings
from ingestd.health import check_health
from ingestd.metrics import Metrics
from ingestd.probes import sample_stream
from ingestd.settings import Settings
from tests.deploy_files import compose_variables, redis_acl_users
from tests.mixed_feed import mixed_feed
from tests.private_servers import (
    Certs,
    PrivatePostgres,
    PrivateRedis,
    redis_version,
    start_redis,
)

pytestmark = [pytest.mark.pg, pytest.mark.redis]

PASSWORDS = {name: f"test-{name.lower()}" for name in compose_variables()}


@pytest.fixture(scope="module")
def acl_redis(private_base: Path, certs: Certs) -> Iterator[PrivateRedis]:
    """A TLS-only Redis with compose's ACL users (default off, ingestd, producer)."""
    users = {k: v for k, v in redis_acl_users(PASSWORDS).items() if k != "default"}
    if redis_version() < (7, 2):
        # CLIENT SETINFO (which redis-py sends on connect, ignoring errors) came in Redis 7.2, the
        # version compose pins; an older server does not know the rule, nor the command.
        users = {k: [r for r in v if r != "+client|setinfo"] for k, v in users.items()}
    server = start_redis(private_base, certs, users)
    yield server
    server.stop()


@pytest.fixture
def clean_acl_redis(acl_redis: PrivateRedis) -> Iterator[PrivateRedis]:
    admin = acl_redis.admin()
    admin.flushall()
    admin.acl_log_reset()
    yield acl_redis
    admin.close()


def ingestd_url(server: PrivateRedis) -> str:
    return server.url("ingestd", PASSWORDS["REDIS_INGESTD_PASSWORD"])


def producer_url(server: PrivateRedis) -> str:
    return server.url("producer", PASSWORDS["REDIS_PRODUCER_PASSWORD"])


async def test_postgres_tls_modes(production_pg: PrivatePostgres) -> None:
    admin = await asyncpg.connect(production_pg.admin_dsn())
    await admin.execute("ALTER ROLE postgres PASSWORD 'tls-test'")
    await admin.close()
    verified = await asyncpg.connect(production_pg.tls_dsn("postgres", "tls-test", "postgres"))
    assert await verified.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    await verified.close()
    by_ip = production_pg.tls_dsn("postgres", "tls-test", "postgres", host="127.0.0.1")
    await (await asyncpg.connect(by_ip)).close()  # the certificate names 127.0.0.1 too
    required = production_pg.tls_dsn("postgres", "tls-test", "postgres", sslmode="require")
    conn = await asyncpg.connect(required.split("&sslrootcert")[0])  # encrypted, not verified
    assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    await conn.close()
    # verify-full refuses a server whose certificate another CA signed.
    other = production_pg.tls_dsn(
        "postgres", "tls-test", "postgres", root_cert=production_pg.certs.other_ca
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(other)
    # The server side refuses plaintext (pg_hba: hostssl only): sslmode=disable cannot connect.
    plain = required.replace("sslmode=require", "sslmode=disable")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain.split("&sslrootcert")[0])


async def test_redis_tls_is_verified(clean_acl_redis: PrivateRedis) -> None:
    import redis.asyncio as aioredis

    good = aioredis.Redis.from_url(ingestd_url(clean_acl_redis))
    assert await good.ping()
    await good.aclose()
    wrong_ca = clean_acl_redis.url(
        "ingestd", PASSWORDS["REDIS_INGESTD_PASSWORD"], ca=clean_acl_redis.certs.other_ca
    )
    bad = aioredis.Redis.from_url(wrong_ca, socket_timeout=3)
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await bad.ping()
    await bad.aclose()
    wrong_pw = aioredis.Redis.from_url(clean_acl_redis.url("ingestd", "wrong"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await wrong_pw.ping()
    await wrong_pw.aclose()


def _acl_denials(server: PrivateRedis) -> list[dict[str, Any]]:
    admin = server.admin()
    try:
        entries: list[dict[str, Any]] = admin.acl_log()  # type: ignore[assignment]
    finally:
        admin.close()
    return entries


async def test_ingestd_works_within_the_compose_acl(
    clean_acl_redis: PrivateRedis, db_dsn: str, db: asyncpg.Connection
) -> None:
    """Stream intake, mirror, health, sampling, claiming, trimming over rediss:// as ingestd."""
    settings: Settings = load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": db_dsn,
            "storage.redis.url": ingestd_url(clean_acl_redis),
            "stream.consumer": "acl-test",
            "stream.block_ms": 200,
            "stream.claim_idle_ms": 0,
            "pipeline.batch_max_age_ms": 20,
            "metrics_port": 0,
        },
    )
    feed = mixed_feed(500)
    publisher = AsyncPublisher.from_url(producer_url(clean_acl_redis), stream=settings.stream.key)
    now = dt.datetime.now(dt.UTC).isoformat()
    heartbeat = {"type": "heartbeat", "producer": "collector", "component": "collector"}
    try:
        async with Service(settings) as service:
            assert await publisher.publish_many(feed.bulk) == len(feed.bulk)
            await publisher.publish({**heartbeat, "timestamp": now})
            want = len(feed.bulk) + 1
            for _ in range(600):
                if service.metrics.acks >= want:
                    break
                await asyncio.sleep(0.05)
            assert service.metrics.acks == want
            assert service.stream is not None
            await service.stream.claim_idle()
            await service.stream.trim_acknowledged()
            assert service.redis is not None
            sampled = Metrics()
            await sample_stream(service.redis, settings.stream.key, settings.stream.group, sampled)
            assert (sampled.stream_pending, sampled.stream_lag) == (0, 0)
            for _ in range(100):  # the heartbeat loop writes health:ingestd every 2 s
                ok, reason = await check_health(settings, ["ingestd", "collector"], 10)
                if ok:
                    break
                await asyncio.sleep(0.1)
            assert ok, reason
            assert service.metrics.flush_retries == 0
            assert service.mirror is not None and service.mirror.errors == 0
    finally:
        await publisher.aclose()
    assert await db.fetchval("SELECT count(*) FROM spreads") == sum(
        1 for e in feed.bulk if e["type"] == "spread"
    )
    admin = clean_acl_redis.admin()
    try:
        assert admin.get("spreads:BTC:last") is not None
        assert admin.get("fx:usdkrw") is not None
    finally:
        admin.close()
    assert _acl_denials(clean_acl_redis) == []


def test_the_acl_users_may_do_nothing_else(clean_acl_redis: PrivateRedis) -> None:
    ingestd = redis.Redis.from_url(ingestd_url(clean_acl_redis))
    producer = redis.Redis.from_url(producer_url(clean_acl_redis))
    try:
        for command in (
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("DEL", "ingestd:events"),
            ("SET", "elsewhere", "x"),
            ("SHUTDOWN",),
            ("ACL", "LIST"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                ingestd.execute_command(*command)
        producer.xadd("ingestd:events", {"event": "{}"})
        for command in (
            ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "ingestd:events", ">"),
            ("XRANGE", "ingestd:events", "-", "+"),
            ("XADD", "other-stream", "*", "event", "{}"),
            ("GET", "fx:usdkrw"),
            ("SET", "health:ingestd", "forged"),
            ("XTRIM", "ingestd:events", "MAXLEN", "0"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.execute_command(*command)
    finally:
        ingestd.close()
        producer.close()
