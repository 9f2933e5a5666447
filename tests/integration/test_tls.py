"""TLS to PostgreSQL and Redis, verified against a private CA, and the compose Redis ACL users.

The Redis here is started with exactly the ``--user`` rules of compose.yaml (test passwords
filled in; tests/private_servers.py), so a command ingestd needs but the ACL forgets fails here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import asyncpg
import orjson
import pytest
import redis

from ingestd import AsyncPublisher, Service, load_settings
from ingestd.commands.health import check_health
from ingestd.daemon.metrics import Metrics
from ingestd.daemon.probes import sample_stream
from ingestd.settings import Settings
from ingestd.trading import State, read_trading_state
from tests.mixed_feed import mixed_feed
from tests.private_servers import (
    COMPOSE_PASSWORDS,
    PrivatePostgres,
    PrivateRedis,
    acl_denials,
    ingestd_url,
    producer_url,
)

pytestmark = [pytest.mark.pg, pytest.mark.redis]


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


async def test_redis_tls_is_verified(compose_redis: PrivateRedis) -> None:
    import redis.asyncio as aioredis

    good = aioredis.Redis.from_url(ingestd_url(compose_redis))
    assert await good.ping()
    await good.aclose()
    wrong_ca = compose_redis.url(
        "ingestd", COMPOSE_PASSWORDS["REDIS_INGESTD_PASSWORD"], ca=compose_redis.certs.other_ca
    )
    bad = aioredis.Redis.from_url(wrong_ca, socket_timeout=3)
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await bad.ping()
    await bad.aclose()
    wrong_pw = aioredis.Redis.from_url(compose_redis.url("ingestd", "wrong"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await wrong_pw.ping()
    await wrong_pw.aclose()


async def test_ingestd_works_within_the_compose_acl(
    compose_redis: PrivateRedis, db_dsn: str, db: asyncpg.Connection
) -> None:
    """Stream intake, mirror, health, sampling, claiming, trimming over rediss:// as ingestd."""
    settings: Settings = load_settings(
        None,
        environ={},
        overrides={
            "storage.postgres.dsn": db_dsn,
            "storage.redis.url": ingestd_url(compose_redis),
            "stream.consumer": "acl-test",
            "stream.block_ms": 200,
            "stream.claim_idle_ms": 1,
            "pipeline.batch_max_age_ms": 20,
            "metrics_port": 0,
        },
    )
    feed = mixed_feed(500)
    publisher = AsyncPublisher.from_url(producer_url(compose_redis), stream=settings.stream.key)
    now = dt.datetime.now(dt.UTC).isoformat()
    heartbeat = {"type": "heartbeat", "producer": "collector", "component": "collector"}
    # The feed is days old, and a value older than its TTL is never mirrored: a fresh spread and
    # rate show the mirror's keys being written under the ACL.
    fresh = [
        {**next(e for e in feed.bulk if e["type"] == t), "event_id": f"fresh-{t}", "timestamp": now}
        for t in ("spread", "fx_rate")
    ]
    try:
        async with Service(settings) as service:
            assert await publisher.publish_many(feed.bulk) == len(feed.bulk)
            await publisher.publish({**heartbeat, "timestamp": now})
            assert await publisher.publish_many(fresh) == len(fresh)
            want = len(feed.bulk) + 1 + len(fresh)
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
        1 for e in [*feed.bulk, *fresh] if e["type"] == "spread"
    )
    admin = compose_redis.admin()
    try:
        assert admin.get("spreads:BTC:last") is not None
        assert admin.get("fx:usdkrw") is not None
    finally:
        admin.close()
    assert acl_denials(compose_redis) == []


def test_the_acl_users_may_do_nothing_else(compose_redis: PrivateRedis) -> None:
    ingestd = redis.Redis.from_url(ingestd_url(compose_redis))
    producer = redis.Redis.from_url(producer_url(compose_redis))
    try:
        denied_to_ingestd: list[tuple[str, ...]] = [
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("DEL", "ingestd:events"),
            ("SET", "elsewhere", "x"),
            ("SHUTDOWN",),
            ("ACL", "LIST"),
        ]
        for command in denied_to_ingestd:
            with pytest.raises(redis.exceptions.NoPermissionError):
                ingestd.execute_command(*command)  # type: ignore[no-untyped-call]
        # What it does need: DEL of a cleared half-hedge alert and of the trading lease and halt
        # (a selector of its own), and the trading state's replica reports.
        ingestd.set("alerts:half_hedge:p1", "{}")
        assert ingestd.delete("alerts:half_hedge:p1", "trading:halt", "ingestd:trading:leader") == 1
        ingestd.hset("ingestd:trading:replicas", "r1", "{}")
        assert ingestd.hgetall("ingestd:trading:replicas") == {b"r1": b"{}"}
        assert ingestd.hdel("ingestd:trading:replicas", "r1") == 1
        producer.xadd("ingestd:events", {"event": "{}"})
        # It may read trading:state (failed before: a trader on this user always read HALTED,
        # "no permissions"), and not write it.
        since = dt.datetime.now(dt.UTC).isoformat()
        state = {"state": "ACTIVE", "reasons": [], "since": since}
        ingestd.set("trading:state", orjson.dumps(state))
        assert read_trading_state(producer).state is State.ACTIVE
        # It may read and write the RedisCacheStorage keys (GET fx:usdkrw), and nothing else.
        denied_to_producer: list[tuple[str, ...]] = [
            ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "ingestd:events", ">"),
            ("XRANGE", "ingestd:events", "-", "+"),
            ("XADD", "other-stream", "*", "event", "{}"),
            ("XADD", "fx:usdkrw", "*", "event", "{}"),
            ("SET", "ingestd:events", "x"),
            ("GET", "positions:BTC:open_count"),
            ("SET", "health:ingestd", "forged"),
            ("GET", "health:ingestd"),
            ("XTRIM", "ingestd:events", "MAXLEN", "0"),
            ("SET", "trading:state", "{}"),
            ("SET", "trading:halt", "x"),
            ("DEL", "trading:state"),
        ]
        for command in denied_to_producer:
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        ingestd.close()
        producer.close()
