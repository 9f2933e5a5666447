"""``ingestd import-csv`` / ``verify-csv`` as real processes: SIGKILL mid-file, a real terminal."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import asyncpg
import pytest

from ingestd.settings import Settings
from tests.daemons import ingestd_env, run_cli
from tests.samples import SPREAD_HEADER, spread_rows, write_csv

pytestmark = [pytest.mark.e2e, pytest.mark.pg]


async def test_import_killed_mid_file_resumes_and_lands_every_row_once(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    total = 200_000
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(total))
    log = (tmp_path / "import.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the process runs while the test polls the database
        [sys.executable, "-m", "ingestd.cli", "import-csv", str(tmp_path), "--batch-rows", "2000"],
        env=ingestd_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        end = time.monotonic() + 60
        while int(await db.fetchval("SELECT count(*) FROM spreads")) < 4000:
            assert proc.poll() is None, "the import ended before it could be interrupted"
            assert time.monotonic() < end, "no batch committed within 60 s"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    landed = int(await db.fetchval("SELECT count(*) FROM spreads"))
    assert 4000 <= landed < total  # interrupted mid-file, after some commits
    checkpoint = await db.fetchrow("SELECT line, rows FROM csv_import_checkpoints")
    assert checkpoint is not None and checkpoint["rows"] <= landed

    result = run_cli(settings, "import-csv", str(tmp_path), "--batch-rows", "2000")
    assert result.returncode == 0, result.stderr
    assert f"resuming at line {checkpoint['line'] + 1}" in result.stderr
    assert int(await db.fetchval("SELECT count(*) FROM spreads")) == total
    assert int(await db.fetchval("SELECT count(DISTINCT event_id) FROM spreads")) == total
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    want = sum(D(r.split(",")[1]) for r in spread_rows(total))
    assert await db.fetchval("SELECT sum(upbit_price) FROM spreads") == want

    verify = run_cli(settings, "verify-csv", str(tmp_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    await db.execute("UPDATE spreads SET spread_pct = 0 WHERE event_id = 'csv:spreads.csv:77'")
    verify = run_cli(settings, "verify-csv", str(tmp_path))
    assert verify.returncode == 1
    assert "MISMATCH" in verify.stdout
    assert "spreads.csv:77: differs in spread_pct" in verify.stdout


def test_progress_bar_on_a_terminal(settings: Settings, tmp_path: Path) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(20_000))
    write_csv(tmp_path / "fx_rates.csv", "pair,rate,source,timestamp", ["USDKRW,1,x,bad"])
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestd.cli", "import-csv", str(tmp_path)],
        env=ingestd_env(settings),
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen = b""
    end = time.monotonic() + 120
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 1  # the bad FX row
    text = screen.decode()
    assert "\x1b[" in text  # drawn for a terminal (cursor moves, colours)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    assert re.search(r"^spreads\.csv ━+ 100% 20,000 rows .* rows/s ETA", shown, re.M), shown
    # The bad row is a line of its own, not mixed into the bar.
    assert re.search(r"^fx_rates.csv:2: timestamp: 'bad' is not an RFC 3339 time", shown, re.M), (
        shown
    )
    assert re.search(r"^spreads +spreads\.csv +imported", stdout, re.M)  # summary: stdout


def test_plain_progress_lines_when_not_a_terminal(settings: Settings, tmp_path: Path) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(3000))
    result = run_cli(settings, "import-csv", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    assert "import-csv: spreads.csv 100%  3,000 rows" in result.stderr
    assert re.search(r"^spreads +spreads\.csv +imported +3,000 +3,000 ", result.stdout, re.M)
    again = run_cli(settings, "import-csv", str(tmp_path))
    assert again.returncode == 0 and "up to date" in again.stdout


def test_import_without_a_database_exits_2_and_says_so(settings: Settings, tmp_path: Path) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(3))
    broken = settings.replace(
        **{"storage.postgres.dsn": "postgresql://postgres:secret@127.0.0.1:1/none"}
    )
    result = run_cli(broken, "import-csv", str(tmp_path))
    assert result.returncode == 2
    assert "cannot connect to postgresql://postgres:***@127.0.0.1:1/none" in result.stderr
    assert "secret" not in result.stderr
