"""``ingestd run`` replicas as real subprocesses, on the bench's scratch database and keys."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import yaml

from ingestd.settings import Settings
from ingestd.tools.bench.scratch import BenchFailed

STARTED_LINE: Final = "ingestd started"
_KIB: Final = 1024


def replica_config(settings: Settings, **stream: Any) -> dict[str, Any]:
    """The YAML of a replica: the bench's own settings (minus secrets, which go in the env)."""
    postgres = dataclasses.asdict(settings.storage.postgres)
    del postgres["dsn"]
    redis = dataclasses.asdict(settings.storage.redis)
    del redis["url"]
    stream_section = {**dataclasses.asdict(settings.stream), **stream}
    del stream_section["consumer"]
    return {
        "storage": {"postgres": postgres, "redis": redis},
        "stream": stream_section,
        "pipeline": dataclasses.asdict(settings.pipeline),
        "fx": dataclasses.asdict(settings.fx),
        "mirror": dataclasses.asdict(settings.mirror),
        "maintenance": {"enabled": False},
        "shutdown": dataclasses.asdict(settings.shutdown),
        "log_level": "INFO",
        "log_format": "plain",
    }


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class Replica:
    """One ``ingestd run`` process with its own consumer name and log file."""

    def __init__(self, name: str, config: Path, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.env = {**env, "INGESTD_CONFIG": str(config), "INGESTD_CONSUMER": name}
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kib: int | None = None

    def start(self) -> None:
        """Start the process."""
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd.cli", "run"],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    @property
    def log_text(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_started(self, timeout_s: float) -> None:
        """Wait for its 'ingestd started' line; BenchFailed if it exits or takes too long."""
        assert self.proc is not None
        end = time.monotonic() + timeout_s
        while STARTED_LINE not in self.log_text:
            if self.proc.poll() is not None:
                raise BenchFailed(f"replica {self.name} exited {self.proc.returncode}: {self.tail}")
            if time.monotonic() > end:
                raise BenchFailed(f"replica {self.name} did not start in {timeout_s:.0f}s")
            await asyncio.sleep(0.05)

    def sample_rss_kib(self) -> int | None:
        """Its resident set now (and remember the peak the kernel reports)."""
        assert self.proc is not None
        hwm = proc_status_kib(self.proc.pid, "VmHWM")
        if hwm is not None:
            self.peak_rss_kib = max(self.peak_rss_kib or 0, hwm)
        return proc_status_kib(self.proc.pid, "VmRSS")

    @property
    def tail(self) -> str:
        """The end of its log, for error messages."""
        return self.log_text[-3000:]

    async def stop(self, timeout_s: float) -> int:
        """SIGTERM, wait for its drain, and return its exit code (SIGKILL past the timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.sample_rss_kib()
            self.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > end:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
                raise BenchFailed(f"replica {self.name} did not drain in {timeout_s:.0f}s")
            self.sample_rss_kib()
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL if still running (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def replica_env(settings: Settings) -> dict[str, str]:
    """What a replica needs in its environment: the DSN and URL, no metrics port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INGESTD_") and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    env.update(
        DATABASE_URL=settings.storage.postgres.dsn,
        REDIS_URL=settings.storage.redis.url,
        INGESTD_METRICS_PORT="0",
    )
    return env


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a replica's YAML."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def kib_to_mib(kib: int | None) -> float | None:
    """KiB to MiB."""
    return None if kib is None else kib / _KIB
