"""Redis down, restarted, crashed and hung: the database path goes on, nothing is lost.

Redis holds the stream, so the suite's Redis runs as a deployment must run it: AOF with
``appendfsync everysec`` and ``noeviction`` (ingestd.tools.throwaway). A clean restart loses
nothing; a
crash (SIGKILL) may lose up to a second of writes, so the crash test lets a second pass first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time

import pytest
import redis

from ingestd import Outcome, Service
from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from tests.daemons import StartDaemon
from tests.faults.conftest import FAULT_CONFIG, FaultServers
from tests.feeds import (
    pending,
    published_feed,
    simulated,
    wait_for_rows,
    wait_until,
)
from tests.ledger import Expected, wait_until_landed_exactly_once

pytestmark = [pytest.mark.faults, pytest.mark.pg, pytest.mark.redis]


def felt_redis_fault(log: str) -> bool:
    """Whichever client call met the fault first (a read, an XACK, the mirror), it was seen."""
    return any(f"action={a}" in log for a in ("stream_read_failed", "ack_retry", "mirror_failed"))


def reads_from(url: str) -> bool:
    """Whether a client of the server at ``url`` last ran XREADGROUP (the daemon's reader)."""
    client = redis.Redis.from_url(url)
    try:
        return any(c.get("cmd") == "xreadgroup" for c in client.client_list())
    finally:
        client.close()


async def wait_for_key(client: redis.Redis, key: str, want: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while client.get(key) != want:
        assert time.monotonic() < deadline, f"{key} = {client.get(key)!r}, wanted {want!r}"
        await asyncio.sleep(0.05)


async def test_redis_down_database_writes_go_on_and_the_mirror_catches_up(
    fault_settings: Settings, fault_servers: FaultServers
) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh = [
        {
            "type": "fx_rate",
            "event_id": f"fx-{i}",
            "producer": "collector",
            "pair": "USDKRW",
            "rate": f"1390.{i:08d}",
            "timestamp": utc_iso(now + dt.timedelta(milliseconds=i)),
        }
        for i in range(200)
    ]
    sim = simulated(5_000, seed=41)
    # The simulated feed is a day old, older than every mirror TTL (never mirrored): a fresh BTC
    # spread becomes spreads:BTC:last once Redis is back.
    fresh_btc = {
        **next(e for e in sim if e["type"] == "spread" and e["symbol"] == "BTC"),
        "event_id": "spread-fresh-btc",
        "timestamp": utc_iso(now),
    }
    feed = [*sim, *fresh, fresh_btc]
    settings = fault_settings.replace(**{"fx.ttl_seconds": 30.0})
    async with Service(settings) as service:
        assert service.mirror is not None
        await asyncio.to_thread(fault_servers.redis.crash)
        outcomes = await service.submit_many(feed)
        # Redis is a cache: with it gone, every event still commits.
        assert outcomes == [Outcome.COMMITTED] * len(feed)
        assert service.mirror.pending > 0  # the newest values wait for Redis
        await asyncio.to_thread(fault_servers.redis.start)
        client = redis.Redis(port=fault_servers.redis.port)
        await wait_for_key(client, "fx:usdkrw", fresh[-1]["rate"].encode())
        newest_btc = max(
            (e for e in feed if e["type"] == "spread" and e["symbol"] == "BTC"),
            key=lambda e: dt.datetime.fromisoformat(e["timestamp"]),
        )
        snap = json.loads(client.get("spreads:BTC:last") or b"{}")
        assert snap["event_id"] == newest_btc["event_id"]
        # The catch-up served nothing old as fresh: ETH's newest spread is a day old.
        assert client.get("spreads:ETH:last") is None
        # Counted when the mirror's coroutine reads the script's reply, which can come after this
        # test has seen the keys the same script wrote (seen in CI: 0 at once, 1 a moment later).
        mirror = service.mirror
        await wait_until(lambda: mirror.stale_skipped["spread"] >= 1, timeout=10)
        deadline = time.monotonic() + 10
        while client.get("health:ingestd") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # The stream intake is back too: an entry published now lands (judged below).
        late = {**fresh[0], "event_id": "after-restart", "rate": "1400.5"}
        client.xadd("ingestd:events", {"event": json.dumps(late)})
        await wait_until_landed_exactly_once(
            settings.storage.postgres.dsn, Expected.of([*feed, late])
        )
        # An older event arriving later did not replace the newest value.
        assert client.get("fx:usdkrw") == fresh[-1]["rate"].encode()


async def test_redis_restarted_mid_stream_the_consumer_resumes_without_loss(
    fault_settings: Settings, fault_servers: FaultServers, start_daemon: StartDaemon
) -> None:
    first = published_feed(fault_settings, 30_000, seed=42)
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    dsn = fault_settings.storage.postgres.dsn
    await wait_for_rows(dsn, "spreads", 3_000)
    await asyncio.to_thread(fault_servers.redis.restart)  # clean: the AOF keeps everything
    await wait_for_rows(dsn, "spreads", Expected.of(first).counts["spreads"])
    # The daemon met the restart: its clients retry a command once on a new connection, so it
    # may not have logged anything (the read was simply done again); what proves it is its
    # connection on the restarted server, reading the stream.
    deadline = time.monotonic() + 20
    while not reads_from(fault_settings.storage.redis.url):
        assert time.monotonic() < deadline, daemon.log
        await asyncio.sleep(0.1)
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0, daemon.log
    await wait_until_landed_exactly_once(fault_settings.storage.postgres.dsn, Expected.of(first))
    assert pending(redis.Redis.from_url(fault_settings.storage.redis.url)) == 0


async def test_redis_crash_restores_the_pending_list_and_redelivery_lands_once(
    fault_settings: Settings, fault_servers: FaultServers, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 30_000, seed=43)
    await asyncio.sleep(1.5)  # appendfsync everysec: what was published is on disk now
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    dsn = fault_settings.storage.postgres.dsn
    await wait_for_rows(dsn, "spreads", 3_000)
    # SIGKILL: the last second of XACKs may be lost, so committed entries come back.
    await asyncio.to_thread(fault_servers.redis.crash)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(fault_servers.redis.start)
    exp = Expected.of(sent)
    await wait_for_rows(dsn, "spreads", exp.counts["spreads"])
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0, daemon.log
    await wait_until_landed_exactly_once(fault_settings.storage.postgres.dsn, exp)


async def test_hung_redis_is_waited_out_and_nothing_is_lost(
    fault_settings: Settings, fault_servers: FaultServers, start_daemon: StartDaemon
) -> None:
    sent = published_feed(fault_settings, 30_000, seed=44)
    daemon = start_daemon(fault_settings, config_yaml=FAULT_CONFIG)
    dsn = fault_settings.storage.postgres.dsn
    await wait_for_rows(dsn, "spreads", 3_000)
    fault_servers.redis.freeze()  # SIGSTOP: sockets stay open, nothing answers
    try:
        await asyncio.sleep(5)  # longer than the socket timeouts (2 s)
        assert daemon.proc.poll() is None
    finally:
        fault_servers.redis.thaw()
    exp = Expected.of(sent)
    await wait_for_rows(dsn, "spreads", exp.counts["spreads"])
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 30) == 0, daemon.log
    await wait_until_landed_exactly_once(fault_settings.storage.postgres.dsn, exp)
    assert felt_redis_fault(daemon.log)  # the hang was felt, and ridden out
    assert pending(redis.Redis.from_url(fault_settings.storage.redis.url)) == 0
