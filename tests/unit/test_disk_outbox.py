"""The producer's disk outbox on real files: order, recovery, the disk bound and its alarm."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.settings import OutboxSettings
from ingestd.spool import SEGMENT_PREFIX, Spool, encode_record, scan
from ingestd.storage.outbox import (
    DiskOutbox,
    OutboxBroken,
    OutboxError,
    OutboxFull,
    open_disk_outbox,
)


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


def segments(directory: Path) -> list[Path]:
    """The segment files, in order."""
    return sorted(directory.glob(f"{SEGMENT_PREFIX}*"))


def test_append_is_in_the_file_before_it_returns_and_is_taken_in_order(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    try:
        for i in range(100):
            box.append(payload(i))
        # No fsync has run (60 s), yet every record is in the file: another reader sees it,
        # as a restarted process would after kill -9 (the page cache outlives the process).
        on_disk = b"".join(p.read_bytes() for p in segments(tmp_path))
        records, _ = scan(on_disk)
        assert names([r for _, r in records]) == list(range(100))
        assert len(segments(tmp_path)) > 1  # 1 KiB segments: several
        first = box.take(7)
        box.put_back(first)  # a failed publish: handed out again, first
        assert names([r.payload for r in box.take(7)]) == list(range(7))
        assert box.in_flight == 7 and len(box) == 93
        assert names(drain(box)) == list(range(7, 100))
    finally:
        box.close()


def test_published_segments_are_removed_and_the_active_one_emptied(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    try:
        for i in range(200):
            box.append(payload(i))
        assert box.size_bytes == 200 * len(encode_record(payload(0)))
        assert drain(box)
        assert box.size_bytes == 0 and box.sent == box.added == 200
        assert [p.stat().st_size for p in segments(tmp_path)] == [0]  # only the active, empty
    finally:
        box.close()
    assert segments(tmp_path) == []  # an empty active segment is removed at close


def test_a_reopened_outbox_publishes_the_earlier_run_first_then_new_events(
    tmp_path: Path,
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=60)
    for i in range(50):
        box.append(payload(i))
    box.settle(box.take(10))  # 10 published; 40 not
    box.close()
    again = DiskOutbox(tmp_path, max_bytes=1 << 20, segment_bytes=1024, fsync_interval_s=0)
    try:
        # Progress is kept per segment: the 10 published share the first segment with
        # unpublished ones, so they come again (at-least-once, under their fixed ids). Only the
        # one segment being published can be partly published: publishing goes in order.
        first_segment = 1024 // len(encode_record(payload(0)))
        assert again.recovered == again.added == 50 and len(again) == 50
        assert first_segment > 10
        for i in range(50, 60):
            again.append(payload(i))
        assert names(drain(again)) == list(range(60))
    finally:
        again.close()


def test_a_torn_tail_is_cut_and_everything_before_it_kept(tmp_path: Path) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    for i in range(5):
        box.append(payload(i))
    box.close()
    (last,) = segments(tmp_path)
    with last.open("ab") as f:
        f.write(encode_record(payload(5))[:-3])  # a write cut short by a crash
    again = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    try:
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
    caplog.set_level(logging.INFO, logger="ingestd.storage.outbox")
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
        # Room comes back a segment at a time, as segments are wholly published. Appends that
        # fit are taken again at once; the alarm stays until the outbox is below half, so that
        # it does not flap at the edge.
        box.settle(box.take(1000))  # the first segment
        assert box.size_bytes > 2048
        box.append(payload(3000))
        accepted.append(3000)
        assert box.alarm
        published = [*names(drain(box))]
        assert not box.alarm
        assert [r for r in caplog.records if "room again" in r.getMessage()]
        box.append(payload(4000))
        accepted.append(4000)
        published += names(drain(box))
        # Every accepted event once, in order, and none of the refused ones.
        first_segment = 1024 // len(encode_record(payload(0)))
        assert list(range(first_segment)) + published == accepted
        assert box.sent == len(accepted)
    finally:
        box.close()


def test_a_failed_fsync_breaks_the_outbox_but_keeps_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=0)
    box.append(payload(0))
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OutboxBroken, match="fsync failed"):
        box.append(payload(1))
    with pytest.raises(OutboxBroken, match="broken"):
        box.append(payload(2))
    monkeypatch.setattr(os, "fsync", real_fsync)
    try:
        # The record whose fsync failed was refused, so it is not published either.
        assert names(drain(box)) == [0]
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
    try:
        for i in range(5):
            box.append(payload(i))
        (segment,) = segments(tmp_path)
        size = len(encode_record(payload(0)))
        with segment.open("r+b") as f:  # one byte of the third record's payload flips
            f.seek(2 * size + 10)
            byte = f.read(1)
            f.seek(2 * size + 10)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert names(drain(box)) == [0, 1]
        assert box.corrupt_records == 3 and box.settled == box.added == 5 and not len(box)
        (aside,) = tmp_path.glob("*.corrupt")
        assert aside.stat().st_size == 3 * size  # kept, not dropped
        assert any("fail their checksum" in r.getMessage() for r in caplog.records)
    finally:
        box.close()


def test_a_segment_that_cannot_be_made_is_refused_then_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = DiskOutbox(tmp_path, max_bytes=1 << 20, fsync_interval_s=60)
    real_open = os.open

    def refusing(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".log"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(os, "open", refusing)
        with pytest.raises(OutboxError, match="Permission denied") as refused:
            box.append(payload(0))
        assert not isinstance(refused.value, OutboxFull) and box.alarm
        monkeypatch.setattr(os, "open", real_open)
        box.append(payload(1))
        assert not box.alarm  # the episode ended with the first event taken again
        assert names(drain(box)) == [1]
    finally:
        box.close()


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
