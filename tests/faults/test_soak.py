"""The soak command itself: a short run must inject faults and judge exactly-once by event id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def test_a_short_soak_injects_faults_and_finds_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd.cli",
            "bench",
            "--soak",
            "40",
            "--rate",
            "300",
            "--fault-every",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert "VERDICT: exactly once" in done.stdout
    # Most of the cycle ran (each fault lasts a few seconds itself), a replica kill included.
    assert len(report["faults"]) >= 5 and report["faults"]["replica SIGKILL"] >= 1
    assert report["tables"]["spreads"]["sent"] > 5_000
    for table in report["tables"].values():
        assert table["lost"] == table["duplicated"] == table["unexpected"] == 0
    assert report["dead_letters"]["found"] == report["dead_letters"]["expected"] > 0
    assert report["recoveries"]["claims"] > 0  # a SIGKILLed replica's entries were claimed
    assert set(report["exit_codes"].values()) == {0}
