"""Dual write: every event to the CSV files and to ingestd, with one event id.

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

The event's ``event_id`` is fixed before either side writes. If one side fails (the CSV row cannot
be written: disk full; or the database side is closed), the other side still gets the event, and
the error says exactly what was and was not written, naming the event id: ``CsvWriteFailed``
("not written to CSV: ...; published to stream ingestd:events as event_id X"), with ``event_id`` and
``published`` on it. A producer's natural retry, the same ``log_*`` call again (with an equal
model), is recognised: it reuses that event id and writes only the side that is missing, so the
CSV row appears and the database gets the event once, whatever the number of retries. Equality
is of the whole event (every column and the producer); up to ``MAX_INCOMPLETE`` such events are
remembered per storage, the oldest forgotten first (a retry of a forgotten one draws a new id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from types import TracebackType
from typing import Any, Final

import orjson

from ingestd import errors
from ingestd.producer.storage.base import AsyncLogMethods, EventBuilder, LogMethods
from ingestd.producer.storage.csv_storage import CsvStorage, CsvWriteFailed, emit_off_the_loop
from ingestd.producer.storage.postgres import AsyncPostgresStorage, PostgresStorage

log = logging.getLogger("ingestd.producer.storage.dual")

# Events written to one side only, remembered so that a retry completes them under their id.
MAX_INCOMPLETE: Final = 10_000


@dataclasses.dataclass(slots=True)
class _Incomplete:
    """An event that one side has and the other has not (yet)."""

    event_id: str
    in_csv: bool
    published: bool


class _Incompletes:
    """The events a failed dual write left on one side, by content (the retry's key)."""

    def __init__(self) -> None:
        self._by_content: dict[bytes, _Incomplete] = {}
        self._lock = threading.Lock()  # a synchronous storage may be shared by threads

    @staticmethod
    def key(event: dict[str, Any]) -> bytes:
        """The event without its id: a retry of the same call builds the same one."""
        content = {k: v for k, v in event.items() if k != "event_id"}
        return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)

    def take(self, key: bytes) -> _Incomplete | None:
        with self._lock:
            return self._by_content.pop(key, None)

    def keep(self, key: bytes, state: _Incomplete) -> None:
        with self._lock:
            self._by_content[key] = state
            while len(self._by_content) > MAX_INCOMPLETE:
                oldest = next(iter(self._by_content))
                forgotten = self._by_content.pop(oldest)
                log.warning(
                    "forgetting the incomplete dual write of event_id %s (more than %d): a "
                    "retry of it gets a new event id",
                    forgotten.event_id,
                    MAX_INCOMPLETE,
                    extra={"action": "dual_incomplete_forgotten"},
                )


def _outcome(
    state: _Incomplete,
    csv_error: Exception | None,
    db_error: Exception | None,
    target: str,
) -> Exception:
    """The error of an incomplete dual write, saying exactly what was and was not written."""
    event_id = state.event_id
    db_part = (
        f"published to {target} as event_id {event_id}"
        if state.published
        else f"not published to {target} ({type(db_error).__name__}: {db_error})"
    )
    retry = (
        "; repeating the call writes what is missing under the same event_id"
        if state.in_csv or state.published
        else ""
    )
    if csv_error is not None:
        text = f"not written to CSV: {csv_error}; {db_part}{retry}"
        if isinstance(csv_error, CsvWriteFailed):
            exc: Exception = CsvWriteFailed(text)
        else:
            # Not a write failure (a closed storage, a bug): the caller sees its own type.
            csv_error.add_note(text)
            exc = csv_error
    else:
        assert db_error is not None
        db_error.add_note(f"written to CSV as event_id {event_id}; {db_part}{retry}")
        exc = db_error
    if isinstance(exc, CsvWriteFailed):
        exc.event_id = event_id
        exc.published = state.published
    return exc


def _begin(incompletes: _Incompletes, event: dict[str, Any]) -> tuple[bytes, _Incomplete]:
    """The state of this event: fresh, or a retry of an incomplete one (whose id it takes)."""
    key = incompletes.key(event)
    earlier = incompletes.take(key)
    if earlier is None:
        return key, _Incomplete(event["event_id"], in_csv=False, published=False)
    event["event_id"] = earlier.event_id
    return key, earlier


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
        self._incomplete = _Incompletes()

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
        key, state = _begin(self._incomplete, event)
        csv_error = db_error = None
        try:
            if not state.in_csv:
                try:
                    self.csv._emit(event)
                    state.in_csv = True
                except Exception as exc:  # noqa: BLE001 - the other side still gets the event
                    csv_error = exc
            if not state.published:
                try:
                    self.db._emit(event)
                    state.published = True
                except Exception as exc:  # noqa: BLE001 - reported below, with what was written
                    db_error = exc
        finally:
            # One side has it and the other has not (also when interrupted, a cancellation
            # included): remembered, so that the retry completes it under the same id.
            if state.in_csv != state.published:
                self._incomplete.keep(key, state)
        if csv_error is None and db_error is None:
            return state.event_id
        failure = _outcome(state, csv_error, db_error, self.db.target)
        if failure is csv_error or failure is db_error:
            raise failure
        raise failure from csv_error

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
        self._incomplete = _Incompletes()

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
        key, state = _begin(self._incomplete, event)
        csv_error = db_error = None
        try:
            if not state.in_csv:
                try:
                    await emit_off_the_loop(self.csv, event)
                    state.in_csv = True
                except Exception as exc:  # noqa: BLE001 - the other side still gets the event
                    csv_error = exc
            if not state.published:
                try:
                    await self.db._emit(event)
                    state.published = True
                except Exception as exc:  # noqa: BLE001 - reported below, with what was written
                    db_error = exc
        finally:
            # One side has it and the other has not (also when interrupted, a cancellation
            # included): remembered, so that the retry completes it under the same id.
            if state.in_csv != state.published:
                self._incomplete.keep(key, state)
        if csv_error is None and db_error is None:
            return state.event_id
        failure = _outcome(state, csv_error, db_error, self.db.target)
        if failure is csv_error or failure is db_error:
            raise failure
        raise failure from csv_error

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
