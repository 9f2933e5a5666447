"""Running ``ingestd`` commands as an operator does: in another process, with an environment of
their own in which no setting of the test run leaks (no ``INGESTD_*``, and no ``PG*`` where asked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ingestd.settings import Settings

# ``ingestd`` as this checkout's interpreter runs it.
INGESTD = (sys.executable, "-m", "ingestd.cli")

# The checkout: a child process given it as PYTHONPATH (or cwd) imports ``tests.*`` from here.
REPO_ROOT = Path(__file__).resolve().parents[1]


def operator_env(*, without_pg: bool = False, **values: str) -> dict[str, str]:
    """This process's environment without any ``INGESTD_`` variable (nor ``PG*`` ones with
    ``without_pg``: libpq would read them), plus ``values``."""
    dropped = ("INGESTD_", "PG") if without_pg else ("INGESTD_",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(values)
    return env


def servers_env(settings: Settings, **values: str) -> dict[str, str]:
    """``operator_env`` naming the database and Redis of ``settings`` as an operator does
    (``DATABASE_URL``, ``REDIS_URL``), plus ``values``."""
    env = operator_env(
        DATABASE_URL=settings.storage.postgres.dsn, REDIS_URL=settings.storage.redis.url
    )
    env.update(values)
    return env


def run_ingestd(
    env: Mapping[str, str] | None, *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``ingestd args`` to completion in another process (``env`` None: this process's
    environment), its output captured as text; the caller judges the exit code."""
    return subprocess.run(
        [*INGESTD, *args],
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
