"""compose.yaml, the Prometheus and Grafana files, the dashboard and the Dockerfile agree.

No Docker engine runs here: each file is parsed as its tool would read it and checked against
the others (service names, ports, datasource uids, roles, metric names), and every SQL query of
the dashboard runs, as the read-only role Grafana uses, against a migrated database with data.
"""

from __future__ import annotations

import collections
import datetime as dt
import fnmatch
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingestd import Service, errors, load_settings
from ingestd.commands.roles import READER_GROUP, Login, apply_roles
from ingestd.daemon import metrics
from ingestd.daemon.app import FINAL_ACK_TIMEOUT_S, SPOOL_CLOSE_TIMEOUT_S
from ingestd.daemon.gaps import GapSweeper
from ingestd.daemon.hedges import HalfHedgeMonitor
from ingestd.daemon.pipeline import TASK_CANCEL_TIMEOUT_S
from ingestd.producer.storage import CacheKeys
from ingestd.settings import HalfHedgeSettings, Settings
from ingestd.wire.events import utc_iso
from tests.deploy_files import (
    GRAFANA,
    PROMETHEUS,
    ROOT,
    compose,
    compose_variables,
    dashboard,
    dockerfile_stages,
    interpolate,
    panels,
    redis_acl_users,
    yaml_file,
)
from tests.mixed_feed import MALFORMED, mixed_feed, submit_all
from tests.private_servers import PrivatePostgres

SERVICES = compose()["services"]


def _env(service: str) -> dict[str, str]:
    env: dict[str, str] = SERVICES[service].get("environment", {})
    return env


def _depends(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# --- compose --------------------------------------------------------------------------------


def test_every_image_is_pinned() -> None:
    for name, svc in SERVICES.items():
        if "build" in svc:
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and re.search(r"[0-9]+\.[0-9]+", tag), f"{name}: {image} is not pinned"
        assert "latest" not in tag, name
    # The TimescaleDB the tests run against here , on PostgreSQL 15.
    assert SERVICES["timescaledb"]["image"] == "timescale/timescaledb:2.28.3-pg15"


def test_redis_keeps_the_stream() -> None:
    command = SERVICES["redis"]["command"]
    assert _flag(command, "--appendonly") == "yes"
    assert _flag(command, "--appendfsync") == "everysec"
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])
    assert _flag(command, "--user") == "default"  # the password-less default user is off
    assert command[command.index("default") + 1] == "off"


def test_ingestd_migrates_applies_roles_then_runs() -> None:
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert _depends("migrate") == {"timescaledb": "service_healthy"}
    assert SERVICES["roles"]["command"][0] == "roles"
    assert _depends("roles") == {"migrate": "service_completed_successfully"}
    deps = _depends("ingestd")
    assert deps["roles"] == "service_completed_successfully"
    assert deps["redis"] == "service_healthy"
    assert SERVICES["ingestd"]["command"] == ["run"]
    assert SERVICES["simulator"]["profiles"] == ["sim"]
    assert SERVICES["simulator"]["command"][0] == "simulate"
    for one_shot in ("migrate", "roles"):
        assert SERVICES[one_shot]["restart"] == "no"


def test_the_owner_migrates_and_the_writer_runs() -> None:
    db = SERVICES["timescaledb"]["environment"]["POSTGRES_DB"]
    owner_urls = [urlsplit(_env(s)["DATABASE_URL"]) for s in ("migrate", "roles")]
    for url in owner_urls:
        assert (url.username, url.hostname, url.port, url.path) == (
            "postgres",
            "timescaledb",
            5432,
            f"/{db}",
        )
    writer = _flag(SERVICES["roles"]["command"], "--writer-login")
    run_url = urlsplit(_env("ingestd")["DATABASE_URL"])
    assert run_url.username == writer != "postgres"
    assert run_url.password is None  # the password travels in PGPASSWORD, never in a URL
    assert run_url.path == f"/{db}"
    roles_env = _env("roles")
    assert _env("ingestd")["PGPASSWORD"] == roles_env["INGESTD_WRITER_PASSWORD"]
    assert (
        _env("migrate")["PGPASSWORD"] == SERVICES["timescaledb"]["environment"]["POSTGRES_PASSWORD"]
    )


