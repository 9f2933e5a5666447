"""The producer side (docs/producer.md): the models and the storages collector, paper and live use.

    from ingestd.producer.storage import RedisCacheStorage, create_storage, SpreadOpportunity

    redis_cache = RedisCacheStorage(config["storage"]["redis"])
    redis_cache.set_fx_rate("USDKRW", 1350.0, ttl=3)
    with create_storage(config["storage"], producer="collector") as storage:
        storage.log_spread(SpreadOpportunity(symbol="BTC", ...))

``create_storage`` builds what ``storage.backend`` says: ``CsvStorage`` (``csv``),
``PostgresStorage`` (``postgres``: events through a local disk outbox to ingestd's stream,
batched into PostgreSQL; a full outbox raises ``OutboxFull``) or
``DualStorage`` (``dual``: both, one event id). ``create_async_storage`` and the ``Async*`` classes
are the asyncio twins.
"""

from ingestd.producer.storage.base import AsyncStorage, EventBuilder, Storage
from ingestd.producer.storage.csv_storage import AsyncCsvStorage, CsvStorage
from ingestd.producer.storage.dual import AsyncDualStorage, DualStorage
from ingestd.producer.storage.factory import create_async_storage, create_storage
from ingestd.producer.storage.models import FxRate, OrderLeg, Position, SpreadOpportunity, Trade
from ingestd.producer.storage.outbox import OutboxBroken, OutboxError, OutboxFull, OutboxState
from ingestd.producer.storage.postgres import AsyncPostgresStorage, PostgresStorage
from ingestd.producer.storage.redis_cache import (
    AsyncRedisCacheStorage,
    CacheKeys,
    RedisCacheStorage,
)

__all__ = [
    "AsyncCsvStorage",
    "AsyncDualStorage",
    "AsyncPostgresStorage",
    "AsyncRedisCacheStorage",
    "AsyncStorage",
    "CacheKeys",
    "CsvStorage",
    "DualStorage",
    "EventBuilder",
    "FxRate",
    "OrderLeg",
    "OutboxBroken",
    "OutboxError",
    "OutboxFull",
    "OutboxState",
    "Position",
    "PostgresStorage",
    "RedisCacheStorage",
    "SpreadOpportunity",
    "Storage",
    "Trade",
    "create_async_storage",
    "create_storage",
]
