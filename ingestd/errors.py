"""One exception root for ingestd; driver errors are translated here and nowhere else.

This module imports no driver: the producer library imports it, and a collector that publishes
to Redis must not load asyncpg for it. The classifiers look a driver up only once it is loaded
(``_loaded``): an exception cannot come from a driver that was never imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


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
class DriverError(IngestdError):
    """A driver's error (asyncpg, redis-py, the socket under them), translated at an edge.

    The sinks, the stream source, the probes and the commands translate what their driver raises
    into these (``database_edge``, ``redis_edge``), so that what is above them (the pipeline,
    the health checks, the command line) decides on ``retriable`` and ``sqlstate`` instead of
    catching driver classes. The driver's exception is kept as ``driver_error`` (and as
    ``__cause__``); the message names its class.
    """

    def __init__(self, driver_error: BaseException) -> None:
        text = str(driver_error)
        name = type(driver_error).__name__
        super().__init__(f"{name}: {text}" if text else name)
        self.driver_error = driver_error
        self.retriable = is_retriable(driver_error)
        # PostgreSQL's SQLSTATE when the server raised it, else None.
        self.sqlstate = sqlstate(driver_error)


class DatabaseError(DriverError):
    """PostgreSQL failed or refused: unreachable, timed out, read-only, or the data refused."""


class RedisError(DriverError):
    """Redis failed or refused: unreachable, timed out, a permission, a wrong key type."""


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception behind a translated one (``exc`` itself otherwise)."""
    return exc.driver_error if isinstance(exc, DriverError) else exc


def _is_database_error(exc: BaseException) -> bool:
    asyncpg = _loaded("asyncpg")
    return isinstance(exc, OSError | TimeoutError) or (
        asyncpg is not None
        and isinstance(
            exc, asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError
        )
    )


def _is_redis_error(exc: BaseException) -> bool:
    redis_errors = _loaded("redis.exceptions")
    return isinstance(exc, OSError | TimeoutError) or (
        redis_errors is not None and isinstance(exc, redis_errors.RedisError)
    )


@contextlib.contextmanager
def database_edge() -> Iterator[None]:
    """Translate what asyncpg (or the socket under it) raises inside into ``DatabaseError``.

    Anything else (ingestd's own errors, a bug, a cancellation) passes through unchanged.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, IngestdError) or not _is_database_error(exc):
            raise
        raise DatabaseError(exc) from exc


@contextlib.contextmanager
def redis_edge() -> Iterator[None]:
    """Translate what redis-py (or the socket under it) raises inside into ``RedisError``."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, IngestdError) or not _is_redis_error(exc):
            raise
        raise RedisError(exc) from exc


def at_database_edge(
    method: Callable[_P, Awaitable[_T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Decorate a sink's method so that it raises ``DatabaseError``, not asyncpg's errors."""

    @functools.wraps(method)
    async def edge(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with database_edge():
            return await method(*args, **kwargs)

    return edge


def _loaded(name: str) -> ModuleType | None:
    """The driver module ``name`` if this process has imported it, else None."""
    return sys.modules.get(name)


_DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})
UNIQUE_VIOLATION = "23505"
READ_ONLY_SQL_TRANSACTION = "25006"  # a standby, or default_transaction_read_only


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL server error (raw or translated), else None."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL rejected a row for its content (class 22 data, 23 integrity)."""
    exc = driver_error(exc)
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
    mid-COPY asyncpg raises ``InternalClientError``/``InterfaceError`` (seen in the fault suite),
    which are not connection-error classes but are retriable all the same.
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
