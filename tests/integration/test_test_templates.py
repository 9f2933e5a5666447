"""The test suite's own housekeeping: each session drops the template database it created, and
only its own (other checkouts and xdist workers on the same server have templates of theirs)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import PgServer

ROOT = Path(__file__).resolve().parents[2]
# A quick test that clones the template (through the db_dsn fixture).
INNER_TEST = "tests/integration/test_csv_import.py::test_verify_missing_directory_and_no_files"


async def _databases(pg_server: PgServer) -> set[str]:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        return {r["datname"] for r in await admin.fetch("SELECT datname FROM pg_database")}
    finally:
        await admin.close()


@pytest.mark.pg
@pytest.mark.parametrize("xdist_worker", [None, "gw1"])
async def test_a_session_drops_its_template_and_leaves_another_sessions_alone(
    xdist_worker: str | None, pg_server: PgServer, tmp_path: Path
) -> None:
    mine = f"ingestd_tpl_probe_{uuid.uuid4().hex[:10]}"
    created = mine + (f"_{xdist_worker}" if xdist_worker else "")
    other = f"ingestd_tpl_other_{uuid.uuid4().hex[:10]}"  # as if another checkout's session ran
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {other}")
    finally:
        await admin.close()
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["INGESTD_TEST_TEMPLATE"] = mine
    env["INGESTD_TEST_DATABASE_URL"] = pg_server.admin_dsn
    if xdist_worker:
        env["PYTEST_XDIST_WORKER"] = xdist_worker
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--basetemp",
                str(tmp_path / "inner"),
                INNER_TEST,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 passed" in done.stdout
        left = await _databases(pg_server)
        assert created not in left and mine not in left
        assert other in left
    finally:
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            for name in (other, created, mine):
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


def test_sessions_without_a_template_name_each_name_their_own() -> None:
    """Without INGESTD_TEST_TEMPLATE two sessions get two templates (a fixed default let one
    checkout's run drop the template another run was cloning from: "template database ... does
    not exist" and schema drift across a whole CI run)."""
    env = {k: v for k, v in os.environ.items() if k != "INGESTD_TEST_TEMPLATE"}
    names = [
        subprocess.run(
            [sys.executable, "-c", "import tests.conftest as c; print(c.TEMPLATE)"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert names[0] != names[1], names
    assert all(n.startswith("ingestd_tpl_") for n in names), names