def test_redis_users_match_their_clients() -> None:
    env = {name: f"pw-{name}" for name in compose_variables()}
    redis_url = urlsplit(interpolate(_env("ingestd")["REDIS_URL"], env))
    sim_url = urlsplit(interpolate(_env("simulator")["REDIS_URL"], env))
    command = interpolate(SERVICES["redis"]["command"], env)
    for url in (redis_url, sim_url):
        assert (url.hostname, url.port) == ("redis", 6379)
        assert url.username in command
        rules = command[command.index(url.username) :]
        assert f">{url.password}" in rules[:3], url.username


def test_the_producer_acl_covers_every_key_the_cache_writes() -> None:
    """compose.yaml's selector patterns and the keys RedisCacheStorage's script touches agree."""
    rules = redis_acl_users(dict.fromkeys(compose_variables(), "x"))["producer"]
    selectors = [r for r in rules if r.startswith("(")]
    # The cache keys' selector, and trading:state read only (a trader checks it).
    assert "(%R~trading:state +get)" in selectors
    selectors.remove("(%R~trading:state +get)")
    assert len(selectors) == 1
    tokens = selectors[0].strip("()").split()
    patterns = [t[1:] for t in tokens if t.startswith("~")]
    keys = CacheKeys()
    writes = [
        keys.fx("USDKRW", "1350.0", None, None),
        keys.spread("BTC", {"spread_pct": "0.8"}, None),
        *(keys.heartbeat(component, None, None) for component in ("collector", "paper", "live")),
    ]
    touched = {k for w in writes for k in keys.script_call(w)[0]}
    assert touched >= {"fx:usdkrw", "spreads:BTC:last", "health:collector"}
    for key in touched:
        assert any(fnmatch.fnmatchcase(key, p) for p in patterns), (key, patterns)
    for foreign in ("ingestd:events", "health:ingestd", "positions:BTC:open_count"):
        assert not any(fnmatch.fnmatchcase(foreign, p) for p in patterns), foreign
    assert {"+evalsha", "+script|load", "+get"} <= set(tokens)
    assert "+xadd" in rules and "~ingestd:events" in rules


