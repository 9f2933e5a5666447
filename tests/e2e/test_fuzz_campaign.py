"""The fuzz campaign, bounded: valid, mutated and random events through a real ``ingestd run``.

One run with a fixed seed and one with a fresh seed (printed; ``INGESTD_FUZZ_SEED`` replays
it). Each checks every invariant of the wire format and intake against the database, the
streams and the daemon's log; a failure prints the seed and the violating cases.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis

from ingestd.settings import Settings
from ingestd.tools.fuzz.campaign import FuzzOptions, run_campaign
from tests.daemons import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]

FIXED_SEED = 20261203
CASES = int(os.environ.get("INGESTD_FUZZ_CASES", "2500"))


async def _campaign(
    settings: Settings, tmp_path: Path, seed: int, log_format: str | None = None
) -> None:
    print(f"fuzz seed {seed} (replay: INGESTD_FUZZ_SEED={seed})")
    options = FuzzOptions(
        seed=seed, max_events=CASES, round_size=400, stall_s=20.0, log_format=log_format
    )
    report = await run_campaign(settings, options, tmp_path)
    print(report.format())
    assert report.ok, report.format(examples=8)


async def test_fuzz_campaign_fixed_seed(settings: Settings, tmp_path: Path) -> None:
    await _campaign(settings, tmp_path, FIXED_SEED, "plain")


async def test_fuzz_campaign_fresh_seed(settings: Settings, tmp_path: Path) -> None:
    seed = int(os.environ.get("INGESTD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    await _campaign(settings, tmp_path, seed)


async def test_bench_fuzz_command_runs_on_scratch_resources(
    settings: Settings, rclient: redis.Redis, db: asyncpg.Connection, tmp_path: Path
) -> None:
    scratch = f"ingestd_fuzz_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "fuzz.json"
    done = run_cli(
        settings,
        "bench",
        "--fuzz",
        "0",
        "--events",
        "150",
        "--seed",
        "5",
        "--scratch-database",
        scratch,
        "--json",
        str(out),
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert done.stdout.startswith("fuzz: seed 5, "), done.stdout[:500]
    # Exit 0 exactly when every invariant held.
    assert (done.returncode == 0) == ("VERDICT: every invariant held" in done.stdout)
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["cases"] >= 150
    assert sum(figures["violations"].values()) == len(figures["violation_details"])
    # The scratch database and keys are gone; the test's own database was not touched.
    assert not await db.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", scratch)
    assert not list(rclient.scan_iter(match="ingestd:fuzz:*"))
    assert await db.fetchval("SELECT count(*) FROM spreads") == 0
