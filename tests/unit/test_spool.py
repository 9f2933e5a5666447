"""The spool on a real filesystem: durability, order, crashes, corruption, full disks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ingestd import spool as spool_mod
from ingestd.spool import DATABASE_FILE, Spool, SpoolBroken, SpoolFull
from tests.tiny_disk import needs_unshare, run_on_tiny_disk


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


def rows_on_disk(directory: Path) -> int:
    """The records in the spool's database, as another process sees them."""
    with contextlib.closing(sqlite3.connect(directory / DATABASE_FILE)) as db:
        count: int = db.execute("SELECT count(*) FROM records").fetchone()[0]
    return count


async def test_appends_replay_in_order_across_checkpoints_and_survive_reopen(
    tmp_path: Path,
) -> None:
    # 1 KiB of log per checkpoint: the log is copied into the database file many times over.
    s = await opened(tmp_path, segment_bytes=1024)
    payloads = [f"event-{i:04d}".encode() * 8 for i in range(200)]
    for p in payloads:
        await s.append(p)
    assert s.pending_records == 200
    await s.close()
    # A new process finds every record, in order.
    again = await opened(tmp_path, segment_bytes=1024)
    assert again.pending_records == 200
    assert await drain(again, limit=7) == payloads
    assert again.pending_records == 0
    await asyncio.sleep(0.05)  # the io loop removes what was committed
    assert again.size_bytes == 0
    await again.close()
    assert rows_on_disk(tmp_path) == 0  # committed records are gone from disk too


