"""``scripts/run-local.sh`` as a new user runs it, stopped the way a process manager, a CI job or
``kill`` stops it: a signal to the script alone. Nothing it started may outlive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.private_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run-local.sh"


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process on the machine (from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may hold spaces: the fields follow the last ")".
        ppid = int(stat.rpartition(")")[2].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    children = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie holds no port and runs nothing


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids this test started (the script and what it started): killed if a test leaves them."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.pg
@pytest.mark.redis
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_script_alone_stops_the_daemon_and_the_simulator(
    sig: signal.Signals, db_dsn: str, redis_url: str, tmp_path: Path, started: list[int]
) -> None:
    if not os.access(ROOT / ".venv" / "bin" / "ingestd", os.X_OK):
        pytest.skip("run-local.sh runs .venv/bin/ingestd of the checkout, which is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    # The servers the tests use, so that scripts/services.sh finds them and starts nothing.
    env.update({k: v for k, v in os.environ.items() if k.startswith("INGESTD_TEST_")})
    env.update(
        DATABASE_URL=db_dsn,
        REDIS_URL=redis_url,
        INGESTD_METRICS_PORT=str(port),
        INGESTD_CONSUMER="run-local-test",
        SIM_RATE="200",
    )
    log_path = tmp_path / "run-local.log"
    with log_path.open("wb") as log:
        script = subprocess.Popen(
            ["bash", str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    started.append(script.pid)

    def log_text() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")

    deadline = time.monotonic() + 90
    client = redis.Redis.from_url(redis_url)
    try:
        # Up: the daemon serves its metrics and has written what the simulator published.
        while not (_listening(port) and client.exists("spreads:BTC:last")):
            assert script.poll() is None, f"exited {script.returncode}:\n{log_text()}"
            assert time.monotonic() < deadline, f"not up after 90 s:\n{log_text()}"
            time.sleep(0.2)
    finally:
        client.close()
    children = _descendants(script.pid)
    started.extend(children)
    assert len(children) >= 2, children  # the daemon and the simulator at least

    script.send_signal(sig)
    status = script.wait(timeout=60)

    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid for pid in children if _alive(pid)}
    assert not left, f"left running: {left}\n{log_text()}"
    assert _port_free(port), f"port {port} still held\n{log_text()}"
    assert "draining" in log_text()  # the daemon stopped by its drain, not killed
    assert status == 0, log_text()
