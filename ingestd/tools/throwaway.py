"""Throwaway PostgreSQL and Redis servers that a fault test or the soak may stop, crash and freeze.

Faults are injected on servers of our own, never on the machine's: each one lives in its own
directory, on its own loopback port, and is stopped and removed at the end. PostgreSQL comes from
the local binaries (``initdb``/``pg_ctl``, Debian's ``postgresql`` package), Redis from
``redis-server``; both run with the durability settings a deployment needs (``fsync`` and
``synchronous_commit`` on; Redis with AOF ``everysec`` and ``noeviction``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from ingestd import clients


class ServerUnavailable(RuntimeError):
    """The binaries to run a throwaway server are not on this machine."""


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_bindir() -> Path:
    """The newest local PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ServerUnavailable("no PostgreSQL server binaries (install Debian's postgresql)")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (the postmaster's backends and workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own: start, stop (fast or immediate), freeze, thaw."""

    def __init__(self, base: Path, *, port: int | None = None) -> None:
        self.base = base
        self.data = base / "pgdata"
        self.port = port or free_port()
        self.bindir = postgres_bindir()
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self._as_postgres = ["runuser", "-u", "postgres", "--"]

    def dsn(self, database: str = "postgres") -> str:
        """A trust-auth DSN for ``database``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(  # noqa: S603 - our own arguments: binaries, paths, ports
            [*self._as_postgres, *args],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace').strip()}"
            )

    def init(self) -> None:
        """Create the cluster (trust auth on loopback, UTF-8)."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.data, "postgres", "postgres")
            # The postgres user must be able to reach its directory through our private ones
            # (pytest's and mkdtemp's are 0700): let it traverse, not list.
            for parent in self.base.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self.init()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
            "-c max_connections=100 -c shared_buffers=64MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean), or ``immediate`` (a crash: recovery at restart)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again."""
        self.stop(mode)
        self.start()

    @property
    def postmaster_pid(self) -> int:
        """The pid of the running postmaster."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: a hung server that closes nothing."""
        pid = self.postmaster_pid
        for p in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT what ``freeze`` stopped."""
        pid = self.postmaster_pid
        for p in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)

    def running(self) -> bool:
        """True while the postmaster answers on its port."""
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def destroy(self) -> None:
        """Stop the server (whatever its state) and remove its files."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.thaw()
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class ThrowawayRedis:
    """A redis-server of our own with AOF: shutdown, crash (SIGKILL), freeze, thaw."""

    def __init__(self, base: Path, *, port: int | None = None) -> None:
        self.base = base
        self.port = port or free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable("no redis-server (install Debian's redis-server)")
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The URL of database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start (replaying the AOF if there is one) and wait for PONG."""
        self.base.mkdir(parents=True, exist_ok=True)
        log = (self.base / "redis.log").open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - our own arguments: binary, port, paths
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.base),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "noeviction",
                "--save",
                "",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        # No retries: this loop is the retry.
        client = clients.redis_sync(self.url(0), socket_timeout_s=1, retries=0)
        deadline = time.monotonic() + 30
        while True:
            try:
                # Loading the AOF answers LOADING errors until it is done.
                if client.ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.base}/redis.log)")
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """A clean shutdown: the AOF is flushed, nothing acknowledged is lost."""
        if self._proc is None:
            return
        with contextlib.suppress(redis.exceptions.ConnectionError):
            clients.redis_sync(self.url(0), socket_timeout_s=5, retries=0).shutdown(nosave=True)
        self._proc.wait(timeout=30)
        self._proc = None

    def crash(self) -> None:
        """SIGKILL: with ``appendfsync everysec`` up to a second of writes may be lost."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=30)
        self._proc = None

    def restart(self) -> None:
        """Clean stop, then start."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: a hung Redis that keeps its sockets open."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def destroy(self) -> None:
        """Kill the server and remove its files."""
        if self._proc is not None:
            self.thaw()
            self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None
        shutil.rmtree(self.base, ignore_errors=True)
