"""The producer's disk outbox on real files: order, recovery, the disk bound and its alarm."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.producer.storage.outbox import (
    DiskOutbox,
    OutboxBroken,
    OutboxError,
    OutboxFull,
    open_disk_outbox,
)
from ingestd.settings import OutboxSettings
from ingestd.spool import DATABASE_FILE, Spool, record_bytes


def payload(n: int, size: int = 20) -> bytes:
    """A payload naming ``n``, padded to ``size`` bytes."""
    return f"e{n}:".encode().ljust(size, b".")


def names(records: list[bytes]) -> list[int]:
    """The numbers of the payloads."""
    return [int(r.split(b":")[0][1:]) for r in records]


def drain(box: DiskOutbox, limit: int = 1000) -> list[bytes]:
    """Take and settle everything, in order."""
    out: list[bytes] = []
    while batch := box.take(limit):
        box.settle(batch)
        out.extend(r.payload for r in batch)
    return out


def on_disk(directory: Path) -> list[bytes]:
    """The payloads in the outbox's database, as another process sees them."""
    with contextlib.closing(sqlite3.connect(directory / DATABASE_FILE)) as db:
        return [row[0] for row in db.execute("SELECT payload FROM records ORDER BY id")]


def test_append_is_in_the_file_before_it_returns_and_is_taken_in_order(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    try:
        for i in range(100):
            box.append(payload(i))
        # No fsync has run (60 s), yet every record is in the files: another process sees it,
        # as a restarted process would after kill -9 (the page cache outlives the process).
        assert names(on_disk(tmp_path)) == list(range(100))
        first = box.take(7)
        box.put_back(first)  # a failed publish: handed out again, first
        assert names([r.payload for r in box.take(7)]) == list(range(7))
        assert box.in_flight == 7 and len(box) == 93
        assert names(drain(box)) == list(range(7, 100))
    finally:
        box.close()


def test_published_records_are_removed(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    try:
        for i in range(200):
            box.append(payload(i))
        assert box.size_bytes == 200 * record_bytes(payload(0))
        assert drain(box)
        assert box.size_bytes == 0 and box.sent == box.added == 200
        assert on_disk(tmp_path) == []
    finally:
        box.close()
    assert not (tmp_path / f"{DATABASE_FILE}-wal").exists()  # copied in and removed at close


def test_a_reopened_outbox_publishes_the_earlier_run_first_then_new_events(
    tmp_path: Path,
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    for i in range(50):
        box.append(payload(i))
    box.settle(box.take(10))  # 10 published; 40 not
    box.take(5)  # handed out, not confirmed published: they come again
    box.close()
    again = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=0)
    try:
        assert again.recovered == again.added == 40 and len(again) == 40
        for i in range(50, 60):
            again.append(payload(i))
        assert names(drain(again)) == list(range(10, 60))
    finally:
        again.close()


def test_a_torn_tail_of_the_log_is_ignored_and_everything_before_it_kept(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path / "live", max_bytes=1 << 20, fsync_interval_s=60)
    try:
        for i in range(5):
            box.append(payload(i))
        # The files as a crash of the producer leaves them (the log not copied in, not
        # removed), taken while it is open; a crash while writing the log adds part of a frame.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for name in (DATABASE_FILE, f"{DATABASE_FILE}-wal"):
            shutil.copyfile(tmp_path / "live" / name, crashed / name)
    finally:
        box.close()
    with (crashed / f"{DATABASE_FILE}-wal").open("ab") as f:
        f.write(os.urandom(1000))
    again = DiskOutbox(crashed, max_bytes=1 << 20, fsync_interval_s=60)
    try:
        assert again.recovered == 5
        assert names(drain(again)) == list(range(5))
    finally:
        again.close()


def test_the_files_are_the_spools_own(tmp_path: Path) -> None:
    """One format: a directory the outbox wrote is read by the in-process spool's recovery."""
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=0)
    for i in range(30):
        box.append(payload(i))
    box.close()

    async def replay() -> list[bytes]:
        spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1024)
        assert await spool.open() == 30
        out: list[bytes] = []
        while batch := await spool.read_batch(100):
            out.extend(r.payload for r in batch)
        await spool.close()
        return out

    assert names(asyncio.run(replay())) == list(range(30))


