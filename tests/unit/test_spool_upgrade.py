"""A spool or outbox directory of the earlier format (``spool-*.log`` segments) is refused at
open, never silently ignored: its records were accepted and this version cannot replay them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.producer.storage.outbox import DiskOutbox, OutboxBroken
from ingestd.spool import Spool, SpoolError

SEGMENT = "spool-000000000001.log"
# [u32 length][u32 CRC-32][payload]: one record as the earlier spool wrote it.
RECORD = b"\x05\x00\x00\x00\x00\x00\x00\x00hello"


def earlier_directory(path: Path) -> Path:
    path.mkdir()
    (path / SEGMENT).write_bytes(RECORD)
    return path


def test_the_spool_refuses_a_directory_with_earlier_segments(tmp_path: Path) -> None:
    directory = earlier_directory(tmp_path / "spool")
    spool = Spool(directory, max_bytes=1 << 20, segment_bytes=1 << 16)
    with pytest.raises(SpoolError, match=r"1 segment file\(s\) of the earlier spool format"):
        asyncio.run(spool.open())
    assert (directory / SEGMENT).read_bytes() == RECORD  # nothing read or removed
    # Emptied (the earlier version removes what it replayed): the spool opens.
    (directory / SEGMENT).unlink()
    spool = Spool(directory, max_bytes=1 << 20, segment_bytes=1 << 16)

    async def open_and_close() -> int:
        found = await spool.open()
        await spool.close()
        return found

    assert asyncio.run(open_and_close()) == 0


def test_the_outbox_refuses_a_directory_with_earlier_segments(tmp_path: Path) -> None:
    directory = earlier_directory(tmp_path / "outbox")
    with pytest.raises(OutboxBroken, match="earlier spool format"):
        DiskOutbox(directory, max_bytes=1 << 20, segment_bytes=1 << 16, fsync_interval_s=0)
    assert (directory / SEGMENT).read_bytes() == RECORD


def test_ingestd_run_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    directory = earlier_directory(tmp_path / "spool")
    config = tmp_path / "ingestd.yml"
    config.write_text(f"spool:\n  directory: {directory}\nmetrics_port: 0\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd.cli",
            "run",
            "--config",
            str(config),
            # Never reached: the spool is opened before any server is.
            "--database-url",
            "postgresql://postgres@127.0.0.1:1/none",
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "earlier spool format" in done.stderr and "Traceback" not in done.stderr
    assert (directory / SEGMENT).read_bytes() == RECORD
