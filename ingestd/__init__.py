"""ingestd: the persistence layer of the kimchi-premium arbitrage system.

Events (spreads, FX, orders, positions, trades, heartbeats) arrive in-process through
``Service.submit`` or from other processes through a Redis Stream; they are COPY-batched into
PostgreSQL/TimescaleDB and their latest values mirrored into Redis.

The names below are loaded on first use: ``import ingestd.producer.publisher`` in a producer runs
this
file first, and must not pull in the daemon (asyncpg, prometheus_client, the pipeline) with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.daemon.app import Service
    from ingestd.daemon.sources.inprocess import Outcome
    from ingestd.errors import IngestdError, InvalidEvent
    from ingestd.producer.publisher import AsyncPublisher, Publisher
    from ingestd.settings import Settings, load_settings

# Each public name and the module that defines it.
_HOMES: dict[str, str] = {
    "AsyncPublisher": "ingestd.producer.publisher",
    "IngestdError": "ingestd.errors",
    "InvalidEvent": "ingestd.errors",
    "Outcome": "ingestd.daemon.sources.inprocess",
    "Publisher": "ingestd.producer.publisher",
    "Service": "ingestd.daemon.app",
    "Settings": "ingestd.settings",
    "load_settings": "ingestd.settings",
}

__all__ = [
    "AsyncPublisher",
    "IngestdError",
    "InvalidEvent",
    "Outcome",
    "Publisher",
    "Service",
    "Settings",
    "load_settings",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ingestd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
