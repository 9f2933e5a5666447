"""Producer storages against real Redis and PostgreSQL: through ingestd's stream or in-process,
CSV files re-imported, and dual write through a Redis outage (a throwaway redis-server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from decimal import Decimal as D
from pathlib import Path

import asyncpg
import pytest
import redis

from ingestd import Service
from ingestd.clients import redis_sync
from ingestd.commands.csv_import import run_import
from ingestd.commands.csv_verify import run_verify
from ingestd.errors import ConfigError, SinkUnavailable
from ingestd.producer.storage import (
    AsyncCsvStorage,
    AsyncDualStorage,
    AsyncPostgresStorage,
    CsvStorage,
    DualStorage,
    PostgresStorage,
    create_async_storage,
    create_storage,
)
from ingestd.settings import Settings
from ingestd.wire import csv_format
from tests.commands import REPO_ROOT
from tests.feeds import wait_count
from tests.private_servers import OwnRedis, free_port
from tests.samples import closed, fx_rate, order, position, spread, trade

pytestmark = [pytest.mark.pg, pytest.mark.redis]


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The shared settings without retention and maintenance: the sample history
    (tests/samples.py) is dated 2025-11-15, older than the retention of spreads and fx_rates, so
    it would be refused at intake and the retention round a Service runs at its start would delete
    it; the tests here are about the storage API and delivery, not retention. The producers' disk
    outboxes live in the test's own directory."""
    return settings.replace(
        **{
            "maintenance.enabled": False,
            "retention.spreads_days": 0,
            "retention.fx_rates_days": 0,
            "retention.orders_days": 0,
            "storage.outbox.dir": str(tmp_path / "outbox"),
        }
    )


def log_history(storage: PostgresStorage | CsvStorage | DualStorage, spreads: int = 300) -> None:
    """What a paper trader logs: two positions (one closed), their orders and trades, and feed."""
    pos1, pos2 = position("pos_001", 0), position("pos_002", 1)
    storage.log_position_open(pos1)
    storage.log_position_open(pos2)
    for i in range(4):
        storage.log_order(order(i, "pos_001"))
    storage.log_order(order(9, None))  # an order of no position
    storage.log_trade(trade(0, "pos_001"))
    storage.log_position_close(closed(pos1))
    storage.log_trade(trade(60, "pos_001", side="CLOSE"))
    for i in range(spreads):
        storage.log_spread(spread(i, symbol=("BTC", "ETH", "XRP")[i % 3]))
    for i in range(20):
        storage.log_fx_rate(fx_rate(i))


async def assert_history_landed(db: asyncpg.Connection, spreads: int = 300) -> None:
    """Every row of log_history, exactly once and with its exact values."""
    assert await wait_count(db, "SELECT count(*) FROM spreads", spreads) == spreads
    assert await wait_count(db, "SELECT count(*) FROM fx_rates", 20) == 20
    assert await wait_count(db, "SELECT count(*) FROM orders", 5) == 5
    assert await wait_count(db, "SELECT count(*) FROM trades", 2) == 2
    assert await wait_count(db, "SELECT count(*) FROM positions WHERE status='CLOSED'", 1) == 1
    want = sum(spread(i).upbit_price for i in range(spreads))
    assert await db.fetchval("SELECT sum(upbit_price) FROM spreads") == want
    row = await db.fetchrow("SELECT * FROM positions WHERE position_key = 'pos_001'")
    assert row is not None
    assert (row["status"], row["pnl_krw"], row["exit_binance_price"]) == (
        "CLOSED",
        D("12345.67"),
        D("98100.50000000"),
    )
    assert row["open_event_id"] == "pos_001:open" and row["close_event_id"] == "pos_001:close"
    assert await db.fetchval("SELECT count(*) FROM positions") == 2
    linked = await db.fetchval("SELECT count(*) FROM orders WHERE position_id IS NOT NULL")
    assert linked == 4
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


