"""The layer contract (``[tool.importlinter]`` in pyproject.toml) holds, and names every module.

The contracts: the wire format and the shared modules import nothing of the daemon, the producer
library, the commands or the tooling; the producer library imports only the wire format and the
shared modules; the daemon imports neither the producer library nor commands nor tooling; nothing
imports the command line. ``lint-imports`` checks them on the real import graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ingestd"


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_lint_imports_keeps_every_contract() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in done.stdout


def test_every_module_is_placed_in_a_layer() -> None:
    # A new top-level module or package has to be put in a layer (named by a contract), or no
    # contract would hold it; the layers' packages hold their own modules.
    named: set[str] = set()
    for contract in contracts():
        for field in ("source_modules", "forbidden_modules", "protected_modules"):
            value = contract.get(field, [])
            assert isinstance(value, list)
            named.update(str(module) for module in value)
    top_level = {
        f"ingestd.{path.stem if path.is_file() else path.name}"
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.stem not in {"__init__", "__main__"})
        or (path / "__init__.py").exists()
    }
    assert sorted(top_level - named) == []
    # The layers a newcomer sees are packages, not a flat list.
    assert {"ingestd.wire", "ingestd.daemon", "ingestd.producer", "ingestd.commands"} <= top_level
    assert {"ingestd.tools"} <= top_level
    assert len([p for p in PACKAGE.glob("*.py") if p.stem != "__init__"]) <= 12


def failpoint_arms(path: Path) -> list[int]:
    """Lines of ``path`` that call ``failpoints.arm`` or import ``arm`` from it."""
    lines: list[int] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "arm"
            and isinstance(node.value, ast.Name)
            and node.value.id == "failpoints"
        ):
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "ingestd.failpoints":
            lines.extend(node.lineno for alias in node.names if alias.name == "arm")
    return lines


def test_only_the_tests_arm_failpoints() -> None:
    # A failpoint SIGKILLs the process: nothing a deployment runs may arm one.
    arming = {
        str(path.relative_to(ROOT)): failpoint_arms(path)
        for path in PACKAGE.rglob("*.py")
        if path.name != "failpoints.py"
    }
    assert {name: lines for name, lines in arming.items() if lines} == {}
    # The scan finds the one place that does arm them (it is not vacuous).
    assert failpoint_arms(ROOT / "tests" / "failpoint_run.py") != []


def test_configuration_cannot_arm_failpoints(tmp_path: Path) -> None:
    config = tmp_path / "ingestd.yml"
    config.write_text('failpoints: "before_ack=1"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="failpoints"):
        load_settings(config, environ={})
    # The environment variable that once armed them is not read any more.
    settings = load_settings(None, environ={"INGESTD_FAILPOINTS": "before_ack=1"})
    assert "failpoints" not in repr(settings)


# Calls that make a driver client or connection; only ingestd.clients (Redis) and ingestd.daemon.db
# (PostgreSQL) may make one, so every client gets the same timeouts and retries.
CLIENT_MAKERS = frozenset({"from_url", "Redis", "StrictRedis", "connect", "create_pool"})
DRIVERS = frozenset({"redis", "aioredis", "asyncpg"})


def client_makers(path: Path) -> list[str]:
    """``driver.maker(...)`` calls in ``path`` (``redis.Redis(...)``, ``asyncpg.connect(...)``,
    ``aioredis.Redis.from_url(...)``)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in CLIENT_MAKERS:
            continue
        target = node.func.value
        while isinstance(target, ast.Attribute):
            target = target.value
        if isinstance(target, ast.Name) and target.id in DRIVERS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_clients_are_made_in_one_place() -> None:
    made = [
        where
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in {"clients.py", "db.py"}
        for where in client_makers(path)
    ]
    assert made == []
    # The scan finds the factories' own calls (it is not vacuous).
    assert client_makers(PACKAGE / "clients.py") != []
    assert client_makers(PACKAGE / "daemon" / "db.py") != []


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports (``from x import y`` gives x and x.y)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_test_module_is_a_helper_of_another() -> None:
    """Test helpers live in tests/*.py (and the conftests' fixtures): a test module that imports
    another test module runs that module's fixtures and couples the two suites, and its helpers
    end up copied (seen before: REPO_ROOT four times, a dsn fixture twice)."""
    borrowed = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "tests").rglob("*.py")
        for name in imported_modules(path)
        if name.startswith("tests.")
        and any(part.startswith("test_") for part in name.split(".")[1:])
    }
    assert not borrowed, sorted(borrowed)
