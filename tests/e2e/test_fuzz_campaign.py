"""The fuzz campaign, bounded: valid, mutated and random events through a real ``ingestd run``.

One run with a fixed seed and one with a fresh seed (printed; ``INGESTD_FUZZ_SEED`` replays
it). Each checks every invariant of the wire format and intake against the database, the
streams and the daemon's log; a failure prints the seed and the violating cases.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ingestd.fuzz.campaign import FuzzOptions, run_campaign
from ingestd.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]

FIXED_SEED = 20261203
CASES = int(os.environ.get("INGESTD_FUZZ_CASES", "2500"))


async def _campaign(settings: Settings, tmp_path: Path, seed: int) -> None:
    print(f"fuzz seed {seed} (replay: INGESTD_FUZZ_SEED={seed})")
    options = FuzzOptions(seed=seed, max_events=CASES, round_size=400, stall_s=20.0)
    report = await run_campaign(settings, options, tmp_path)
    print(report.format())
    assert report.ok, report.format(examples=8)


async def test_fuzz_campaign_fixed_seed(settings: Settings, tmp_path: Path) -> None:
    await _campaign(settings, tmp_path, FIXED_SEED)


async def test_fuzz_campaign_fresh_seed(settings: Settings, tmp_path: Path) -> None:
    seed = int(os.environ.get("INGESTD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    await _campaign(settings, tmp_path, seed)
