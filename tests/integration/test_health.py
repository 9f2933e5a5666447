"""``ingestd health``: fresh, stale and missing heartbeats, named components, the key prefix."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
import redis

from ingestd.commands.health import check_health, heartbeat_age
from ingestd.settings import Settings, load_settings
from ingestd.wire.events import utc_iso
from tests.commands import operator_env, run_ingestd
from tests.private_servers import free_port

pytestmark = [pytest.mark.redis]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Only Redis is needed here (no database is created)."""
    return load_settings(None, environ={}, overrides={"storage.redis.url": redis_url})


def beat(client: redis.Redis, component: str, age_s: float, prefix: str = "") -> None:
    """A heartbeat written ``age_s`` seconds ago, as the mirror writes it."""
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    client.set(f"{prefix}health:{component}", utc_iso(moment), ex=10)


async def test_fresh_heartbeat_is_healthy(settings: Settings, rclient: redis.Redis) -> None:
    beat(rclient, "ingestd", 1)
    ok, reason = await check_health(settings, ["ingestd"], 10)
    assert ok, reason
    assert reason.startswith("healthy: ingestd 1.")


async def test_missing_and_stale_heartbeats_are_unhealthy(
    settings: Settings, rclient: redis.Redis
) -> None:
    ok, reason = await check_health(settings, ["ingestd"], 10)
    assert (ok, reason) == (False, "unhealthy: ingestd: no heartbeat")
    beat(rclient, "ingestd", 30)
    ok, reason = await check_health(settings, ["ingestd"], 10)
    assert not ok
    assert reason.startswith("unhealthy: ingestd: last heartbeat 30.")
    assert reason.endswith("s ago (> 10s)")
    ok, _ = await check_health(settings, ["ingestd"], 60)  # --max-age
    assert ok


@pytest.mark.parametrize(
    ("ages", "want_ok", "fragments"),
    [
        ({"ingestd": 1, "collector": 2, "paper": 3, "live": 4}, True, ["collector 2."]),
        ({"ingestd": 1, "collector": 2, "paper": 3}, False, ["live: no heartbeat"]),
        (
            {"ingestd": 1, "collector": 50, "paper": 3, "live": 4},
            False,
            ["collector: last heartbeat 50."],
        ),
        ({"collector": 1, "paper": 1, "live": 1}, False, ["ingestd: no heartbeat"]),
        ({"ingestd": 99, "live": 99}, False, ["ingestd: last", "collector: no", "paper: no"]),
    ],
)
async def test_named_components(
    settings: Settings,
    rclient: redis.Redis,
    ages: dict[str, float],
    want_ok: bool,
    fragments: list[str],
) -> None:
    for component, age in ages.items():
        beat(rclient, component, age)
    ok, reason = await check_health(settings, ["ingestd", "collector", "paper", "live"], 10)
    assert ok is want_ok, reason
    assert "\n" not in reason
    for fragment in fragments:
        assert fragment in reason


async def test_key_prefix(settings: Settings, rclient: redis.Redis) -> None:
    prefixed = settings.replace(**{"storage.redis.key_prefix": "desk1:"})
    beat(rclient, "ingestd", 1)  # another deployment's (unprefixed) key does not count
    ok, reason = await check_health(prefixed, ["ingestd"], 10)
    assert (ok, reason) == (False, "unhealthy: ingestd: no heartbeat")
    beat(rclient, "ingestd", 1, prefix="desk1:")
    ok, _ = await check_health(prefixed, ["ingestd"], 10)
    assert ok


async def test_unreadable_values_count_as_missing(settings: Settings, rclient: redis.Redis) -> None:
    rclient.set("health:ingestd", "not a time")
    rclient.set("health:collector", "2025-11-15T03:40:15")  # naive
    ok, reason = await check_health(settings, ["ingestd", "collector"], 10)
    assert not ok
    assert reason == "unhealthy: ingestd: no heartbeat; collector: no heartbeat"
    now = dt.datetime.now(dt.UTC)
    assert heartbeat_age(None, now) is None
    assert heartbeat_age(utc_iso(now).encode(), now) == 0


async def test_unreachable_redis_is_unhealthy_and_redacted(settings: Settings) -> None:
    dead = settings.replace(**{"storage.redis.url": f"redis://:hunter2@127.0.0.1:{free_port()}/0"})
    ok, reason = await check_health(dead, ["ingestd"], 10)
    assert not ok
    assert reason.startswith("unhealthy: cannot read Redis at redis://:***@127.0.0.1:")
    assert "hunter2" not in reason


def run_health(
    settings: Settings, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command, as the container HEALTHCHECK runs it."""
    env = operator_env(REDIS_URL=settings.storage.redis.url)
    env["INGESTD_CONSUMER"] = "desk1-a"  # the replica whose container runs the check
    if config is not None:
        env["INGESTD_CONFIG"] = str(config)
    return run_ingestd(env, "health", *args, timeout=60)


def test_health_command_exit_codes(
    settings: Settings, rclient: redis.Redis, tmp_path: Path
) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text('storage:\n  redis:\n    key_prefix: "desk1:"\n', encoding="utf-8")
    missing = run_health(settings, config=config)
    assert missing.returncode == 1
    assert missing.stderr == "unhealthy: ingestd:desk1-a: no heartbeat\n"
    beat(rclient, "ingestd", 1, prefix="desk1:")  # some other replica is alive...
    assert run_health(settings, config=config).returncode == 1  # ...which is not this one
    assert run_health(settings, "--any-replica", config=config).returncode == 0
    beat(rclient, "ingestd:desk1-a", 1, prefix="desk1:")
    beat(rclient, "collector", 25, prefix="desk1:")
    fresh = run_health(settings, config=config)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.startswith("healthy: ingestd")
    stale = run_health(settings, "--component", "collector", config=config)
    assert stale.returncode == 1
    # 25 s old when written, a little older by the time the command reads it
    assert re.search(r"collector: last heartbeat 2[5-9]\.[0-9]s ago \(> 10s\)", stale.stderr)
    assert stale.stderr.count("\n") == 1
    assert (
        run_health(
            settings, "--component", "collector", "--max-age", "60", config=config
        ).returncode
        == 0
    )
    assert run_health(settings).returncode == 1  # without the prefix: nothing there
