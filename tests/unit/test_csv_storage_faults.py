"""CsvStorage on a failing filesystem, for real: a full disk (short write, then ENOSPC) and fsync
errors. A row that cannot be written leaves no torn row and is not logged; an fsync failure is
fatal for its file and is raised by the next call, never lost on the timer thread."""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from ingestd import errors
from ingestd.producer.storage import (
    AsyncCsvStorage,
    AsyncDualStorage,
    AsyncPostgresStorage,
    CsvStorage,
    DualStorage,
    PostgresStorage,
)
from ingestd.producer.storage.csv_storage import CsvWriteFailed
from ingestd.producer.storage.postgres import StreamTransport
from ingestd.wire import csv_format
from tests.samples import fx_rate, spread
from tests.tiny_disk import needs_unshare, run_on_tiny_disk

# Fills a 64 KiB tmpfs with spreads.csv rows, then reports what the file holds.
DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from ingestd.wire import csv_format
    from ingestd.producer.storage import CsvStorage
    from tests.samples import spread

    directory = Path(sys.argv[1])
    storage = CsvStorage(directory, producer="paper", fsync_interval_s=0)
    ok, refused, kind = 0, "", ""
    try:
        for i in range(100000):
            storage.log_spread(spread(i))
            ok += 1
    except Exception as exc:
        refused, kind = str(exc), type(exc).__name__
    path = directory / "spreads.csv"
    size_after_refusal = path.stat().st_size
    again = ""
    try:
        storage.log_spread(spread(ok))
    except Exception as exc:
        again = type(exc).__name__
    storage.close()
    data = path.read_bytes()
    with path.open("rb") as f:
        records = list(csv_format.read_records(f))
    print(json.dumps({
        "ok": ok, "refused": refused, "kind": kind, "again": again,
        "size_after_refusal": size_after_refusal, "size": len(data),
        "ends_with_line_end": data.endswith(b"\\n"),
        "records": len(records) - 1,
        "bad": [r.error for r in records if r.error or not r.terminated],
        "last_upbit": records[-1].fields[1] if records[-1].fields else None,
    }))
    """
)


@needs_unshare
def test_a_full_disk_refuses_the_row_and_never_leaves_a_torn_row(tmp_path: Path) -> None:
    report = run_on_tiny_disk(tmp_path, DISK_FULL_SCRIPT, "{mnt}/csv", mount_options="size=64k")
    assert report["ok"] > 100  # it filled the disk...
    assert report["kind"] == "CsvWriteFailed"  # ...and said so clearly
    assert "No space left on device" in report["refused"]
    assert "the row is not logged, nothing of it was kept" in report["refused"]
    assert report["again"] == "CsvWriteFailed"  # still full: refused again, cleanly
    # Exactly the rows that were logged, each whole: no torn row behind the refusal.
    assert report["size"] == report["size_after_refusal"]
    assert report["ends_with_line_end"] is True
    assert report["bad"] == []
    assert report["records"] == report["ok"]
    assert report["last_upbit"] == f"{140123456 + report['ok'] - 1}.12"


def _fsync_fails_on_spreads(directory: Path) -> None:
    # fsync(2) of a character device fails with EINVAL: a real fsync error from the kernel for
    # this one file, while the other files of the directory are ordinary files.
    directory.mkdir()
    (directory / "spreads.csv").symlink_to("/dev/null")


def test_an_fsync_failure_on_the_timer_is_raised_by_the_next_calls(tmp_path: Path) -> None:
    directory = tmp_path / "csv"
    _fsync_fails_on_spreads(directory)
    storage = CsvStorage(directory, fsync_interval_s=0.05)
    unhandled: list[BaseException | None] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: unhandled.append(args.exc_value)
    try:
        storage.log_spread(spread(0))  # written; the fsync fails on the timer thread
        deadline = time.monotonic() + 10
        while not storage._files["spreads"].failed:  # the timer thread has tried
            assert time.monotonic() < deadline, "the timer never tried to fsync"
            time.sleep(0.01)
    finally:
        threading.excepthook = previous_hook
    assert unhandled == []  # the timer thread did not die of it
    with pytest.raises(CsvWriteFailed, match=r"spreads\.csv: an fsync failed \(Invalid argument\)"):
        storage.log_spread(spread(1))
    with pytest.raises(CsvWriteFailed, match="takes no more rows"):
        storage.log_spread(spread(2))  # fatal for the file: every later row, not just the next
    storage.log_fx_rate(fx_rate(0))  # the other files go on
    with pytest.raises(CsvWriteFailed, match=r"spreads\.csv"):
        storage.flush()
    with pytest.raises(CsvWriteFailed, match=r"spreads\.csv"):
        storage.close()
    # close() closed every file all the same, and the fx_rates row is there.
    with (directory / "fx_rates.csv").open("rb") as f:
        assert len(list(csv_format.read_records(f))) == 2


def test_with_fsync_every_row_the_failing_row_raises_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "csv"
    _fsync_fails_on_spreads(directory)
    storage = CsvStorage(directory, fsync_interval_s=0)
    with pytest.raises(CsvWriteFailed, match="an fsync failed"):
        storage.log_spread(spread(0))
    with pytest.raises(CsvWriteFailed, match="takes no more rows"):
        storage.flush()
    with pytest.raises(CsvWriteFailed):
        storage.close()


def test_a_failed_fsync_is_not_taken_for_a_successful_one(tmp_path: Path) -> None:
    """The old timer cleared ``dirty`` before the fsync: a failed fsync looked like a done one."""
    directory = tmp_path / "csv"
    _fsync_fails_on_spreads(directory)
    storage = CsvStorage(directory, fsync_interval_s=3600)
    storage.log_spread(spread(0))
    for _ in range(2):  # the first flush fails; so must every later one
        with pytest.raises(CsvWriteFailed):
            storage.flush()
    with pytest.raises(CsvWriteFailed):
        storage.close()


@pytest.mark.redis
def test_dual_close_raises_the_csv_failure_after_closing_the_database_side(
    tmp_path: Path, redis_url: str
) -> None:
    directory = tmp_path / "csv"
    _fsync_fails_on_spreads(directory)
    db = PostgresStorage(redis.Redis.from_url(redis_url), owns_client=True)
    storage = DualStorage(CsvStorage(directory, fsync_interval_s=3600), db)
    storage.log_spread(spread(0))  # its CSV file cannot be fsync'd (at close)
    storage.log_fx_rate(fx_rate(0))
    with pytest.raises(CsvWriteFailed):
        storage.close()
    assert db.sent == 2 and db.pending == 0  # flushed and closed all the same
    with pytest.raises(errors.ShuttingDown):
        db.log_fx_rate(fx_rate(1))


@pytest.mark.redis
def test_a_dual_write_whose_database_side_fails_is_completed_by_a_retry_without_a_second_row(
    tmp_path: Path, redis_url: str
) -> None:
    db = PostgresStorage(redis.Redis.from_url(redis_url), owns_client=True)
    storage = DualStorage(CsvStorage(tmp_path, fsync_interval_s=0), db)
    first = storage.log_spread(spread(0))
    db.close()  # the database side now refuses
    for _ in range(2):  # the producer retries the same call
        with pytest.raises(errors.ShuttingDown) as failure:
            storage.log_spread(spread(1))
        notes = " ".join(getattr(failure.value, "__notes__", []))
        assert "written to CSV as event_id" in notes and "not published" in notes
    storage.csv.close()
    with (tmp_path / "spreads.csv").open("rb") as f:
        rows = list(csv_format.read_records(f))[1:]
    # The CSV row was written once, under one id, whatever the number of retries.
    assert len(rows) == 2
    column = csv_format.CSV_TABLES_BY_NAME["spreads"].columns.index("event_id")
    ids = [r.fields[column] if r.fields else None for r in rows]
    assert ids[0] == first and ids[1] != first


# --- asyncio: an fsync never blocks the event loop ------------------------------------------------


class SlowFsync:
    """``os.fsync`` that blocks until released: whoever calls it waits, and it says whether it
    was released (True) or gave up waiting (False: nobody could release it meanwhile)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released: list[bool] = []
        real = os.fsync

        def slow(fd: int) -> None:
            self.entered.set()
            self.released.append(self.release.wait(5))
            real(fd)

        monkeypatch.setattr(os, "fsync", slow)


