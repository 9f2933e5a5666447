"""Dual write (seed §4.1 step 1): every event to the CSV files and to ingestd, with one event id.

The CSV side is written first and never waits for the database side. The database side is a
``PostgresStorage`` with ``overflow="drop_oldest"``, so an unreachable stream never blocks the
producer:

* a short outage (fewer events than ``storage.buffer_max_events``, default 100,000): the outbox
  holds them and the publisher retries; when the stream answers again, they are published, in
  order, and the database catches up by itself;
* a longer outage, or a producer that stops or crashes while the stream is down: the oldest events
  are dropped from memory (logged once per outage, with its first dropped id, and counted in
  ``dropped``). The
  CSV files hold every one of them with the same ``event_id``, so ``ingestd import-csv DIR`` lands
  exactly the missing rows: the import is idempotent and what did reach the database adds nothing.

If writing the CSV row fails (disk full), the event is still handed to the database side, and the
error is raised to the caller.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from ingestd import errors
from ingestd.storage.base import AsyncLogMethods, EventBuilder, LogMethods
from ingestd.storage.csv_storage import CsvStorage, emit_off_the_loop
from ingestd.storage.postgres import AsyncPostgresStorage, PostgresStorage

log = logging.getLogger("ingestd.storage.dual")


def _unsent_warning(directory: object, exc: errors.SinkUnavailable) -> None:
    log.warning(
        "%s; the CSV files in %s hold them: run `ingestd import-csv %s` to catch up",
        exc,
        directory,
        directory,
        extra={"action": "dual_unsent"},
    )


class DualStorage(LogMethods):
    """CSV files and ingestd's database together; the CSV side still writes when Redis is down."""

    def __init__(
        self,
        csv_storage: CsvStorage,
        db: PostgresStorage,
        *,
        producer: str | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.csv = csv_storage
        self.db = db
        self._events = EventBuilder(producer, id_prefix)

    def __enter__(self) -> DualStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _emit(self, event: dict[str, Any]) -> str:
        try:
            self.csv._emit(event)
        except BaseException:
            self.db._emit(event)
            raise
        return self.db._emit(event)

    def flush(self, timeout: float | None = None) -> None:
        """fsync the CSV files, then wait for the stream (SinkUnavailable on timeout)."""
        self.csv.flush()
        self.db.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Close both; unpublished events are logged (the CSV files hold them), not raised.

        A CSV failure (CsvWriteFailed) is raised, after the database side is closed too.
        """
        try:
            self.csv.close()
        finally:
            try:
                self.db.close(timeout)
            except errors.SinkUnavailable as exc:
                _unsent_warning(self.csv.directory, exc)


class AsyncDualStorage(AsyncLogMethods):
    """``DualStorage`` for asyncio code."""

    def __init__(
        self,
        csv_storage: CsvStorage,
        db: AsyncPostgresStorage,
        *,
        producer: str | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.csv = csv_storage
        self.db = db
        self._events = EventBuilder(producer, id_prefix)

    async def __aenter__(self) -> AsyncDualStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _emit(self, event: dict[str, Any]) -> str:
        try:
            await emit_off_the_loop(self.csv, event)
        except BaseException:
            await self.db._emit(event)
            raise
        return await self.db._emit(event)

    async def flush(self) -> None:
        """fsync the CSV files (in a thread), then wait for the stream (bound it with
        ``asyncio.timeout``)."""
        await asyncio.to_thread(self.csv.flush)
        await self.db.flush()

    async def aclose(self, grace_s: float = 10.0) -> None:
        """Close both; unpublished events are logged (the CSV files hold them), not raised.

        A CSV failure (CsvWriteFailed) is raised, after the database side is closed too.
        """
        try:
            await asyncio.to_thread(self.csv.close)
        finally:
            try:
                await self.db.aclose(grace_s)
            except errors.SinkUnavailable as exc:
                _unsent_warning(self.csv.directory, exc)
