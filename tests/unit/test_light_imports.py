"""The producer library stays light: a collector that imports it loads no daemon with it.

Each import runs in a fresh interpreter (this one has loaded everything already) and reports the
modules it loaded; before this was kept, ``import ingestd.producer.publisher`` loaded 32 ingestd
modules,
asyncpg and prometheus_client.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

# Modules a producer must never pay for: the database driver, the metrics library, and the
# daemon's own modules (composition root, pipeline, sources, sinks and what only they use).
# PyYAML too: it is loaded when a config file is read, not by the import.
FORBIDDEN_PACKAGES = (
    "asyncpg",
    "prometheus_client",
    "uvloop",
    "yaml",
    "ingestd.daemon.sinks",
    "ingestd.daemon.sources",
)
FORBIDDEN_MODULES = frozenset(
    {
        "ingestd.daemon.app",
        "ingestd.daemon.batching",
        "ingestd.cli",
        "ingestd.daemon.db",
        "ingestd.daemon.endpoints",
        "ingestd.daemon.gaps",
        "ingestd.daemon.hedges",
        "ingestd.daemon.maintenance",
        "ingestd.daemon.metrics",
        "ingestd.daemon.migrations",
        "ingestd.daemon.pipeline",
        "ingestd.daemon.probes",
        "ingestd.daemon.quarantine",
    }
)

_REPORT = "import importlib, sys, orjson; importlib.import_module(sys.argv[1]); "
_REPORT += "sys.stdout.buffer.write(orjson.dumps(sorted(sys.modules)))"


def modules_loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it has imported ``module``."""
    done = subprocess.run(
        [sys.executable, "-c", _REPORT, module], capture_output=True, check=True, timeout=60
    )
    return set(orjson.loads(done.stdout))


def forbidden(loaded: set[str]) -> list[str]:
    return sorted(
        name
        for name in loaded
        if name in FORBIDDEN_MODULES
        or any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PACKAGES)
    )


@pytest.mark.parametrize(
    "module",
    [
        "ingestd",
        "ingestd.producer.publisher",
        "ingestd.producer.storage",
        "ingestd.producer.storage.redis_cache",
    ],
)
def test_the_producer_library_loads_no_daemon(module: str) -> None:
    loaded = modules_loaded_by(module)
    assert module in loaded
    assert forbidden(loaded) == []


def test_the_check_sees_the_daemon_when_it_is_loaded() -> None:
    # The same check on the daemon's composition root finds what it must: it is not vacuous.
    found = forbidden(modules_loaded_by("ingestd.daemon.app"))
    assert {"asyncpg", "prometheus_client", "ingestd.daemon.app", "ingestd.daemon.pipeline"} <= set(
        found
    )


def test_the_package_still_offers_its_names() -> None:
    # ``ingestd`` loads its public names on first use, not at import.
    import ingestd

    assert ingestd.Service.__name__ == "Service"
    assert ingestd.Publisher.__module__ == "ingestd.producer.publisher"
    with pytest.raises(AttributeError):
        _ = ingestd.NoSuchName
