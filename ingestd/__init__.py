"""ingestd: the persistence layer of the kimchi-premium arbitrage system.

Events (spreads, FX, orders, positions, trades, heartbeats) arrive in-process through
``Service.submit`` or from other processes through a Redis Stream; they are COPY-batched into
PostgreSQL/TimescaleDB and their latest values mirrored into Redis.
"""

from ingestd.app import Service
from ingestd.errors import IngestdError, InvalidEvent
from ingestd.publisher import AsyncPublisher, Publisher
from ingestd.settings import Settings, load_settings
from ingestd.sources.inprocess import Outcome

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