async def test_concurrent_appends_are_group_committed_and_all_durable(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await asyncio.gather(*(s.append(b"x%d" % i) for i in range(500)))
    assert s.pending_records == 500
    await s.close()
    again = await opened(tmp_path)
    assert sorted(await drain(again)) == sorted(b"x%d" % i for i in range(500))
    await again.close()


# A process that appends without end, from many producers, printing after each group the
# number of records acknowledged so far; it is SIGKILLed mid-append.
APPEND_FOREVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from ingestd.spool import Spool

    async def main(directory):
        s = Spool(directory, max_bytes=1 << 30, segment_bytes=64 * 1024)
        await s.open()
        n = 0
        while True:
            await asyncio.gather(*(s.append(b"%010d" % (n + i) + b"x" * 300) for i in range(64)))
            n += 64
            print(n, flush=True)

    asyncio.run(main(Path(sys.argv[1])))
    """
)


@pytest.mark.parametrize("torn_tail", [False, True])
async def test_kill_9_mid_append_loses_no_acknowledged_record(
    tmp_path: Path, torn_tail: bool
) -> None:
    script = tmp_path / "append.py"
    script.write_text(APPEND_FOREVER_SCRIPT)
    directory = tmp_path / "spool"
    child = subprocess.Popen(  # noqa: ASYNC220 - starting it does not wait for it
        [sys.executable, str(script), str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(spool_mod.__file__).parents[1])},
    )
    assert child.stdout is not None
    acked = 0
    deadline = time.monotonic() + 60
    while acked < 3000:  # a log of several checkpoints' worth, then the kill mid-append
        line = await asyncio.to_thread(child.stdout.readline)
        assert line and time.monotonic() < deadline, "the appending process stopped"
        acked = int(line)
    child.send_signal(signal.SIGKILL)
    with child.stdout:
        acked = max([acked, *(int(line) for line in child.stdout.read().split())])
    child.wait()
    log_file = directory / f"{DATABASE_FILE}-wal"
    if torn_tail:
        # What a crash in the middle of writing the log leaves: part of a frame at its end.
        assert log_file.exists()
        with log_file.open("ab") as f:
            f.write(os.urandom(1500))
    again = await opened(directory)
    replayed = [int(p[:10]) for p in await drain(again)]
    await again.close()
    assert replayed[:acked] == list(range(acked))  # every acknowledged record, once, in order
    assert replayed == list(range(len(replayed)))  # and nothing else but later appends, whole


async def test_a_record_the_disk_changed_is_set_aside_and_the_rest_replayed(
    tmp_path: Path,
) -> None:
    s = await opened(tmp_path, segment_bytes=1024)
    for i in range(100):
        await s.append(b"r%03d" % i + b"." * 40)
    await s.close()  # the log is copied into the database file
    database = tmp_path / DATABASE_FILE
    data = bytearray(database.read_bytes())
    at = data.index(b"r003" + b"." * 40) + 10  # a byte of the 4th record's payload
    data[at] ^= 0xFF
    database.write_bytes(bytes(data))
    again = await opened(tmp_path, segment_bytes=1024)
    replayed = await drain(again)
    assert again.corrupt_records == 1
    assert again.pending_records == 0
    await again.close()
    want = [b"r%03d" % i + b"." * 40 for i in range(100)]
    assert replayed == want[:3] + want[4:]  # the damaged record is never replayed, the rest is
    (aside,) = corrupt_files(tmp_path)
    assert aside.read_bytes()[:4] == b"r003"  # kept, not dropped
    assert rows_on_disk(tmp_path) == 0


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


@needs_unshare
def test_full_disk_is_a_clear_refusal_and_never_a_torn_record(tmp_path: Path) -> None:
    report = run_on_tiny_disk(tmp_path, DISK_FULL_SCRIPT, "{mnt}/spool", mount_options="size=1m")
    assert report["ok"] > 50  # it filled the disk...
    assert "the disk is full" in report["refused"]  # ...and said so clearly
    # Every acknowledged append is there after a reopen, and nothing else: no torn record.
    assert report["recovered"] == report["ok"]
    assert report["first"] == ["000000", "000001", "000002"]


async def test_appends_while_the_replay_commits_lose_nothing(tmp_path: Path) -> None:
    # Appends (and checkpoints) go on while the replay reads, commits and removes records:
    # every appended record is replayed exactly once.
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


def test_spool_dead_letter_keys_follow_the_content_not_the_place() -> None:
    from ingestd.daemon.batching import Item
    from ingestd.daemon.sources.spooled import SpoolSource
    from ingestd.spool import SpoolRecord

    def key(record: SpoolRecord) -> str | None:
        item = Item(None, None, None, record, record.payload, 0.0)  # type: ignore[arg-type]
        return SpoolSource.dead_letter_key(None, item)  # type: ignore[arg-type]

    same_place_a = SpoolRecord(1, b'{"type": "a"}')
    same_place_b = SpoolRecord(1, b'{"type": "b"}')
    assert key(same_place_a) != key(same_place_b)
    assert key(same_place_a) == key(SpoolRecord(99, b'{"type": "a"}'))


# The disk fills up at each point a record passes, and is then freed: the spool refuses
# (SpoolFull, temporary) and takes appends again, losing and tearing nothing. With a large
# checkpoint threshold the log fills the disk; with a checkpoint every 4 KiB of log, the copy
# into the database file does. The "filler" file stands for whatever else filled the disk;
# removing it frees it.
# The scenario is the spill bench's own full-disk child (ingestd/tools/bench/spill.py), run here
# on the SQLite spool: the bench measures the same steps that this test holds.
RECOVERY_SCRIPT = "import sys\nfrom ingestd.tools.bench.spill import main\nmain(sys.argv[1:])\n"


@needs_unshare
@pytest.mark.parametrize(
    ("mode", "mount_options", "segment_bytes", "filler_bytes"),
    [
        ("log", "size=1m", 1 << 20, 256 * 1024),
        ("checkpoint", "size=1m", 4096, 256 * 1024),
    ],
)
def test_a_full_disk_is_a_temporary_refusal_recovered_once_space_is_freed(
    tmp_path: Path, mode: str, mount_options: str, segment_bytes: int, filler_bytes: int
) -> None:
    report = run_on_tiny_disk(
        tmp_path,
        RECOVERY_SCRIPT,
        "child-fill",
        "sqlite",
        "{mnt}",
        str(segment_bytes),
        mount_options=mount_options,
        before=f"head -c {filler_bytes} /dev/zero > {{mnt}}/filler",
    )
    assert report["ok"] > 10  # records went in before the disk was full...
    assert report["kind"] == "SpoolFull", report  # ...then a clean, temporary refusal
    assert "the disk is full" in report["refused"]
    assert report["again"] == "SpoolFull"  # still full: refused again, not broken
    assert report["recovered_while_full"] == report["ok"]
    assert report["first"] == ["000000", "000001"]
    assert report["more"] > 10  # space freed: appends are taken again
    assert report["recovered"] == report["ok"] + report["more"]
    assert report["in_order"] is True  # every acknowledged record, once, in order


async def test_an_emptied_spool_gives_its_disk_room_back(tmp_path: Path) -> None:
    # A backlog of an outage (8 MB here) must not keep its room once it is replayed.
    s = await opened(tmp_path, max_bytes=1 << 30, segment_bytes=1 << 20)
    for _ in range(40):
        await asyncio.gather(*(s.append(b"x" * 400) for _ in range(500)))
    database = tmp_path / DATABASE_FILE
    assert database.stat().st_size > 8_000_000
    assert len(await drain(s)) == 20_000
    await s.close()
    assert database.stat().st_size < 100_000
