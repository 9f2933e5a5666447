"""One exception root for ingestd; driver errors are translated here and nowhere else.

This module imports no driver: the producer library imports it, and a collector that publishes
to Redis must not load asyncpg for it. The classifiers look a driver up only once it is loaded
(``_loaded``): an exception cannot come from a driver that was never imported.
"""

from __future__ import annotations

import asyncio
import sys
from types import ModuleType


class IngestdError(Exception):
    """Root of every error ingestd raises on purpose."""

    retriable: bool = False


class ConfigError(IngestdError):
    """The configuration is invalid: a misspelt key, a missing value, a wrong type."""


class InvalidEvent(IngestdError):
    """An event is bad input; ``field`` names the offending field when there is one."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


class SchemaBehind(IngestdError):
    """The database schema is older than this build expects: run ``ingestd migrate``."""


class SchemaDrift(IngestdError):
    """An applied migration's checksum differs from its file: the history was edited."""


class ShuttingDown(IngestdError):
    """The pipeline no longer accepts events because it is draining."""


class SinkUnavailable(IngestdError):
    """A sink failed for a reason a retry can cure (connection lost, timeout, restart)."""

    retriable = True


# SQLSTATE classes (first two characters) whose errors are about the data of a row: the batch is
# split so that only the offending rows become dead letters.
def _loaded(name: str) -> ModuleType | None:
    """The driver module ``name`` if this process has imported it, else None."""
    return sys.modules.get(name)


_DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})
UNIQUE_VIOLATION = "23505"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL server error, else None."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL rejected a row for its content (class 22 data, 23 integrity)."""
    asyncpg = _loaded("asyncpg")
    code = sqlstate(exc)
    return (
        asyncpg is not None
        and isinstance(exc, asyncpg.PostgresError)
        and code is not None
        and code[:2] in _DATA_SQLSTATE_CLASSES
        and code != UNIQUE_VIOLATION
    )


def is_unique_violation(exc: BaseException) -> bool:
    """True for a unique-constraint violation (a redelivered event met its earlier copy)."""
    return sqlstate(exc) == UNIQUE_VIOLATION


def is_retriable(exc: BaseException) -> bool:
    """True when retrying the same work later can succeed.

    While PostgreSQL is down most failures are plain ``OSError``s; after ``pg_terminate_backend``
    mid-COPY asyncpg raises ``InternalClientError``/``InterfaceError`` (RELIABILITY.md), which are
    not connection-error classes but are retriable all the same.
    """
    if isinstance(exc, IngestdError):
        return exc.retriable
    if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    asyncpg = _loaded("asyncpg")
    if asyncpg is not None and isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    ):
        return True
    redis_errors = _loaded("redis.exceptions")
    if redis_errors is not None and isinstance(
        exc, redis_errors.ConnectionError | redis_errors.TimeoutError
    ):
        return True
    code = sqlstate(exc)
    if code is None:
        return False
    # 08 connection, 40 transaction rollback (serialization, deadlock), 53 resources, 55 lock not
    # available, 57 operator intervention (admin shutdown, statement timeout), 58 system error.
    return code[:2] in {"08", "40", "53", "55", "57", "58"}
