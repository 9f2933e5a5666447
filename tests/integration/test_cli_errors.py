"""Configuration and connection errors through the real CLI: one redacted line, exit 2, never a
traceback, never a password, in every command."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.commands import operator_env, run_ingestd
from tests.conftest import PgServer, database_name

PASSWORD = "pw-" + os.urandom(6).hex()
REDIS_PASSWORD = "rpw-" + os.urandom(6).hex()

# Every command, with the arguments it needs to get past argparse.
COMMANDS: dict[str, list[str]] = {
    "run": ["run"],
    "migrate": ["migrate"],
    "health": ["health"],
    "stats": ["stats"],
    "simulate": ["simulate", "--count", "1"],
    "import-csv": ["import-csv", "{dir}", "--progress", "off"],
    "verify-csv": ["verify-csv", "{dir}"],
    "roles": ["roles"],
    "retention": ["retention"],
    "bench": ["bench", "--quick"],
    "halt": ["halt", "--reason", "a test"],
    "resume": ["resume"],
    "trading-state": ["trading-state"],
}
DATABASE_COMMANDS = ("run", "migrate", "stats", "import-csv", "verify-csv", "roles", "retention")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with(dsn: str, *, database: str, password: str) -> str:
    """``dsn`` with another database and a password for its user."""
    scheme, _, rest = dsn.partition("://")
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.partition(":")[0] or "postgres"
    host = hostpart.partition("/")[0]
    query = dsn.partition("?")[2]
    return f"{scheme}://{user}:{password}@{host}/{database}" + (f"?{query}" if query else "")


def cli(args: list[str], tmp_path: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = operator_env(without_pg=True, INGESTD_METRICS_PORT="0", **env_vars)
    return run_ingestd(env, *(a.format(dir=tmp_path) for a in args), cwd=tmp_path)


def assert_one_clean_line(done: subprocess.CompletedProcess[str], *secrets: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, no secret anywhere; returns the line."""
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    for secret in secrets:
        assert secret not in out, out
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


def _secret_env(tmp_path: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": f"postgresql://ingestd:{PASSWORD}@127.0.0.1:{_closed_port()}/ingestd",
        "REDIS_URL": f"redis://ingestd:{REDIS_PASSWORD}@127.0.0.1:{_closed_port()}/0",
    }


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_yaml_syntax_error_is_one_line_without_the_password(command: str, tmp_path: Path) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text(
        "storage:\n  postgres:\n    dsn: ${DATABASE_URL}\n  redis: {url: ${REDIS_URL}\n"
        "pipeline: [\n",
        encoding="utf-8",
    )
    done = cli(COMMANDS[command], tmp_path, INGESTD_CONFIG=str(config), **_secret_env(tmp_path))
    line = assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)
    assert "configuration error" in line and "ingestd.yml" in line and "line" in line


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("pipeline:\n  flush_timeout_s: .nan\n", "pipeline.flush_timeout_s"),
        ("mirror:\n  health_ttl_s: -1\n", "mirror.health_ttl_s"),
        ("fx:\n  ttl_seconds: 0\n", "fx.ttl_seconds"),
    ],
)
def test_an_impossible_number_is_one_line_naming_the_key(
    command: str, text: str, named: str, tmp_path: Path
) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text(text, encoding="utf-8")
    done = cli(COMMANDS[command], tmp_path, INGESTD_CONFIG=str(config), **_secret_env(tmp_path))
    assert named in assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)


@pytest.mark.parametrize("command", DATABASE_COMMANDS)
def test_a_malformed_database_url_is_one_line_without_the_password(
    command: str, tmp_path: Path
) -> None:
    # An unencoded '#' in the password: the URL parser sees a fragment and a port "xyz".
    secret = "pa" + PASSWORD
    env = _secret_env(tmp_path)
    env["DATABASE_URL"] = f"postgresql://ingestd:{secret}#frag@127.0.0.1:xyz/ingestd"
    done = cli(COMMANDS[command], tmp_path, **env)
    assert_one_clean_line(done, secret, PASSWORD, REDIS_PASSWORD)


@pytest.mark.parametrize("command", [c for c in DATABASE_COMMANDS if c != "run"])
async def test_a_database_that_refuses_is_one_line_without_the_password(
    command: str, tmp_path: Path, pg_server: PgServer
) -> None:
    # The server answers, but the database does not exist (the server may trust any password).
    env = _secret_env(tmp_path)
    env["DATABASE_URL"] = _with(
        pg_server.admin_dsn, database=f"nowhere_{uuid.uuid4().hex[:8]}", password=PASSWORD
    )
    done = cli(COMMANDS[command], tmp_path, **env)
    assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)


# trading-state is left out: for it an unreachable Redis is HALTED (exit 3), as for a trader.
@pytest.mark.parametrize("command", ["health", "simulate", "halt", "resume"])
def test_an_unreachable_redis_is_one_line_without_the_password(
    command: str, tmp_path: Path
) -> None:
    done = cli(COMMANDS[command], tmp_path, **_secret_env(tmp_path))
    assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)


def test_simulate_says_at_once_that_redis_does_not_answer(tmp_path: Path) -> None:
    # Its publisher rides through a Redis restart, retrying for about half a minute: at the start
    # that was half a minute of silence before the line (and no feed at all under run-local.sh).
    started = time.monotonic()
    done = cli(["simulate"], tmp_path, **_secret_env(tmp_path))
    elapsed = time.monotonic() - started
    assert "cannot reach Redis" in assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)
    assert elapsed < 10, f"took {elapsed:.1f}s"


@pytest.fixture
async def read_only_database(pg_server: PgServer) -> AsyncIterator[str]:
    """An empty database whose sessions are read-only (a hot standby behaves the same)."""
    url = await pg_server.create_empty("ingestd_ro")
    name = database_name(url)
    await pg_server.as_admin(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    yield _with(pg_server.admin_dsn, database=name, password=PASSWORD)
    await pg_server.drop(url)


async def test_migrate_on_a_read_only_database_is_one_line(
    read_only_database: str, tmp_path: Path
) -> None:
    done = cli(["migrate"], tmp_path, DATABASE_URL=read_only_database)
    line = assert_one_clean_line(done, PASSWORD)
    assert "read-only" in line


async def test_stats_with_an_unreachable_redis_is_one_line(db_dsn: str, tmp_path: Path) -> None:
    env = _secret_env(tmp_path)
    env["DATABASE_URL"] = db_dsn
    done = cli(["stats"], tmp_path, **env)
    # The database part is printed; the exit code and the line say the Redis part is missing.
    assert "cannot read Redis" in assert_one_clean_line(done, REDIS_PASSWORD)
    assert "spreads" in done.stdout


def test_an_unknown_log_level_is_one_line(tmp_path: Path) -> None:
    done = cli(["health", "--log-level", "LOUD"], tmp_path, **_secret_env(tmp_path))
    assert "log_level" in assert_one_clean_line(done, PASSWORD, REDIS_PASSWORD)