async def _loop_goes_on_during(slow: SlowFsync, call: Awaitable[Any], log_more: Any) -> None:
    task = asyncio.ensure_future(call)
    # Reached only if the event loop runs while the fsync blocks (in another thread).
    assert await asyncio.to_thread(slow.entered.wait, 10)
    await log_more()  # a row is logged meanwhile, on the loop
    slow.release.set()
    await task
    assert slow.released and all(slow.released), "the fsync blocked the event loop"


async def _flush_then_close_off_the_loop(
    storage: AsyncCsvStorage | AsyncDualStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log a spread, then: while a flush and then the close are held in a slow fsync, the event
    loop goes on (logging another spread during the flush)."""
    await storage.log_spread(spread(0))
    slow = SlowFsync(monkeypatch)
    await _loop_goes_on_during(slow, storage.flush(), lambda: storage.log_spread(spread(1)))
    slow.entered.clear()
    slow.release.clear()
    await _loop_goes_on_during(slow, storage.aclose(), lambda: asyncio.sleep(0))


async def test_async_csv_flush_and_close_fsync_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = AsyncCsvStorage(CsvStorage(tmp_path, fsync_interval_s=3600))
    await _flush_then_close_off_the_loop(storage, monkeypatch)
    assert (tmp_path / "spreads.csv").read_text(encoding="utf-8").count("\n") == 3


async def test_async_csv_fsync_of_every_row_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = AsyncCsvStorage(CsvStorage(tmp_path, fsync_interval_s=0))
    await storage.log_spread(spread(0))  # the file exists: its creation is not measured
    slow = SlowFsync(monkeypatch)
    await _loop_goes_on_during(slow, storage.log_spread(spread(1)), lambda: asyncio.sleep(0))
    slow.release.set()
    await storage.aclose()


@pytest.mark.redis
async def test_async_dual_flush_and_close_fsync_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    db = AsyncPostgresStorage(
        StreamTransport(aioredis.Redis.from_url(redis_url), "ingestd:events", owns_client=True)
    )
    storage = AsyncDualStorage(CsvStorage(tmp_path, fsync_interval_s=3600), db)
    await _flush_then_close_off_the_loop(storage, monkeypatch)
    assert db.sent == 2
