"""Build the producer storage that ``storage.backend`` names: ``csv``, ``postgres`` or ``dual``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ingestd.clients import redis_async, redis_sync
from ingestd.errors import ConfigError
from ingestd.producer.publisher import DEFAULT_STREAM
from ingestd.producer.storage.base import AsyncStorage, Storage
from ingestd.producer.storage.csv_storage import AsyncCsvStorage, CsvStorage
from ingestd.producer.storage.dual import AsyncDualStorage, DualStorage
from ingestd.producer.storage.outbox import DiskOutbox, Overflow, open_disk_outbox
from ingestd.producer.storage.postgres import (
    AsyncPostgresStorage,
    InProcessService,
    PostgresStorage,
    StreamTransport,
)
from ingestd.settings import Settings, StorageSettings, build_section, load_settings

StorageConfig = Settings | StorageSettings | Mapping[str, Any] | None


def _resolve(config: StorageConfig) -> tuple[StorageSettings, str]:
    """The storage section and the stream key; a mapping is the config's ``storage`` section."""
    if config is None:
        config = load_settings()
    if isinstance(config, Settings):
        return config.storage, config.stream.key
    if isinstance(config, StorageSettings):
        return config, DEFAULT_STREAM
    storage = build_section(StorageSettings, config, "storage")
    if storage.backend not in {"csv", "postgres", "dual"}:
        raise ConfigError("storage.backend must be one of csv, postgres, dual")
    return storage, DEFAULT_STREAM


def _csv(
    storage: StorageSettings, producer: str | None, csv_dir: str | os.PathLike[str] | None
) -> CsvStorage:
    return CsvStorage(
        storage.csv.dir if csv_dir is None else csv_dir,
        producer=producer,
        fsync_interval_s=storage.csv.fsync_interval_s,
    )


def _disk_outbox(storage: StorageSettings, producer: str | None) -> DiskOutbox | None:
    """The ``postgres`` backend's local outbox; dual write has its CSV files instead.

    Dual write keeps the in-memory outbox with ``drop_oldest``: its CSV files already hold every
    event on disk (and ``import-csv`` lands what the stream missed), so a second copy on disk
    would only cost a write per event.
    """
    return open_disk_outbox(storage.outbox, producer) if storage.backend == "postgres" else None


def create_storage(
    config: StorageConfig = None,
    *,
    producer: str | None = None,
    csv_dir: str | os.PathLike[str] | None = None,
) -> Storage:
    """The synchronous storage for ``storage.backend`` (default config: ``load_settings()``)."""
    storage, stream = _resolve(config)
    # The CSV side first: when its directory or a file's header is refused, no Redis client has
    # been made yet (nothing to close).
    csv_side = _csv(storage, producer, csv_dir) if storage.backend in {"csv", "dual"} else None
    if csv_side is not None and storage.backend == "csv":
        return csv_side
    r = storage.redis
    overflow: Overflow = "drop_oldest" if storage.backend == "dual" else "block"
    outbox: DiskOutbox | None = None
    try:
        outbox = _disk_outbox(storage, producer)
        db = PostgresStorage(
            redis_sync(r.url, socket_timeout_s=r.socket_timeout_s),
            stream=stream,
            producer=producer,
            max_buffer_events=storage.buffer_max_events,
            overflow=overflow,
            owns_client=True,
            outbox=outbox,
        )
    except BaseException:
        if outbox is not None:
            outbox.close()
        if csv_side is not None:
            csv_side.close()
        raise
    if csv_side is None:
        return db
    return DualStorage(csv_side, db, producer=producer)


def create_async_storage(
    config: StorageConfig = None,
    *,
    producer: str | None = None,
    csv_dir: str | os.PathLike[str] | None = None,
    service: InProcessService | None = None,
) -> AsyncStorage:
    """The asyncio storage for ``storage.backend``; given ``service``, in-process, not via Redis."""
    storage, stream = _resolve(config)
    # The CSV side first, as in create_storage: a refused directory leaves no client behind.
    csv_side = _csv(storage, producer, csv_dir) if storage.backend in {"csv", "dual"} else None
    if csv_side is not None and storage.backend == "csv":
        return AsyncCsvStorage(csv_side)
    overflow: Overflow = "drop_oldest" if storage.backend == "dual" else "block"
    outbox: DiskOutbox | None = None
    try:
        if service is not None:
            db = AsyncPostgresStorage.in_process(
                service,
                producer=producer,
                max_buffer_events=storage.buffer_max_events,
                overflow=overflow,
            )
        else:
            r = storage.redis
            outbox = _disk_outbox(storage, producer)
            transport = StreamTransport(
                redis_async(r.url, socket_timeout_s=r.socket_timeout_s), stream, owns_client=True
            )
            db = AsyncPostgresStorage(
                transport,
                producer=producer,
                max_buffer_events=storage.buffer_max_events,
                overflow=overflow,
                outbox=outbox,
            )
    except BaseException:
        if outbox is not None:
            outbox.close()
        if csv_side is not None:
            csv_side.close()
        raise
    if csv_side is None:
        return db
    return AsyncDualStorage(csv_side, db, producer=producer)
