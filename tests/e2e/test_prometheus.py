"""A real Prometheus against a real ``ingestd run``: the shipped configuration, rules and panels.

promtool checks the shipped configuration and alert rules and runs the rules' unit tests. Then
Prometheus (Debian's package) starts with the shipped configuration, its ingestd job pointed at
an ``ingestd run`` subprocess of this test, scrapes it, and through its HTTP API: ``up`` is 1,
the core ``ingestd_*`` series exist, every PromQL expression of the Grafana dashboard evaluates
without error and returns data, the alert rules evaluate cleanly, and ``IngestdDown`` goes off
once ingestd is stopped.

Needs ``prometheus`` and ``promtool`` (``apt-get install prometheus``; scripts/services.sh
installs it where missing). Skipped, saying so, where absent; with CI=true it fails instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from ingestd.settings import Settings
from tests.daemons import StartDaemon
from tests.deploy_files import PROMETHEUS, dashboard, panels
from tests.feeds import publish_from_other_process
from tests.http_client import get
from tests.mixed_feed import MALFORMED
from tests.private_servers import free_port, terminate

pytestmark = [pytest.mark.e2e, pytest.mark.pg, pytest.mark.redis]

RULES = PROMETHEUS.parent / "alerts.yml"
RULE_TESTS = PROMETHEUS.parent / "alerts.test.yml"
# A bound on a hung or misconfigured Prometheus, not on speed (it scrapes every 5 s).
DEADLINE_S = 90.0
# The series an ingestd that has committed events exports (docs/operations.md, Metrics); the
# dashboard's core panels and the alert rules are built on them.
CORE_SERIES = {
    "ingestd_events_received_total",
    "ingestd_events_written_total",
    "ingestd_events_dead_lettered_total",
    "ingestd_rows_written_total",
    "ingestd_batches_total",
    "ingestd_batch_events_count",
    "ingestd_flush_duration_seconds_bucket",
    "ingestd_commit_latency_seconds_bucket",
    "ingestd_flush_retries_total",
    "ingestd_queue_depth",
    "ingestd_stream_pending",
    "ingestd_stream_lag",
    "ingestd_stream_acks_total",
    "ingestd_healthy",
    "ingestd_build_info",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        how = f"{name} is not installed: apt-get install prometheus (scripts/services.sh does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the Prometheus tests, but {how}", pytrace=False)
        pytest.skip(how)
    return path


@pytest.fixture
def promtool() -> str:
    """The promtool binary."""
    return _tool("promtool")


def test_promtool_accepts_the_shipped_config_and_rules(promtool: str) -> None:
    for args in (
        ["check", "config", str(PROMETHEUS)],  # also checks the rule files it names
        ["check", "rules", str(RULES)],
        ["test", "rules", RULE_TESTS.name],
    ):
        done = subprocess.run(
            [promtool, *args],
            cwd=PROMETHEUS.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
        assert "SUCCESS" in done.stdout + done.stderr, done.stdout


class Prometheus:
    """A Prometheus server of this test, and its HTTP API."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the ``data`` of a successful answer (else the test fails)."""
        query = urllib.parse.urlencode(params)
        resp = await get(self.port, f"/api/v1/{path}?{query}")
        body = json.loads(resp.text)
        assert resp.status == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll the async ``check`` until it returns something truthy (or fail, naming it)."""
        end = time.monotonic() + DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            got = await check()
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {DEADLINE_S:.0f} s")
            await asyncio.sleep(0.5)


def config_for(target: str) -> dict[str, Any]:
    """The shipped configuration with its ingestd job pointed at ``target``.

    Only where the targets come from changes (the shipped job discovers the compose service's
    replicas by DNS), and rules are evaluated every 2 s instead of 15 s so that the alert check
    does not wait; the scrape settings and the rule files are the shipped ones.
    """
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ingestd"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(PROMETHEUS.parent / f) for f in config["rule_files"]]
    config["global"]["evaluation_interval"] = "2s"
    return config


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Factory: a Prometheus on a free loopback port scraping ``target``; stopped at teardown."""
    binary = _tool("prometheus")
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(config_for(target)), encoding="utf-8")
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.console.templates=/nonexistent",
                    "--web.console.libraries=/nonexistent",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(proc, port, log)
        started.append(server)
        return server

    yield start
    for server in started:
        terminate(server.proc, timeout=30)


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every Prometheus target of the dashboard."""
    return [
        (p["title"], t["expr"]) for p in panels(dashboard()) for t in p["targets"] if "expr" in t
    ]


async def test_a_real_prometheus_scrapes_ingestd_and_evaluates_panels_and_rules(
    settings: Settings,
    start_daemon: StartDaemon,
    start_prometheus: Callable[[str], Prometheus],
    rclient: redis.Redis,
) -> None:
    publish_from_other_process(settings, 500, seed=5)
    for payload in MALFORMED:  # dead letters, so that their panel and rule have data too
        rclient.xadd("ingestd:events", {"event": payload})
    metrics_port = free_port()
    daemon = start_daemon(settings, INGESTD_METRICS_PORT=str(metrics_port))
    await daemon.wait_for_log("action=endpoint_listening")
    prom = start_prometheus(f"127.0.0.1:{metrics_port}")

    async def ready() -> bool:
        try:
            return (await get(prom.port, "/-/ready")).status == 200
        except OSError:
            return False

    await prom.until("Prometheus ready", ready)

    async def up() -> list[dict[str, Any]]:
        return [r for r in await prom.query('up{job="ingestd"}') if r["value"][1] == "1"]

    (target,) = await prom.until("a successful scrape of ingestd", up)
    assert target["metric"]["instance"] == f"127.0.0.1:{metrics_port}"

    # Every event has been committed and the next scrape saw it.
    async def all_acked() -> list[dict[str, Any]]:
        return await prom.query(f"ingestd_stream_acks_total >= {500 + len(MALFORMED)}")

    await prom.until("the acknowledgements of every event", all_acked)
    names = {
        r["metric"]["__name__"]
        for r in await prom.query('count by (__name__) ({__name__=~"ingestd_.+"})')
    }
    assert names >= CORE_SERIES, CORE_SERIES - names

    # rate() needs two samples inside its window: wait for a few scrapes after the events.
    async def scraped_enough() -> list[dict[str, Any]]:
        return await prom.query('count_over_time(up{job="ingestd"}[1m]) >= 4')

    await prom.until("four scrapes", scraped_enough)
    exprs = panel_exprs()
    assert len(exprs) >= 10
    empty = []
    for title, expr in exprs:
        # Grafana's $__rate_interval: at least four scrape intervals (5 s here).
        result = await prom.query(expr.replace("$__rate_interval", "1m"))
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, empty
    written = await prom.query('sum(ingestd_events_written_total{type="spread"})')
    assert float(written[0]["value"][1]) > 0

    # The alert rules: loaded from the shipped file, evaluated without error, none firing.
    async def evaluated() -> list[dict[str, Any]]:
        groups = (await prom.api("rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("2") for r in rules)
        return rules if rules and done else []

    rules = await prom.until("an evaluation of every rule", evaluated)
    shipped = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert {r["name"] for r in rules} == {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    # None firing but the trading state's: this feed has no live collector heartbeat and no fresh
    # USDKRW rate (its events are dated in the past), so ingestd rightly says HALTED; then the
    # rule must agree with the state ingestd exports.
    firing = {a["labels"]["alertname"] for a in (await prom.api("alerts"))["alerts"]}
    assert firing <= {"IngestdTradingHalted"}, firing
    halted = await prom.query('max(ingestd_trading_state{state="HALTED"}) == 1')
    assert bool(halted) == ("IngestdTradingHalted" in firing)

    # ingestd stops: its scrapes fail, and IngestdDown goes off (pending, then firing).
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0, daemon.log

    async def down_alert() -> list[dict[str, Any]]:
        alerts = (await prom.api("alerts"))["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "IngestdDown"]

    (alert,) = await prom.until("IngestdDown", down_alert)
    assert alert["state"] in {"pending", "firing"}
    assert alert["labels"]["instance"] == f"127.0.0.1:{metrics_port}"
