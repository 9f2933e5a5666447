"""The spool on a real filesystem: durability, order, torn tails, corruption, full disks."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ingestd import spool as spool_mod
from ingestd.spool import HEADER, Spool, SpoolBroken, SpoolFull, encode_record, scan


async def opened(directory: Path, **kw: int) -> Spool:
    s = Spool(
        directory,
        max_bytes=kw.get("max_bytes", 1 << 20),
        segment_bytes=kw.get("segment_bytes", 4096),
    )
    await s.open()
    return s


async def drain(s: Spool, limit: int = 1000) -> list[bytes]:
    """Read everything, mark it committed, return the payloads in replay order."""
    out: list[bytes] = []
    while True:
        batch = await s.read_batch(limit)
        if not batch:
            return out
        out.extend(r.payload for r in batch)
        s.committed(batch)


def corrupt_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.corrupt"))


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.log"))


def test_scan_stops_at_a_torn_or_corrupt_record() -> None:
    a, b = encode_record(b"first"), encode_record(b"second")
    records, valid = scan(a + b)
    assert [p for _, p in records] == [b"first", b"second"]
    assert valid == len(a + b)
    records, valid = scan(a + b[:-1])  # cut short
    assert [p for _, p in records] == [b"first"] and valid == len(a)
    flipped = a + b[:-1] + bytes([b[-1] ^ 1])  # checksum fails
    records, valid = scan(flipped)
    assert [p for _, p in records] == [b"first"] and valid == len(a)


async def test_appends_replay_in_order_across_segments_and_survive_reopen(tmp_path: Path) -> None:
    s = await opened(tmp_path, segment_bytes=1024)
    payloads = [f"event-{i:04d}".encode() * 8 for i in range(200)]
    for p in payloads:
        await s.append(p)
    assert len(segments(tmp_path)) > 3  # rotated
    assert s.pending_records == 200
    await s.close()
    # A new process finds every record, in order.
    again = await opened(tmp_path, segment_bytes=1024)
    assert again.pending_records == 200
    assert await drain(again, limit=7) == payloads
    assert again.pending_records == 0
    await asyncio.sleep(0.05)  # the io loop truncates the active segment
    assert again.size_bytes == 0
    await again.close()
    # Fully committed segments are gone; the active one is empty.
    assert all(p.stat().st_size == 0 for p in segments(tmp_path))


async def test_concurrent_appends_are_group_committed_and_all_durable(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await asyncio.gather(*(s.append(b"x%d" % i) for i in range(500)))
    assert s.pending_records == 500
    await s.close()
    again = await opened(tmp_path)
    assert sorted(await drain(again)) == sorted(b"x%d" % i for i in range(500))
    await again.close()


async def test_torn_tail_is_cut_at_the_last_valid_record(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    for i in range(10):
        await s.append(b"rec%d" % i)
    await s.close()
    last = segments(tmp_path)[-1]
    # A crash in the middle of a write: half a record at the end.
    with last.open("ab") as f:
        f.write(encode_record(b"half-written record")[:11])
    size_before = last.stat().st_size
    again = await opened(tmp_path)
    assert again.pending_records == 10
    assert last.stat().st_size == size_before - 11
    assert await drain(again) == [b"rec%d" % i for i in range(10)]
    await again.close()


async def test_corruption_inside_a_sealed_segment_is_set_aside_not_replayed(
    tmp_path: Path,
) -> None:
    s = await opened(tmp_path, segment_bytes=1024)
    for i in range(100):
        await s.append(b"r%03d" % i + b"." * 40)
    await s.close()
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    records, _ = scan(bytes(data))
    bad_at = records[3][0] + HEADER.size  # first payload byte of the 4th record
    data[bad_at] ^= 0xFF
    first.write_bytes(bytes(data))
    again = await opened(tmp_path, segment_bytes=1024)
    replayed = await drain(again)
    await again.close()
    assert replayed[:3] == [b"r%03d" % i + b"." * 40 for i in range(3)]
    assert b"r003" + b"." * 40 not in replayed  # the damaged record is never replayed
    aside = first.with_suffix(".corrupt")
    assert aside.exists() and aside.stat().st_size > 0
    # Every record after the damaged segment is replayed.
    assert replayed[-1] == b"r099" + b"." * 40


async def test_max_bytes_refuses_and_keeps_nothing(tmp_path: Path) -> None:
    s = await opened(tmp_path, max_bytes=4096, segment_bytes=1024)
    accepted = 0
    with pytest.raises(SpoolFull, match="max_bytes"):
        for _ in range(1000):
            await s.append(b"y" * 100)
            accepted += 1
    assert 0 < accepted < 1000
    assert s.pending_records == accepted
    assert s.size_bytes <= 4096
    # Replaying frees room again.
    assert len(await drain(s)) == accepted
    await asyncio.sleep(0.05)
    await s.append(b"after")
    await s.close()


async def test_a_directory_is_used_by_one_process_only(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    other = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    with pytest.raises(SpoolBroken, match="in use by another"):
        await other.open()
    await s.close()


async def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(SpoolBroken, match="unusable"):
        await Spool(not_a_dir, max_bytes=1 << 20, segment_bytes=4096).open()


# A full disk, for real: a 64 KiB tmpfs in a private mount namespace (root here; skipped where
# mounts are not allowed). The script reports what it saw as JSON.
DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from ingestd.spool import Spool, SpoolFull

    async def main(directory):
        s = Spool(directory, max_bytes=1 << 30, segment_bytes=1 << 20)
        await s.open()
        ok, refused = 0, ""
        try:
            for i in range(100000):
                await s.append(b"%06d" % i + b"z" * 500)
                ok += 1
        except SpoolFull as exc:
            refused = str(exc)
        await s.close()
        again = Spool(directory, max_bytes=1 << 30, segment_bytes=1 << 20)
        recovered = await again.open()
        first = [r.payload[:6].decode() for r in await again.read_batch(3)]
        await again.close()
        print(json.dumps({"ok": ok, "refused": refused, "recovered": recovered,
                          "first": first}))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_full_disk_is_a_clear_refusal_and_never_a_torn_record(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SCRIPT)
    shell = (
        f"mount -t tmpfs -o size=64k ingestd-spool-test {mnt} && "
        f"exec {sys.executable} {script} {mnt}/spool"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(spool_mod.__file__).parents[1])},
    )
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] > 50  # it filled the disk...
    assert "No space left on device" in report["refused"]  # ...and said so clearly
    # Every acknowledged append is there after a reopen, and nothing else: no torn record.
    assert report["recovered"] == report["ok"]
    assert report["first"] == ["000000", "000001", "000002"]


def test_zeros_are_not_records() -> None:
    # A hole in a file (zeros) must not pass as empty records: crc32(b"") == 0.
    records, valid = scan(b"\x00" * 20 + encode_record(b"real"))
    assert records == [] and valid == 0


async def test_rotation_while_the_replay_commits_loses_no_segment(tmp_path: Path) -> None:
    # Appends rotate segments (a file made in a thread) while the replay commits and removes
    # segments in the loop: every appended record is replayed exactly once.
    s = await opened(tmp_path, segment_bytes=1024)
    appended = [b"rec-%05d" % i + b"." * 50 for i in range(3000)]
    replayed: list[bytes] = []

    async def produce() -> None:
        for i in range(0, len(appended), 25):
            await asyncio.gather(*(s.append(p) for p in appended[i : i + 25]))

    async def replay() -> None:
        while len(replayed) < len(appended):
            batch = await s.read_batch(40)
            if not batch:
                await asyncio.sleep(0)
                continue
            replayed.extend(r.payload for r in batch)
            s.committed(batch)

    await asyncio.wait_for(asyncio.gather(produce(), replay()), timeout=60)
    assert replayed == appended
    assert s.pending_records == 0
    await s.close()
    again = await opened(tmp_path, segment_bytes=1024)
    assert again.pending_records == 0  # nothing left behind, nothing replayed twice
    await again.close()


async def test_bytes_damaged_after_open_are_set_aside_and_the_rest_replayed(
    tmp_path: Path,
) -> None:
    s = await opened(tmp_path, segment_bytes=1024)
    for i in range(60):
        await s.append(b"x%03d" % i + b"-" * 40)
    first = segments(tmp_path)[0]
    await s.close()
    again = await opened(tmp_path, segment_bytes=1024)
    data = bytearray(first.read_bytes())
    data[HEADER.size] ^= 0xFF  # the first record's payload, damaged after it was recovered
    first.write_bytes(bytes(data))
    replayed = await drain(again)
    assert again.corrupt_records > 0
    assert len(replayed) == 60 - again.corrupt_records
    assert corrupt_files(tmp_path)  # kept, not dropped
    assert again.pending_records == 0
    await again.close()


def test_spool_dead_letter_keys_follow_the_content_not_the_place() -> None:
    from ingestd.batching import Item
    from ingestd.sources.spool import SpoolSource
    from ingestd.spool import SpoolRecord

    def key(record: SpoolRecord) -> str | None:
        item = Item(None, None, None, record, record.payload, 0.0)  # type: ignore[arg-type]
        return SpoolSource.dead_letter_key(None, item)  # type: ignore[arg-type]

    same_place_a = SpoolRecord(1, 0, b'{"type": "a"}')
    same_place_b = SpoolRecord(1, 0, b'{"type": "b"}')
    assert key(same_place_a) != key(same_place_b)
    assert key(same_place_a) == key(SpoolRecord(7, 99, b'{"type": "a"}'))


# The disk fills up at each point a record passes, and is then freed: the spool refuses
# (SpoolFull, temporary) and takes appends again, losing and tearing nothing. A tmpfs with few
# inodes fails the creation of a segment file (ENOSPC from open(2)); a small tmpfs fails the
# write itself. The "filler" file stands for whatever else filled the disk; removing it frees it.
RECOVERY_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from ingestd.spool import Spool, SpoolError, SpoolFull

    def make(directory):
        return Spool(directory, max_bytes=1 << 30, segment_bytes=SEGMENT, full_retry_s=0)

    async def fill(s, start):
        ok, refused = 0, None
        while refused is None:
            try:
                await s.append(b"%06d" % (start + ok) + b"z" * 300)
                ok += 1
            except SpoolError as exc:
                refused = exc
        return ok, refused

    async def main(mnt, mode):
        directory = mnt / "spool"
        s = make(directory)
        await s.open()
        ok, refused = await fill(s, 0)
        report = {"ok": ok, "kind": type(refused).__name__, "refused": str(refused)}
        try:
            await s.append(b"%06d" % ok + b"z" * 300)
            report["again"] = "accepted"
        except SpoolError as exc:
            report["again"] = type(exc).__name__
        await s.close()
        # A restart while the disk is still full: the backlog is there and replayable.
        s = make(directory)
        report["recovered_while_full"] = await s.open()
        first = await s.read_batch(2)
        report["first"] = [r.payload[:6].decode() for r in first]
        (mnt / "filler").unlink()  # space is freed
        more, _ = await fill(s, ok)
        report["more"] = more
        await s.close()
        again = make(directory)
        report["recovered"] = await again.open()
        payloads = []
        while batch := await again.read_batch(1000):
            payloads += [r.payload[:6].decode() for r in batch]
            again.committed(batch)
        report["in_order"] = payloads == ["%06d" % i for i in range(ok + more)]
        await again.close()
        print(json.dumps(report))

    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize(
    ("mode", "mount_options", "segment_bytes", "filler_bytes"),
    [
        # root, filler, spool dir, lock file and three segments: the 4th segment cannot be made
        ("segment_creation", "size=512k,nr_inodes=7", 4096, 0),
        ("write", "size=64k", 1 << 20, 32 * 1024),
    ],
)
def test_a_full_disk_is_a_temporary_refusal_recovered_once_space_is_freed(
    tmp_path: Path, mode: str, mount_options: str, segment_bytes: int, filler_bytes: int
) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(RECOVERY_SCRIPT.replace("SEGMENT", str(segment_bytes)))
    shell = (
        f"mount -t tmpfs -o {mount_options} ingestd-spool-test {mnt} && "
        f"head -c {filler_bytes} /dev/zero > {mnt}/filler && "
        f"exec {sys.executable} {script} {mnt} {mode}"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(spool_mod.__file__).parents[1])},
    )
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] > 10  # records went in before the disk was full...
    assert report["kind"] == "SpoolFull", report  # ...then a clean, temporary refusal
    assert "No space left on device" in report["refused"]
    assert report["again"] == "SpoolFull"  # still full: refused again, not broken
    assert report["recovered_while_full"] == report["ok"]
    assert report["first"] == ["000000", "000001"]
    assert report["more"] > 10  # space freed: appends are taken again
    assert report["recovered"] == report["ok"] + report["more"]
    assert report["in_order"] is True  # every acknowledged record, once, in order


async def test_an_fsync_that_finds_the_disk_full_is_a_temporary_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsync(2) can report ENOSPC (thin provisioning, NFS, quotas): no tmpfs does, so the spool's
    # fsync is made to fail once. The refused batch must not be replayed, the records before it
    # must be, and the next append goes on in a fresh segment.
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096, full_retry_s=0)
    await s.open()
    await s.append(b"before-1")
    await s.append(b"before-2")
    real_fsync = os.fsync
    failures = [OSError(28, "No space left on device")]

    def fsync_full_once(fd: int) -> None:
        if failures and os.fstat(fd).st_size > 0 and not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full_once)
    with pytest.raises(SpoolFull, match="No space left on device"):
        await s.append(b"refused")
    assert s.broken is None
    await s.append(b"after")
    monkeypatch.undo()
    await s.close()
    again = await opened(tmp_path)
    assert await drain(again) == [b"before-1", b"before-2", b"after"]
    await again.close()
