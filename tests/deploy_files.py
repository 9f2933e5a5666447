"""Reading the deployment files (compose.yaml, deploy/, Dockerfile) the way their tools would."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ingestd.json"

# Compose's interpolation: ${VAR}, ${VAR:?message}, ${VAR:-default}; $$ is a literal dollar.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What compose makes of ``value`` with ``env`` (a missing ``:?`` variable is an error)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def compose() -> dict[str, Any]:
    """compose.yaml as YAML (not interpolated), with its x- anchors resolved by the parser."""
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def compose_variables() -> set[str]:
    """Every variable compose.yaml takes from the environment."""
    return {m.group(1) for m in _VAR.finditer(COMPOSE.read_text(encoding="utf-8"))}


def redis_acl_users(env: dict[str, str]) -> dict[str, list[str]]:
    """The ``--user NAME RULES...`` of the compose Redis, interpolated with ``env``."""
    command: list[str] = interpolate(compose()["services"]["redis"]["command"], env)
    users: dict[str, list[str]] = {}
    i = 0
    while i < len(command):
        if command[i] == "--user":
            name = command[i + 1]
            j = i + 2
            while j < len(command) and not command[j].startswith("--"):
                j += 1
            users[name] = command[i + 2 : j]
            i = j
        else:
            i += 1
    return users


def dashboard() -> dict[str, Any]:
    """The provisioned dashboard."""
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel (rows' children included), rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def yaml_file(path: Path) -> dict[str, Any]:
    """A YAML file as a mapping."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return doc


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args.strip()))
    return stages