def test_no_password_is_written_in_any_file() -> None:
    files = [ROOT / "compose.yaml", PROMETHEUS, *GRAFANA.rglob("*.yaml"), *GRAFANA.rglob("*.json")]
    files += [ROOT / "sql" / "roles.sql", ROOT / "Dockerfile"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        # ``KEY: value`` / ``KEY=value`` lines whose key names a password
        for m in re.finditer(r"(?im)^[\s-]*\"?([a-z_]*password[a-z_]*)\"?\s*[:=]\s*(\S.*)$", text):
            value = m.group(2).strip("\"'")
            assert value.startswith("$"), f"{path.name}: {m.group(0).strip()}"
        for m in re.finditer(r"[a-z]+://[^/\s:@]+:([^@\s]+)@", text):
            assert m.group(1).startswith("${"), f"{path.name}: {m.group(0)}"
    # Every secret is required (``:?``): compose refuses to start without it. Every other
    # variable has a default, so that an .env with the passwords alone starts the stack.
    raw = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    secrets = {v for v in compose_variables() if "PASSWORD" in v}
    assert len(secrets) == 6
    for name in secrets:
        assert f"${{{name}:?" in raw, name
        assert f"${{{name}:-" not in raw, name
        with pytest.raises(KeyError, match=name):
            interpolate(raw, {v: "x" for v in secrets if v != name})
    for name in compose_variables() - secrets:
        assert f"${{{name}:-" in raw and f"${{{name}:?" not in raw, name
    interpolate(raw, dict.fromkeys(secrets, "x"))


def _env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name.strip() == name and name not in out, line
            out[name] = value
    return out


def test_env_example_lists_every_variable_the_stack_reads() -> None:
    example = _env_example()
    assert set(example) == compose_variables()
    raw = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    for name, value in example.items():
        if "PASSWORD" in name:
            assert value == "", f"{name}: .env.example must not carry a password"
        else:  # the example shows the default compose uses
            assert f"${{{name}:-{value}}}" in raw, name
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_ingestd_image_is_named_once() -> None:
    runs_ingestd = [n for n, svc in SERVICES.items() if "build" in svc]
    assert set(runs_ingestd) == {"migrate", "roles", "ingestd", "simulator"}
    images = {SERVICES[n]["image"] for n in runs_ingestd}
    assert images == {"${INGESTD_IMAGE:-ingestd:local}"}
    assert {SERVICES[n]["build"] for n in runs_ingestd} == {"."}
    raw = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    assert raw.count("${INGESTD_IMAGE") == 1 and raw.count("build:") == 1  # the anchor


def test_ingestd_scales_to_several_replicas() -> None:
    """``docker compose up --scale ingestd=3``: nothing in the service is per-container."""
    svc = SERVICES["ingestd"]
    # Each replica's consumer name is its host name (the container's id): none is configured.
    assert "INGESTD_CONSUMER" not in _env("ingestd")
    assert Settings().stream.consumer == ""
    assert not {"container_name", "hostname"} & set(svc)
    # No fixed host port, which only one replica could bind.
    for port in svc.get("ports", []):
        host_ip, host_port, container_port = str(port).split(":")
        assert (host_ip, host_port, container_port) == ("127.0.0.1", "", "9464"), port


def test_published_ports_are_loopback_and_configurable() -> None:
    env = dict(_env_example())
    published: dict[str, list[str]] = {}
    for name, svc in SERVICES.items():
        for port in interpolate(svc.get("ports", []), env):
            host_ip, host_port, _ = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port}"
            published.setdefault(name, []).append(host_port)
    assert set(published) == {"redis", "ingestd", "prometheus", "grafana"}
    assert "timescaledb" not in published  # the database stays inside the network
    # Redis's host port is not the default one a machine's own Redis holds.
    assert published["redis"] == [env["REDIS_HOST_PORT"]] and env["REDIS_HOST_PORT"] != "6379"
    for name, var in (("redis", "REDIS_HOST_PORT"), ("prometheus", "PROMETHEUS_HOST_PORT")):
        moved = interpolate(SERVICES[name]["ports"], {**env, var: "12345"})
        assert moved[0].split(":")[1] == "12345", name


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2) where the client has the plugin; it parses without an engine."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    done = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=False
    )
    return [docker, "compose"] if done.returncode == 0 else None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("the Docker client here has no compose plugin (docker compose version fails)")
    env = {k: v for k, v in os.environ.items() if not k.endswith("PASSWORD")}
    env.update({k: f"pw-{k.lower()}" if "PASSWORD" in k else v for k, v in _env_example().items()})
    done = subprocess.run(
        [*cli, "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    assert resolved["migrate"]["image"] == resolved["ingestd"]["image"] == "ingestd:local"
    missing = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}
    refused = subprocess.run(
        [*cli, "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=missing,
        check=False,
    )
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


def test_stop_grace_period_outlasts_the_whole_shutdown() -> None:
    """Each shutdown stage has its own deadline; their sum stays under compose's SIGKILL."""
    s = Settings()
    redis_attempts = 3  # clients.redis_async: Retry(..., 2) = one try and two retries
    budget = (
        s.shutdown.grace_s  # stop intake + drain (Service.stop counts the stream's stop in it)
        + TASK_CANCEL_TIMEOUT_S  # the pipeline's abort, when the drain ran out of time
        + FINAL_ACK_TIMEOUT_S  # the final XACKs
        + TASK_CANCEL_TIMEOUT_S  # background tasks, cancelled together
        + SPOOL_CLOSE_TIMEOUT_S  # the spool's last append
        + s.storage.redis.mirror_socket_timeout_s * redis_attempts + 2  # final mirror flush
        + 2  # the operations endpoint's close
        + 5  # the pool's graceful close, then terminate()
    )  # fmt: skip
    grace = SERVICES["ingestd"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > budget, f"stop_grace_period {grace} <= {budget}s of shutdown"


# --- Prometheus and Grafana -------------------------------------------------------------------


def test_prometheus_scrapes_every_ingestd_replica() -> None:
    config = yaml_file(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ingestd"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # DNS discovery of the compose service: one target per replica (a static "ingestd:9464"
    # would scrape whichever replica the name resolves to).
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["ingestd"] and sd["type"] == "A"
    assert "ingestd" in SERVICES
    metrics_port = int(_env("ingestd").get("INGESTD_METRICS_PORT", Settings().metrics_port))
    assert sd["port"] == metrics_port
    assert any(str(p).endswith(f":{metrics_port}") for p in SERVICES["ingestd"]["ports"])
    prom = SERVICES["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    # The rule files, relative to the config file, are mounted beside it.
    assert config["rule_files"] == ["alerts.yml"]
    for rules in config["rule_files"]:
        assert (PROMETHEUS.parent / rules).is_file()
        mount = f"./deploy/prometheus/{rules}:/etc/prometheus/{rules}:ro"
        assert mount in prom["volumes"], mount


def test_alert_rules_use_exported_metrics() -> None:
    exported = _exported_names() | {"up"}
    # Counted by the quarantine of dead letters that cannot be stored (added alongside).
    exported.add("ingestd_quarantined_total")
    rules = [r for g in yaml_file(PROMETHEUS.parent / "alerts.yml")["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    for needed in (
        "IngestdDown",
        "IngestdIngestLag",
        "IngestdCommitsFailing",
        "IngestdDeadLetterRate",
        "IngestdQuarantine",
    ):
        assert needed in names, needed
    for rule in rules:
        expr = rule["expr"]
        used = set(re.findall(r"\b(?:ingestd_[a-z0-9_]+|up)\b(?=[{\[\s)=<>]|$)", expr))
        assert used and used <= exported, f"{rule['alert']}: {used - exported}"
        for inside in re.findall(r"\b(?:rate|increase)\((ingestd_[a-z0-9_]+)", expr):
            assert inside.endswith(("_total", "_bucket", "_sum", "_count")), f"rate of {inside}"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def _mounts(service: str) -> dict[str, str]:
    out = {}
    for volume in SERVICES[service]["volumes"]:
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _datasources() -> dict[str, dict[str, Any]]:
    doc = yaml_file(GRAFANA / "provisioning" / "datasources" / "ingestd.yaml")
    return {ds["uid"]: ds for ds in doc["datasources"]}


def test_grafana_provisioning_matches_compose() -> None:
    mounts = _mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml_file(GRAFANA / "provisioning" / "dashboards" / "ingestd.yaml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "./deploy/grafana/dashboards"
    assert (ROOT / mounts[dashboards_dir] / "ingestd.json").is_file()

    sources = _datasources()
    pg = next(ds for ds in sources.values() if ds["type"] == "grafana-postgresql-datasource")
    host, port = pg["url"].split(":")
    assert host in SERVICES and int(port) == 5432
    assert pg["jsonData"]["database"] == SERVICES[host]["environment"]["POSTGRES_DB"]
    assert pg["user"] == _flag(SERVICES["roles"]["command"], "--reader-login")
    # The reader's password: the same variable given to `ingestd roles` and to Grafana.
    var = pg["secureJsonData"]["password"].lstrip("$").strip("{}")
    assert _env("grafana")[var] == _env("roles")["INGESTD_READER_PASSWORD"]
    prom = next(ds for ds in sources.values() if ds["type"] == "prometheus")
    url = urlsplit(prom["url"])
    assert url.hostname in SERVICES and url.hostname == "prometheus"
    assert url.port == 9090
    assert any(p.endswith(":9090") for p in SERVICES["prometheus"]["ports"])
    assert _depends("grafana")["roles"] == "service_completed_successfully"


def _targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(dashboard()) for t in p["targets"]]


def test_dashboard_panels_use_provisioned_datasources() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    sources = _datasources()
    seen = set()
    for panel, target in _targets():
        for ref in (panel["datasource"], target["datasource"]):
            assert ref["uid"] in sources, f"{panel['title']}: unknown datasource {ref}"
            assert ref["type"] == sources[ref["uid"]]["type"], panel["title"]
        seen.add(target["datasource"]["uid"])
        assert ("rawSql" in target) == (
            sources[target["datasource"]["uid"]]["type"] != "prometheus"
        )
    assert seen == set(sources)
    titles = " | ".join(p["title"] for p in panels(dash)).lower()
    for needed in ("kimchi premium", "opportunities", "open positions", "daily pnl"):
        assert needed in titles, needed
    assert "ingest rate" in titles and "lag" in titles
    every = {id(p): p for p in [*dash["panels"], *panels(dash)]}.values()
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _exported_names() -> set[str]:
    class Queue:
        max_items = 1

        def __len__(self) -> int:
            return 0

    class Mirror:
        errors = 0
        pending = 0

        def __init__(self) -> None:
            self.stale_skipped: collections.Counter[str] = collections.Counter()

    class Stream:
        redelivered = 0
        claimed = 0

    m = metrics.Metrics()
    m.events_received["spread"] = m.events_written["spread"] = 1
    m.events_dead_lettered["invalid"] = m.rows_written["spreads"] = 1
    m.stream_pending = m.stream_lag = m.stream_length = 0
    # Sampled by the half-hedge check and the gap sweep: absent before their first rounds.
    m.half_hedges_open = m.producer_gaps_open = 0
    m.stale_spreads["BTC"] = 1  # (a labelled counter has no series before its first count)

    class Keeper:
        published_state = "ACTIVE"

        def __init__(self) -> None:
            self.transitions = collections.Counter({("HALTED", "ACTIVE"): 1})

    collector = metrics.MetricsCollector(
        m, queue=Queue(), mirror=Mirror(), stream=Stream(), healthy=lambda: True
    )
    # The trading state's families come from a collector of their own (registered by the
    # service when trading:state is on).
    trading = metrics.TradingStateCollector(Keeper(), ["ACTIVE", "REDUCING", "HALTED"])
    return metrics.names(collector.collect()) | metrics.names(trading.collect())


def test_promql_uses_exported_metrics_the_right_way() -> None:
    exported = _exported_names()
    exprs = [t["expr"] for _, t in _targets() if "expr" in t]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\bingestd_[a-z0-9_]+", expr))
        assert names, expr
        assert names <= exported, f"{expr}: not exported: {names - exported}"
        used |= names
        for inside in re.findall(r"\b(?:rate|increase)\((ingestd_[a-z0-9_]+)", expr):
            assert inside.endswith(("_total", "_bucket", "_sum", "_count")), f"rate of {inside}"
        for inside in re.findall(r"histogram_quantile\([^,]+,[^)]*?(ingestd_[a-z0-9_]+)", expr):
            assert inside.endswith("_bucket"), expr
    for needed in ("ingestd_events_received_total", "ingestd_stream_lag", "ingestd_stream_pending"):
        assert needed in used


# --- the dashboard's SQL, run as Grafana's read-only role -------------------------------------

_MACRO = re.compile(r"\$__([A-Za-z_]+)(?:\(([^()]*)\))?")


def grafana_sql(sql: str, start: dt.datetime, end: dt.datetime) -> tuple[str, list[Any]]:
    """Expand the Grafana macros the panels use, as bind parameters (unknown ones fail)."""
    args: list[Any] = []

    def param(value: Any, cast: str) -> str:
        args.append(value)
        return f"${len(args)}::{cast}"

    def sub(m: re.Match[str]) -> str:
        name, arg = m.group(1), m.group(2)
        if name == "timeFilter" and arg:
            return f"{arg} BETWEEN {param(start, 'timestamptz')} AND {param(end, 'timestamptz')}"
        if name == "interval_ms" and arg is None:
            return param(60_000, "bigint")
        raise AssertionError(f"macro $__{name} is not expanded by this test")

    out = _MACRO.sub(sub, sql)
    assert "$" not in re.sub(r"\$[0-9]+", "", out), f"a variable is left: {out}"
    return out, args


def _sequenced_heartbeat(seq: int) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "event_id": f"dash-hb-{seq}",
        "producer": "dash-collector",
        "component": "dash-collector",
        "seq": seq,
        "session": "dash-1",
        "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
    }


def _lonely_leg() -> dict[str, Any]:
    return {
        "type": "order",
        "event_id": "dash-ord-half",
        "producer": "live",
        "position_key": "dash_pos_half",
        "symbol": "BTC",
        "venue": "upbit",
        "side": "sell",
        "qty": "0.01000000",
        "price_theoretical": "140000000.00000000",
        "price_effective": "140000000.00000000",
        "leg_id": "dash_pos_half_leg_0",
        "timestamp": utc_iso(dt.datetime.now(dt.UTC)),
    }


@pytest.fixture
async def filled_db(
    private_database: tuple[PrivatePostgres, str], redis_url: str
) -> AsyncIterator[tuple[PrivatePostgres, str, str]]:
    """A database with a simulated day of trading in it, and a reader login."""
    cluster, name = private_database
    owner = await asyncpg.connect(cluster.admin_dsn(name))
    reader = f"grafana_{name[-10:]}"
    try:
        await apply_roles(owner, [Login(reader, READER_GROUP, "reader-pw")])
        settings = load_settings(
            None,
            environ={},
            overrides={
                "storage.postgres.dsn": cluster.admin_dsn(name),
                "storage.redis.url": redis_url,
                "metrics_port": 0,
                "pipeline.batch_max_age_ms": 20,
            },
        )
        async with Service(settings, stream_intake=False) as service:
            await submit_all(service, mixed_feed(3000))
            for payload in MALFORMED:
                with pytest.raises(errors.InvalidEvent):
                    await service.submit(payload)
            # A collector whose seq 2 never arrives: the open-gaps panel has a row to show.
            for seq in (0, 1, 3):
                await service.submit(_sequenced_heartbeat(seq))
            # A filled Upbit leg whose Binance leg never comes: a half hedge for its panel.
            await service.submit(_lonely_leg())
        pool = await asyncpg.create_pool(cluster.admin_dsn(name), min_size=1, max_size=2)
        try:
            swept = await GapSweeper(
                pool, metrics.Metrics(), grace_s=0.0, interval_s=1.0
            ).run_once()
            assert swept is not None and swept.opened == [("dash-collector", "dash-1", 2, 2)]
            cache = aioredis.Redis.from_url(redis_url)
            try:
                hedges = HalfHedgeMonitor(
                    pool, cache, metrics.Metrics(), settings=HalfHedgeSettings(after_s=0.0)
                )
                round_ = await hedges.run_once()
                assert round_ is not None and "dash_pos_half" in round_.raised
            finally:
                await cache.aclose()
        finally:
            await pool.close()
        yield cluster, name, reader
    finally:
        await owner.close()
        await cluster.drop_database_and_role(name, reader)


@pytest.mark.pg
@pytest.mark.redis
async def test_dashboard_sql_runs_as_the_reader(
    filled_db: tuple[PrivatePostgres, str, str],
) -> None:
    cluster, name, reader = filled_db
    conn = await asyncpg.connect(cluster.tls_dsn(reader, "reader-pw", name))
    try:
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        span = await conn.fetchrow(
            'SELECT min("timestamp") AS lo, max("timestamp") AS hi FROM spreads'
        )
        assert span is not None
        start, end = span["lo"] - dt.timedelta(hours=1), dt.datetime.now(dt.UTC)
        sql_targets = [(p, t) for p, t in _targets() if "rawSql" in t]
        assert len(sql_targets) >= 8
        for panel, target in sql_targets:
            sql, args = grafana_sql(target["rawSql"], start, end)
            rows = await conn.fetch(sql, *args)
            assert rows, f"{panel['title']}: no rows"
            columns = list(rows[0].keys())
            if target["format"] == "time_series":
                assert columns[0] == "time", panel["title"]
                assert all(isinstance(r["time"], dt.datetime) for r in rows), panel["title"]
                value_columns = [c for c in columns if c not in ("time", "metric")]
                assert value_columns, panel["title"]
    finally:
        await conn.close()


# --- the Dockerfile -------------------------------------------------------------------------


def _json_args(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args} is not exec form"
    return value


def test_dockerfile_runtime_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build and runtime"
    runtime = stages[-1]
    instructions = dict(runtime)  # the last of each instruction wins, as in Docker
    base = runtime[0][1]
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", base), base
    user = instructions["USER"].split(":")[0]
    assert user not in ("root", "0"), user
    healthcheck = instructions["HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    assert _json_args(command) == ["ingestd", "health"]
    assert "--timeout=" in options and "--interval=" in options
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert _json_args(instructions["ENTRYPOINT"]) == ["ingestd"]
    assert _json_args(instructions["CMD"]) == ["run"]
    assert "INGESTD_METRICS_HOST=0.0.0.0" in instructions["ENV"]
    assert instructions["EXPOSE"] == str(Settings().metrics_port)
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "--no-index" in runs and "[dev]" not in runs
    assert "apt-get" not in runs  # no compilers or build tools in the runtime image
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies == ["--from=build /wheels /wheels"]
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for path in (".git", ".venv", ".env"):
        assert path in ignored
