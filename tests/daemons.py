"""Running ``ingestd`` as a real subprocess, with real signals: the ``start_daemon`` fixture
(the e2e and fault suites' conftests bring it in) and the environment an operator gives it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestd.settings import Settings
from tests.commands import INGESTD, REPO_ROOT, run_ingestd, servers_env


class Daemon:
    """One ``ingestd run`` process and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def log(self) -> str:
        """Everything the process wrote to stderr/stdout so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int) -> None:
        """Send a real signal."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the exit code."""
        return self.proc.wait(timeout=timeout)

    async def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Wait until the log contains ``text`` (or the process died)."""
        end = time.monotonic() + timeout
        while text not in self.log:
            if self.proc.poll() is not None:
                raise AssertionError(f"ingestd exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not in log after {timeout}s:\n{self.log}")
            await asyncio.sleep(0.05)


# The type of the ``start_daemon`` fixture (below).
StartDaemon = Callable[..., Daemon]


def ingestd_env(settings: Settings, consumer: str = "e2e-1") -> dict[str, str]:
    """The environment an operator would give the container."""
    return servers_env(settings, INGESTD_CONSUMER=consumer, INGESTD_METRICS_PORT="0")


def run_cli(
    settings: Settings, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run an ``ingestd`` command to completion in another process."""
    return run_ingestd(ingestd_env(settings), *args, timeout=timeout)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[object]:
    """Factory: start ``ingestd run`` subprocesses; every one is killed at teardown."""
    procs: list[Daemon] = []
    config = tmp_path / "ingestd.yml"
    config.write_text(
        "stream:\n  block_ms: 200\n  claim_idle_ms: ${CLAIM_IDLE_MS:-30000}\n"
        "  claim_interval_s: ${CLAIM_INTERVAL_S:-15}\n"
        "pipeline:\n  batch_max_age_ms: 50\n"
        "shutdown:\n  grace_s: 15\n",
        encoding="utf-8",
    )

    def start(
        settings: Settings,
        consumer: str = "e2e-1",
        *,
        config_yaml: str | None = None,
        failpoints: str | None = None,
        **extra_env: str,
    ) -> Daemon:
        """Start ``ingestd run``; ``config_yaml`` replaces the default test configuration;
        ``failpoints`` (``"after_commit=3"``) arms them, through tests/failpoint_run.py."""
        log_path = tmp_path / f"ingestd-{consumer}-{len(procs)}.log"
        env = ingestd_env(settings, consumer)
        env["INGESTD_CONFIG"] = str(config)
        if config_yaml is not None:
            own = tmp_path / f"ingestd-{consumer}-{len(procs)}.yml"
            own.write_text(config_yaml, encoding="utf-8")
            env["INGESTD_CONFIG"] = str(own)
        env.update(extra_env)
        command = [*INGESTD, "run"]
        if failpoints is not None:
            command = [sys.executable, "-m", "tests.failpoint_run", failpoints, "run"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        daemon = Daemon(proc, log_path)
        procs.append(daemon)
        return daemon

    yield start
    for d in procs:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(timeout=10)