# --- PostgresStorage through the stream ------------------------------------------------------


async def test_sync_postgres_storage_lands_every_row_once_in_few_round_trips(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Service(settings):
        storage = PostgresStorage.from_settings(settings, producer="paper")
        log_history(storage)
        await asyncio.to_thread(storage.flush, 10)
        assert storage.pending == 0 and storage.sent == 330
        # Buffered and pipelined: never a round trip per row.
        assert storage.round_trips <= 20
        await assert_history_landed(db)
        # Logging the same open again (a restarted trader) is harmless: same event id.
        storage.log_position_open(position("pos_002", 1))
        await asyncio.to_thread(storage.close)
        producers = await db.fetch("SELECT DISTINCT producer FROM spreads")
        assert [r["producer"] for r in producers] == ["paper"]
    assert await db.fetchval("SELECT count(*) FROM positions") == 2


async def test_a_redelivered_chunk_lands_once(
    settings: Settings, db: asyncpg.Connection, rclient: redis.Redis
) -> None:
    storage = PostgresStorage.from_settings(settings, producer="collector")
    for i in range(50):
        storage.log_spread(spread(i))
    storage.close()
    entries = rclient.xrange(settings.stream.key) or []
    for _, fields in entries:  # a retried pipeline published them all again
        assert fields is not None
        rclient.xadd(settings.stream.key, {b"event": fields[b"event"]})
    async with Service(settings):
        assert await wait_count(db, "SELECT count(*) FROM spreads", 50) == 50
        await asyncio.sleep(0.3)
    assert rclient.xlen(settings.stream.key) >= 100
    assert await db.fetchval("SELECT count(*) FROM spreads") == 50


async def test_async_postgres_storage_stream_and_in_process(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with Service(settings) as service:
        async with AsyncPostgresStorage.from_settings(settings, producer="live") as storage:
            for i in range(120):
                await storage.log_spread(spread(i))
            await storage.log_position_open(position("pos_010"))
            await storage.flush()
            assert storage.round_trips <= 10
        assert await wait_count(db, "SELECT count(*) FROM spreads", 120) == 120
        # The same producer: a position is its producer's (another producer's close of
        # pos_010 would name a position of its own).
        local = AsyncPostgresStorage.in_process(service, producer="live")
        for i in range(120, 180):
            await local.log_spread(spread(i))
        await local.log_position_close(closed(position("pos_010")))
        await local.flush()  # in-process: committed when it returns
        assert await db.fetchval("SELECT count(*) FROM spreads") == 180
        status = await db.fetchval("SELECT status FROM positions WHERE position_key='pos_010'")
        assert status == "CLOSED"
        await local.aclose()


def test_block_policy_backpressure_and_flush_timeout(tmp_path: Path) -> None:
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.2, protocol=2)
    storage = PostgresStorage(dead, max_buffer_events=5, chunk_events=2)
    for i in range(5):
        storage.log_spread(spread(i))
    blocked = threading.Thread(target=storage.log_spread, args=(spread(5),), daemon=True)
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # the full outbox makes the producer wait; nothing is dropped
    with pytest.raises(SinkUnavailable, match="not yet published"):
        storage.flush(timeout=0.3)
    assert storage.dropped == 0 and storage.pending >= 5
    with pytest.raises(SinkUnavailable):
        storage.close(timeout=0.3)


# --- CsvStorage ----------------------------------------------------------------------------


async def test_csv_storage_files_reimport_exactly(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    with CsvStorage(tmp_path, producer="paper", fsync_interval_s=0) as storage:
        log_history(storage)
    spreads_csv = (tmp_path / "spreads.csv").read_text(encoding="utf-8").splitlines()
    assert spreads_csv[0] == ",".join(csv_format.CSV_TABLES_BY_NAME["spreads"].columns)
    assert len(spreads_csv) == 301
    positions_csv = (tmp_path / "positions.csv").read_text(encoding="utf-8").splitlines()
    # Append-only: an OPEN row per open, a CLOSED row (entry columns again) per close.
    assert [line.split(",")[12] for line in positions_csv[1:]] == ["OPEN", "OPEN", "CLOSED"]
    assert positions_csv[3].split(",")[:2] == ["pos_001", "BTC"]
    err = io.StringIO()
    assert (
        await run_import(settings, tmp_path, progress_mode="off", out=io.StringIO(), err=err) == 0
    )
    await assert_history_landed(db)
    ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM spreads")}
    assert ids == {line.split(",")[8] for line in spreads_csv[1:]}
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, out=out) == 0, out.getvalue()
    # Again, without checkpoints: every row is read and meets its key; nothing is added.
    await db.execute("TRUNCATE csv_import_checkpoints")
    assert await run_import(settings, tmp_path, resume=False, progress_mode="off", out=out) == 0
    await assert_history_landed(db)


async def test_async_csv_storage_and_appending_to_existing_files(tmp_path: Path) -> None:
    async with AsyncCsvStorage(CsvStorage(tmp_path)) as storage:
        await storage.log_spread(spread(1))
        await storage.log_fx_rate(fx_rate(1))
        await storage.flush()
    with CsvStorage(tmp_path) as again:  # a restarted producer appends under the same header
        again.log_spread(spread(2))
    lines = (tmp_path / "spreads.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and lines[1].startswith("BTC,140123457.12,")
    assert (tmp_path / "fx_rates.csv").read_text(encoding="utf-8").count("\n") == 2


def test_csv_storage_refuses_a_foreign_header_and_isolates_a_torn_row(tmp_path: Path) -> None:
    (tmp_path / "spreads.csv").write_text("symbol,price\nBTC,1\n", encoding="utf-8")
    with pytest.raises(csv_format.CsvLayoutError, match="has the header"):
        CsvStorage(tmp_path).log_spread(spread(0))
    other = tmp_path / "other"
    with CsvStorage(other) as storage:
        storage.log_spread(spread(0))
    path = other / "spreads.csv"
    path.write_bytes(path.read_bytes() + b"BTC,1401")  # a crash mid-row
    with CsvStorage(other) as storage:
        storage.log_spread(spread(1))
    rows = path.read_text(encoding="utf-8").splitlines()
    assert rows[2] == "BTC,1401" and rows[3].startswith("BTC,140123457.12,")


# --- dual write through a Redis outage -------------------------------------------------------


@pytest.fixture
async def dual_settings(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> AsyncIterator[Settings]:
    """Settings with storage.backend dual, CSV files in tmp_path/csv, the throwaway Redis."""
    yield settings.replace(
        **{
            "storage.redis.url": own_redis.url,
            "storage.backend": "dual",
            "storage.csv.dir": str(tmp_path / "csv"),
            "storage.csv.fsync_interval_s": 0.05,
        }
    )


async def test_dual_write_rides_out_a_redis_outage(
    dual_settings: Settings, own_redis: OwnRedis, db: asyncpg.Connection, tmp_path: Path
) -> None:
    storage = create_storage(dual_settings, producer="paper")
    assert isinstance(storage, DualStorage)
    own_redis.stop()
    log_history(storage, spreads=300)  # Redis is down: nothing blocks, the CSV side writes
    csv_lines = (tmp_path / "csv" / "spreads.csv").read_text(encoding="utf-8").count("\n")
    assert csv_lines == 301
    assert storage.db.pending == 330 and storage.db.dropped == 0
    own_redis.start()
    async with Service(dual_settings):
        await asyncio.to_thread(storage.flush, 20)  # the outbox catches up by itself
        await assert_history_landed(db)
    storage.close()


async def test_dual_write_longer_outage_catches_up_by_reimport(
    dual_settings: Settings, own_redis: OwnRedis, db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = dual_settings.replace(**{"storage.buffer_max_events": 50})
    storage = create_storage(settings, producer="paper")
    assert isinstance(storage, DualStorage)
    own_redis.stop()
    log_history(storage, spreads=300)
    assert storage.db.dropped == 330 - 50  # the oldest, from memory only: the CSV holds them
    own_redis.start()
    async with Service(settings):
        await asyncio.to_thread(storage.flush, 20)
        assert storage.db.sent == 50
        # Which 50 were kept depends on whether the publisher held a chunk in flight when Redis
        # went down (a chunk in flight is never dropped): wait until ingestd has taken all 50.
        client = redis.Redis.from_url(own_redis.url)
        try:
            end = time.monotonic() + 30
            while not any(
                g["entries-read"] == 50 and g["pending"] == 0
                for g in client.xinfo_groups(settings.stream.key)
            ):
                assert time.monotonic() < end, "ingestd did not take the published events"
                await asyncio.sleep(0.05)
        finally:
            client.close()
        assert int(await db.fetchval("SELECT count(*) FROM spreads")) < 300
        storage.close()
        out = io.StringIO()
        code = await run_import(settings, tmp_path / "csv", progress_mode="off", out=out)
        assert code == 0, out.getvalue()
        await assert_history_landed(db)
        assert await run_verify(settings, tmp_path / "csv", out=out) == 0, out.getvalue()


async def test_dual_csv_failure_still_reaches_the_database(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    async with Service(settings):
        csv_side = CsvStorage(tmp_path)
        csv_side.close()  # writing now fails
        db_side = PostgresStorage.from_settings(settings)
        dual = DualStorage(csv_side, db_side)
        with pytest.raises(ValueError, match="closed"):
            dual.log_spread(spread(7))
        await asyncio.to_thread(db_side.close)
        assert await wait_count(db, "SELECT count(*) FROM spreads", 1) == 1


async def test_async_dual_and_factories(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    csv_only = create_storage({"backend": "csv", "csv": {"dir": str(tmp_path / "a")}})
    assert isinstance(csv_only, CsvStorage)
    csv_only.close()
    pg = create_storage(settings)
    assert isinstance(pg, PostgresStorage)
    pg.close()
    with pytest.raises(ConfigError, match="backend"):
        create_storage({"backend": "mongo"})
    with pytest.raises(ConfigError, match=r"storage\.bakend"):
        create_storage({"bakend": "csv"})
    dual = settings.replace(**{"storage.backend": "dual", "storage.csv.dir": str(tmp_path / "b")})
    async with Service(settings) as service:
        storage = create_async_storage(dual, producer="live", service=service)
        assert isinstance(storage, AsyncDualStorage)
        for i in range(30):
            await storage.log_spread(spread(i))
        await storage.flush()
        assert await db.fetchval("SELECT count(*) FROM spreads") == 30
        await storage.aclose()
        via_stream = create_async_storage(dual, producer="live", csv_dir=tmp_path / "c")
        await via_stream.log_fx_rate(fx_rate(1))
        await via_stream.aclose()
        assert await wait_count(db, "SELECT count(*) FROM fx_rates", 1) == 1
    assert (tmp_path / "b" / "spreads.csv").read_text(encoding="utf-8").count("\n") == 31
    assert (tmp_path / "c" / "fx_rates.csv").is_file()


def test_redis_sync_timeouts(settings: Settings) -> None:
    client = redis_sync(settings.storage.redis.url, socket_timeout_s=0.7)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.7 and kwargs["socket_connect_timeout"] == 0.7
    client.close()


def test_rows_are_written_while_an_fsync_is_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = CsvStorage(tmp_path, fsync_interval_s=60)
    storage.log_spread(spread(0))
    release, in_fsync = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        in_fsync.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    flusher = threading.Thread(target=storage.flush, daemon=True)
    flusher.start()
    assert in_fsync.wait(10)
    writer = threading.Thread(target=storage.log_spread, args=(spread(1),), daemon=True)
    writer.start()
    writer.join(5)
    assert not writer.is_alive()  # the row did not wait for the fsync
    assert release.is_set() is False
    release.set()
    flusher.join(10)
    storage.close()
    assert (tmp_path / "spreads.csv").read_text(encoding="utf-8").count("\n") == 3


def test_drops_are_logged_once_per_outage_and_again_after_a_recovery(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingestd.producer.storage.postgres")
    storage = PostgresStorage(
        redis_sync(own_redis.url, socket_timeout_s=0.5),
        producer="paper",
        max_buffer_events=10,
        overflow="drop_oldest",
        owns_client=True,
    )

    def drop_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.action == "storage_outbox_dropped"]  # type: ignore[attr-defined]

    try:
        for outage in (1, 2):
            own_redis.stop()
            for i in range(40):
                storage.log_fx_rate(fx_rate(outage * 100 + i))
            assert len(drop_lines()) == outage, drop_lines()  # once in this outage, not per drop
            own_redis.start()
            storage.flush(20)  # the outage ends: published again
        first, second = drop_lines()
        assert "(first paper-" in first and "(first paper-" in second
        assert first.split("(first ")[1] != second.split("(first ")[1]  # this outage's first drop
    finally:
        storage.close()


async def test_a_foreign_header_is_refused_when_the_storage_is_made_before_any_redis_client(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "spreads.csv").write_text("symbol,price\nBTC,1\n", encoding="utf-8")
    with pytest.raises(csv_format.CsvLayoutError, match="has the header"):
        CsvStorage(tmp_path)  # at once, not at the first row logged
    # The CSV side is checked before a Redis client is made: a URL that no client accepts is
    # never looked at, so nothing is left to close.
    dual = settings.replace(
        **{
            "storage.backend": "dual",
            "storage.csv.dir": str(tmp_path),
            "storage.redis.url": "redis://127.0.0.1:not-a-port/0",
        }
    )
    with pytest.raises(csv_format.CsvLayoutError, match="has the header"):
        create_storage(dual)
    with pytest.raises(csv_format.CsvLayoutError, match="has the header"):
        create_async_storage(dual)
    (tmp_path / "spreads.csv").unlink()
    with pytest.raises(ValueError, match=r"[Pp]ort"):
        create_storage(dual)  # the CSV side is fine now; the URL is refused, the CSV side closed


# A producer that logs and ends without close(): its publisher thread is a daemon thread.
EXIT_WITHOUT_CLOSE = textwrap.dedent(
    """
    import logging, sys
    from ingestd.producer.storage import PostgresStorage
    from ingestd.clients import redis_sync
    from tests.samples import fx_rate

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    url, stream, n, exit_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bound = {} if exit_timeout == "default" else {"exit_timeout_s": float(exit_timeout)}
    storage = PostgresStorage(
        redis_sync(url, socket_timeout_s=0.5), stream=stream, producer="paper",
        **bound,
    )
    for i in range(n):
        storage.log_fx_rate(fx_rate(i))
    print("logged", flush=True)
    """
)


def _exit_without_close(tmp_path: Path, url: str, n: int, exit_timeout_s: str) -> str:
    script = tmp_path / "producer.py"
    script.write_text(EXIT_WITHOUT_CLOSE)
    done = subprocess.run(
        [sys.executable, str(script), url, "test:exit-stream", str(n), exit_timeout_s],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "logged"
    return done.stderr


def test_a_producer_exiting_without_close_still_publishes_its_outbox(
    tmp_path: Path, redis_url: str, rclient: redis.Redis
) -> None:
    log = _exit_without_close(tmp_path, redis_url, 3000, "default")
    assert rclient.xlen("test:exit-stream") == 3000, log
    assert "exiting without PostgresStorage.close(): publishing" in log


def test_a_producer_exiting_while_redis_is_down_says_what_it_could_not_publish(
    tmp_path: Path,
) -> None:
    log = _exit_without_close(tmp_path, f"redis://127.0.0.1:{free_port()}/0", 50, "1")
    assert "exiting without PostgresStorage.close(): publishing 50 pending event(s)" in log
    assert "closing with 50 unpublished event(s)" in log
    assert "Traceback" not in log


# A producer whose CSV file cannot grow (a file size limit, RLIMIT_FSIZE: EFBIG from write(2),
# the same refusal as a full disk) for one call, which it then repeats, as a producer naturally
# does after an error. It reports what it was told.
CSV_FAILS_ONCE = textwrap.dedent(
    """
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    import redis
    from ingestd.clients import redis_async
    from ingestd.producer.storage import (
        AsyncDualStorage, AsyncPostgresStorage, CsvStorage, DualStorage, PostgresStorage)
    from ingestd.producer.storage.csv_storage import CsvWriteFailed
    from ingestd.producer.storage.postgres import StreamTransport
    from tests.samples import spread

    directory, url, stream, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit_to_the_file():
        size = (directory / "spreads.csv").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    def lift_the_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

    def report(ids, exc, retried_id):
        print(json.dumps({"ids": ids, "error": str(exc), "error_event_id": exc.event_id,
                          "published": exc.published, "retried_id": retried_id}))

    def sync():
        db = PostgresStorage(redis.Redis.from_url(url), stream=stream, owns_client=True)
        storage = DualStorage(CsvStorage(directory, producer="paper"), db, producer="paper")
        ids = [storage.log_spread(spread(i)) for i in range(10)]
        limit_to_the_file()
        try:
            storage.log_spread(spread(10))
        except CsvWriteFailed as exc:
            failure = exc
        lift_the_limit()
        retried_id = storage.log_spread(spread(10))  # the same call again
        ids.append(storage.log_spread(spread(11)))
        storage.close()
        report(ids, failure, retried_id)

    async def asynchronous():
        transport = StreamTransport(redis_async(url, socket_timeout_s=2), stream, owns_client=True)
        db = AsyncPostgresStorage(transport, producer="paper")
        storage = AsyncDualStorage(CsvStorage(directory, producer="paper"), db, producer="paper")
        ids = [await storage.log_spread(spread(i)) for i in range(10)]
        limit_to_the_file()
        try:
            await storage.log_spread(spread(10))
        except CsvWriteFailed as exc:
            failure = exc
        lift_the_limit()
        retried_id = await storage.log_spread(spread(10))
        ids.append(await storage.log_spread(spread(11)))
        await storage.aclose()
        report(ids, failure, retried_id)

    sync() if mode == "sync" else asyncio.run(asynchronous())
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_dual_write_repeated_after_a_csv_failure_lands_once_and_agrees_with_the_csv(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "producer.py"
    script.write_text(CSV_FAILS_ONCE)
    directory = tmp_path / "csv"
    args = [str(script), str(directory), settings.storage.redis.url, settings.stream.key, mode]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    event_id = report["error_event_id"]
    # The error says what was written and what was not, naming the event.
    assert report["published"] is True
    assert f"published to stream {settings.stream.key} as event_id {event_id}" in report["error"]
    assert "not written to CSV" in report["error"]
    # The repeated call reused the event's id: its CSV row now exists, and the database has it once.
    assert report["retried_id"] == event_id
    async with Service(settings):
        assert await wait_count(db, "SELECT count(*) FROM spreads", 12) == 12
        await asyncio.sleep(0.3)  # a duplicate would have landed along with the rest
        assert await db.fetchval("SELECT count(*) FROM spreads") == 12
        ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM spreads")}
        assert ids == {*report["ids"], event_id}
        out = io.StringIO()
        assert await run_verify(settings, directory, out=out) == 0, out.getvalue()
    with (directory / "spreads.csv").open("rb") as f:
        rows = list(csv_format.read_records(f))[1:]
    assert len(rows) == 12 and all(r.error is None for r in rows)
