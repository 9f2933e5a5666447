"""Driver errors are translated at the edges into ingestd's own, carrying ``retriable``."""

from __future__ import annotations

import asyncpg
import pytest
import redis.exceptions

from ingestd import errors


def translated(exc: BaseException) -> BaseException:
    """What ``database_edge`` lets out when ``exc`` is raised inside it."""
    try:
        with errors.database_edge():
            raise exc
    except BaseException as out:
        return out
    raise AssertionError("unreachable")


def test_a_refusal_keeps_its_sqlstate_and_is_not_retriable() -> None:
    raw = asyncpg.UniqueViolationError("duplicate key value")
    out = translated(raw)
    assert isinstance(out, errors.DatabaseError)
    assert out.driver_error is raw and out.__cause__ is raw
    assert out.retriable is False and out.sqlstate == "23505"
    assert errors.is_unique_violation(out) and not errors.is_data_error(out)
    assert str(out) == "UniqueViolationError: duplicate key value"


def test_a_data_error_stays_a_data_error() -> None:
    out = translated(asyncpg.NumericValueOutOfRangeError("numeric field overflow"))
    assert errors.is_data_error(out) and not errors.is_retriable(out)


@pytest.mark.parametrize(
    "raw",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.AdminShutdownError("terminating connection"),
    ],
)
def test_an_outage_is_retriable(raw: BaseException) -> None:
    out = translated(raw)
    assert isinstance(out, errors.DatabaseError) and out.retriable
    assert errors.is_retriable(out)


@pytest.mark.parametrize("raw", [ValueError("a bug"), errors.ShuttingDown("draining")])
def test_what_is_not_the_drivers_passes_unchanged(raw: BaseException) -> None:
    assert translated(raw) is raw


def test_redis_errors_are_translated_at_the_redis_edge() -> None:
    with pytest.raises(errors.RedisError) as lost, errors.redis_edge():
        raise redis.exceptions.ConnectionError("Connection reset by peer")
    assert lost.value.retriable
    with pytest.raises(errors.RedisError) as refused, errors.redis_edge():
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key")
    assert not refused.value.retriable and "WRONGTYPE" in str(refused.value)


async def test_a_sink_method_at_the_edge_raises_the_translation() -> None:
    @errors.at_database_edge
    async def write() -> None:
        raise asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT")

    with pytest.raises(errors.DatabaseError) as refused:
        await write()
    assert refused.value.sqlstate == errors.READ_ONLY_SQL_TRANSACTION