def test_one_process_per_directory(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    try:
        with pytest.raises(OutboxBroken, match=r"outbox directory .* in use by another producer"):
            DiskOutbox(tmp_path, max_bytes=1 << 20)
    finally:
        box.close()
    DiskOutbox(tmp_path, max_bytes=1 << 20).close()  # released by close


def test_the_disk_bound_refuses_loudly_once_per_episode_and_clears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingestd.producer.storage.outbox")
    box = DiskOutbox(tmp_path, max_bytes=4096, segment_bytes=1024, fsync_interval_s=60)
    accepted: list[int] = []
    try:
        for i in range(1000):
            try:
                box.append(payload(i))
            except OutboxFull as exc:
                assert "max_bytes=4096" in str(exc)
                break
            accepted.append(i)
        for i in range(2):
            with pytest.raises(OutboxFull):
                box.append(payload(2000 + i))
        assert box.alarm and box.refused == 3
        alarms = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(alarms) == 1 and "nothing is dropped" in alarms[0].getMessage()
        # Room comes back as records are published. Appends that fit are taken again at once;
        # the alarm stays until the outbox is below half, so that it does not flap at the edge.
        first = box.take(3)
        box.settle(first)
        published = names([r.payload for r in first])
        assert box.size_bytes > 2048
        box.append(payload(3000))
        accepted.append(3000)
        assert box.alarm
        published += names(drain(box))
        assert not box.alarm
        assert [r for r in caplog.records if "room again" in r.getMessage()]
        box.append(payload(4000))
        accepted.append(4000)
        published += names(drain(box))
        # Every accepted event once, in order, and none of the refused ones.
        assert published == accepted
        assert box.sent == len(accepted)
    finally:
        box.close()


def test_a_failed_fsync_breaks_the_outbox_but_keeps_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=0.01)
    box.append(payload(0))

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)  # the fsync thread's fsync of the log
    box.append(payload(1))  # committed; its fsync, within 10 ms, fails
    deadline = time.monotonic() + 10
    while box.broken is None:
        assert time.monotonic() < deadline, "the failed fsync was not noticed"
        time.sleep(0.01)
    with pytest.raises(OutboxBroken, match="fsync failed"):
        box.append(payload(2))
    with pytest.raises(OutboxBroken, match="broken"):
        box.append(payload(3))
    monkeypatch.undo()
    try:
        # What it took before is still published; nothing after the failure was taken.
        assert names(drain(box)) == [0, 1]
        assert box.broken is not None and "fsync failed" in box.broken and box.alarm
    finally:
        box.close()


def test_appends_from_many_threads_are_each_kept_once(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 24, segment_bytes=4096, fsync_interval_s=0.001)
    taken: list[bytes] = []
    done = threading.Event()

    def publisher() -> None:
        while not (done.is_set() and not len(box)):
            batch = box.take(64)
            if batch:
                box.settle(batch)
                taken.extend(r.payload for r in batch)

    def producer(k: int) -> None:
        for i in range(500):
            box.append(payload(k * 1000 + i))

    pub = threading.Thread(target=publisher)
    pub.start()
    producers = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    pub.join()
    box.close()
    got = names(taken)
    assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(500))
    for k in range(4):  # each thread's events in the order it logged them
        mine = [n for n in got if n // 1000 == k]
        assert mine == sorted(mine)


def test_records_the_disk_changed_after_they_were_written_are_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    for i in range(5):
        box.append(payload(i))
    box.close()  # the log is copied into the database file
    database = tmp_path / DATABASE_FILE
    data = bytearray(database.read_bytes())
    at = data.index(payload(2)) + 10  # one byte of the third record's payload flips
    data[at] ^= 0xFF
    database.write_bytes(bytes(data))
    again = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    try:
        assert names(drain(again)) == [0, 1, 3, 4]
        assert again.corrupt_records == 1 and again.settled == again.added == 5
        assert not len(again)
        (aside,) = tmp_path.glob("*.corrupt")
        assert aside.stat().st_size == len(payload(2))  # kept, not dropped
        assert any("fail their checksum" in r.getMessage() for r in caplog.records)
    finally:
        again.close()


def test_a_record_recovery_could_not_read_is_refused(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20)
    try:
        with pytest.raises(OutboxError, match="0 bytes"):
            box.append(b"")
        assert box.added == 0 and not box.alarm
    finally:
        box.close()


def test_open_disk_outbox_names_a_directory_per_producer(tmp_path: Path) -> None:
    settings = OutboxSettings(dir=str(tmp_path))
    box = open_disk_outbox(settings, "paper")
    assert box is not None and box.directory == tmp_path / "paper"
    box.close()
    assert open_disk_outbox(OutboxSettings(dir=""), "paper") is None
    with pytest.raises(ConfigError, match="cannot name an outbox directory"):
        open_disk_outbox(settings, "../live")
