"""End to end: ``ingestd run`` as a subprocess, fed by another process through the stream."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from ingestd.settings import Settings
from ingestd.wire.events import utc_iso
from tests.daemons import StartDaemon, ingestd_env, run_cli
from tests.feeds import (
    pending,
    published_feed,
    simulated,
    wait_for_rows,
)
from tests.ledger import Expected, assert_landed_exactly_once

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]


async def test_100k_events_from_another_process_land_exactly_once(
    settings: Settings, start_daemon: StartDaemon, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    n = 100_000
    sent = published_feed(settings, n, seed=7)
    exp = Expected.of(sent)
    daemon = start_daemon(settings)
    await daemon.wait_for_log("action=started")
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", exp.counts["spreads"])
    await wait_for_rows(settings.storage.postgres.dsn, "trades", exp.counts["trades"])
    # A fresh FX event and heartbeat, to read the short-TTL keys while they live.
    fresh_fx = {
        "type": "fx_rate",
        "event_id": "fx-final",
        "producer": "collector",
        "pair": "USDKRW",
        "rate": "1391.12345678",
        "source": "test",
        "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
    }
    # The simulated feed is a day old, older than every mirror TTL, so it is never mirrored:
    # fresh spreads too, one per symbol, for the spreads:{SYMBOL}:last keys.
    fresh_spreads = [
        {
            **next(e for e in sent if e["type"] == "spread" and e["symbol"] == symbol),
            "event_id": f"spread-final-{symbol}",
            "timestamp": fresh_fx["timestamp"],
        }
        for symbol in ("BTC", "ETH", "XRP")
    ]
    for ev in (*fresh_spreads, fresh_fx):
        rclient.xadd("ingestd:events", {"event": json.dumps(ev)})
    await wait_for_rows(settings.storage.postgres.dsn, "fx_rates", exp.counts["fx_rates"] + 1)
    deadline = time.monotonic() + 5
    while rclient.get("fx:usdkrw") != b"1391.12345678" and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert rclient.get("fx:usdkrw") == b"1391.12345678"
    assert 0 < rclient.pttl("fx:usdkrw") <= 3000

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.log
    exp = Expected.of([*sent, *fresh_spreads, fresh_fx])
    await assert_landed_exactly_once(db, exp)
    assert pending(rclient) == 0
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

    # The mirror: the fresh spread of each symbol (the day-old ones never were), with its TTL.
    for newest in fresh_spreads:
        symbol = newest["symbol"]
        snap = json.loads(rclient.get(f"spreads:{symbol}:last") or b"{}")
        assert snap["event_id"] == newest["event_id"]
        assert snap["upbit_price"] == newest["upbit_price"]
        assert snap["timestamp"] == utc_iso(dt.datetime.fromisoformat(newest["timestamp"]))
        assert 0 < rclient.ttl(f"spreads:{symbol}:last") <= 60
        opened = await db.fetchval(
            "SELECT count(*) FROM positions WHERE symbol = $1 AND status = 'OPEN'", symbol
        )
        assert rclient.get(f"positions:{symbol}:open_count") == str(opened).encode()
        assert rclient.ttl(f"positions:{symbol}:open_count") == -1
    # The collector's day-old heartbeats would say it is alive: they are not mirrored.
    assert any(e["type"] == "heartbeat" and e["component"] == "collector" for e in sent)
    assert rclient.get("health:collector") is None
    assert rclient.get("health:ingestd") is not None
    assert 0 < rclient.ttl("health:ingestd") <= 10


async def test_sigkill_mid_stream_then_restart_is_exactly_once(
    settings: Settings, start_daemon: StartDaemon, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    n = 40_000
    sent = published_feed(settings, n, seed=11)
    first = start_daemon(settings)
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", 4_000)
    first.signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    landed_at_kill = await db.fetchval("SELECT count(*) FROM spreads")
    assert pending(rclient) > 0, "the kill must hit entries in flight"

    second = start_daemon(settings)  # same consumer name: re-reads its own pending entries
    exp = Expected.of(sent)
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", exp.counts["spreads"])
    await wait_for_rows(settings.storage.postgres.dsn, "trades", exp.counts["trades"])
    second.signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, second.log
    assert "re-read" in second.log
    assert landed_at_kill < exp.counts["spreads"]
    await assert_landed_exactly_once(db, exp)
    assert pending(rclient) == 0


BAD_PAYLOADS: dict[str, bytes] = {
    "not_json": b"{not json",
    "unknown_type": b'{"type": "candle", "event_id": "bad-1"}',
    "sql_in_type": b'{"type": "spread\'; DROP TABLE spreads;--", "event_id": "bad-2"}',
    "naive_time": (
        b'{"type": "fx_rate", "event_id": "bad-3", "pair": "USDKRW", "rate": "1.0",'
        b' "timestamp": "2025-11-15T03:40:15"}'
    ),
    "numeric_overflow": (
        b'{"type": "fx_rate", "event_id": "bad-4", "pair": "USDKRW",'
        b' "rate": "12345678901.5", "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "twenty_digit_int": (
        b'{"type": "fx_rate", "event_id": "bad-5", "pair": "USDKRW",'
        b' "rate": 12345678901234567890, "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "nan_string": (
        b'{"type": "fx_rate", "event_id": "bad-6", "pair": "USDKRW",'
        b' "rate": "NaN", "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "huge_exponent": (
        b'{"type": "fx_rate", "event_id": "bad-7", "pair": "USDKRW",'
        b' "rate": 1e400, "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "long_event_id": (
        b'{"type": "fx_rate", "event_id": "' + b"x" * 101 + b'", "pair": "USDKRW",'
        b' "rate": "1.0", "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "lone_surrogate": (
        b'{"type": "fx_rate", "event_id": "bad-8", "pair": "\\ud800",'
        b' "rate": "1.0", "timestamp": "2025-11-15T03:40:15Z"}'
    ),
    "oversize": b'{"type": "fx_rate", "pad": "' + b"y" * (1_048_576 + 10) + b'"}',
    "invalid_utf8": b'{"type": "fx_rate", "event_id": "bad-9", "pair": "\xff\xfe"}',
}


async def test_malformed_events_are_dead_lettered_and_good_ones_land(
    settings: Settings,
    start_daemon: StartDaemon,
    rclient: redis.Redis,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    good = simulated(3_000, seed=3)
    script = (
        "import json, sys, redis\n"
        "doc = json.loads(open(sys.argv[2], encoding='utf-8').read())\n"
        "good = doc['good']\n"
        "bad = {k: bytes.fromhex(v) for k, v in doc['bad'].items()}\n"
        "r = redis.Redis.from_url(sys.argv[1])\n"
        "bad_items = list(bad.items())\n"
        "for i, ev in enumerate(good):\n"
        "    r.xadd('ingestd:events', {'event': json.dumps(ev)})\n"
        "    if i % 200 == 0 and bad_items:\n"
        "        name, payload = bad_items.pop()\n"
        "        r.xadd('ingestd:events', {'event': payload})\n"
        "for name, payload in bad_items:\n"
        "    r.xadd('ingestd:events', {'event': payload})\n"
        "r.xadd('ingestd:events', {'not_event': b'x'})\n"
    )
    feed = tmp_path / "feed.json"
    feed.write_text(
        json.dumps({"good": good, "bad": {k: v.hex() for k, v in BAD_PAYLOADS.items()}})
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, settings.storage.redis.url, str(feed)],
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
        env=ingestd_env(settings),
    )
    assert proc.returncode == 0, proc.stderr
    daemon = start_daemon(settings)
    exp = Expected.of(good)
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", exp.counts["spreads"])
    want_dead = len(BAD_PAYLOADS) + 1
    await wait_for_rows(settings.storage.postgres.dsn, "dead_letters", want_dead)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.log
    await assert_landed_exactly_once(db, exp)
    rows = await db.fetch("SELECT * FROM dead_letters ORDER BY id")
    assert len(rows) == want_dead
    errors = " | ".join(r["error"] for r in rows)
    for fragment in (
        "not valid JSON",
        "unknown event type",
        "no offset",
        "does not fit NUMERIC",
        "not a decimal number",
        "longer than 100",
        "larger than max_event_bytes",
        "no 'event' field",
    ):
        assert fragment in errors, fragment
    for r in rows:
        assert r["dedup_key"].startswith("stream:ingestd:events:")
    # Each raw payload is kept (escaped where it is not valid UTF-8), with its size and digest.
    by_digest = {r["payload_sha256"]: r for r in rows}
    for name, payload in BAD_PAYLOADS.items():
        row = by_digest[hashlib.sha256(payload).hexdigest()]
        assert row["payload_bytes"] == len(payload), name
        if name != "oversize":
            assert row["payload"] == payload.decode("utf-8", errors="backslashreplace"), name
    oversize = [r for r in rows if "max_event_bytes" in r["error"]]
    assert oversize[0]["payload_bytes"] == len(BAD_PAYLOADS["oversize"])
    assert len(oversize[0]["payload"]) < len(BAD_PAYLOADS["oversize"])
    assert pending(rclient) == 0
    assert "action=dead_letter" in daemon.log


async def test_run_refuses_a_schema_that_is_behind(settings: Settings, pg_server: Any) -> None:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    name = "ingestd_test_unmigrated"
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = settings.storage.postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
        done = run_cli(settings.replace(**{"storage.postgres.dsn": dsn}), "run", timeout=60)
        assert done.returncode != 0
        assert "ingestd migrate" in done.stdout + done.stderr
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_health_command_follows_the_heartbeat(
    settings: Settings, start_daemon: StartDaemon, rclient: redis.Redis
) -> None:
    assert run_cli(settings, "health").returncode == 1  # nothing has beaten yet
    daemon = start_daemon(settings)
    await daemon.wait_for_log("action=started")
    deadline = time.monotonic() + 10
    while rclient.get("health:ingestd") is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ok = run_cli(settings, "health")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("healthy")
    missing = run_cli(settings, "health", "--component", "collector")
    assert missing.returncode == 1
    assert "collector: no heartbeat" in missing.stderr
    # A collector's heartbeat through the stream makes that component healthy too.
    heartbeat = {
        "type": "heartbeat",
        "event_id": "hb-e2e-1",
        "producer": "collector",
        "component": "collector",
        "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
    }
    rclient.xadd("ingestd:events", {"event": json.dumps(heartbeat)})
    deadline = time.monotonic() + 10
    while rclient.get("health:collector") is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    both = run_cli(settings, "health", "--component", "collector")
    assert both.returncode == 0, both.stderr
    assert "collector" in both.stdout
    paper = run_cli(settings, "health", "--component", "collector", "--component", "paper")
    assert paper.returncode == 1
    assert paper.stderr.strip() == "unhealthy: paper: no heartbeat"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    stale = utc_iso(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60))
    rclient.set("health:ingestd:e2e-1", stale, ex=10)  # this replica's own heartbeat
    rclient.set("health:ingestd", utc_iso(dt.datetime.now(dt.UTC)), ex=10)  # another's
    old = run_cli(settings, "health")
    assert old.returncode == 1
    assert "last heartbeat 60" in old.stderr
    # Another replica's fresh heartbeat does not make this one healthy, unless asked.
    assert run_cli(settings, "health", "--any-replica").returncode == 0


async def test_sigterm_drains_and_exits_zero(
    settings: Settings, start_daemon: StartDaemon, rclient: redis.Redis, db: asyncpg.Connection
) -> None:
    n = 80_000
    sent = published_feed(settings, n, seed=5)
    daemon = start_daemon(settings)
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", 1_000)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0, daemon.log
    assert "action=stopped" in daemon.log and "(clean)" in daemon.log
    # Nothing was acknowledged without a commit; what was not read yet stays in the stream,
    # so a restart completes the set exactly once.
    assert pending(rclient) == 0
    exp = Expected.of(sent)
    assert await db.fetchval("SELECT count(*) FROM spreads") < exp.counts["spreads"]
    second = start_daemon(settings)
    await wait_for_rows(settings.storage.postgres.dsn, "spreads", exp.counts["spreads"])
    await wait_for_rows(settings.storage.postgres.dsn, "trades", exp.counts["trades"])
    second.signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0, second.log
    await assert_landed_exactly_once(db, exp)


async def test_sigterm_while_waiting_for_the_database_at_start_exits_at_once(
    settings: Settings, start_daemon: StartDaemon
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: ingestd waits for PostgreSQL to come up
    nowhere = settings.replace(**{"storage.postgres.dsn": f"postgresql://u@127.0.0.1:{port}/db"})
    daemon = start_daemon(nowhere)
    await daemon.wait_for_log("action=db_wait")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0, daemon.log
    assert "stopped before the start completed" in daemon.log
