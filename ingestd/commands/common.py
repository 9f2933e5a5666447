"""What the one-shot database commands share: connect, check the schema, report any failure.

``run_with_database`` builds the pool from the settings (connect and command timeouts: asyncpg has
none by default), refuses a schema that is behind, runs the command's body and turns every failure
a database command can meet (unreachable server, bad DSN, server error, timeout, a privilege the
role lacks) into one line on stderr and exit code 2, never a traceback. Every line is redacted:
passwords in URLs and ``password=`` parameters, and the DSN's own password wherever a driver error
repeats it (a password with an unencoded ``#`` ends up in asyncpg's ``int()`` error, for example).

Used by ``import-csv`` and ``verify-csv``; the other commands of ``ingestd.cli`` may move here.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Final, TextIO

import asyncpg

from ingestd import errors
from ingestd.daemon import migrations
from ingestd.daemon.db import create_pool
from ingestd.settings import Settings, redact

EXIT_FAILED: Final = 2

# A DSN asyncpg cannot parse raises ValueError (an unencoded '#' or '@' in the password, a port
# that is not a number); ClientConfigurationError is an InterfaceError and a ValueError.
_CLOSE_TIMEOUT_S: Final = 5.0
# Shorter passwords are not masked verbatim: masking every "ab" would garble the message.
_MIN_MASKED_PASSWORD: Final = 4


class CommandRefused(errors.IngestdError):
    """The command cannot do its work as this role: a privilege or setting it needs is missing."""


def _dsn_passwords(dsn: str) -> list[str]:
    # Not urlsplit alone: a password with an unencoded '#', '?' or '/' is what breaks parsers, and
    # what they then quote in their errors; so take the user info up to the last '@', and also the
    # parts of the password before such a character.
    _, sep, rest = dsn.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    found: list[str] = []
    if sep and at and ":" in userinfo:
        password = userinfo.partition(":")[2]
        found.append(password)
        found += [password.split(ch, 1)[0] for ch in "#?/" if ch in password]
    with contextlib.suppress(ValueError):
        found += urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query).get("password", [])
    found += [urllib.parse.unquote(p) for p in found]
    return sorted({p for p in found if len(p) >= _MIN_MASKED_PASSWORD}, key=len, reverse=True)


def secret_free(text: str, dsn: str) -> str:
    """``redact(text)``, with the DSN's own password also masked wherever it appears verbatim."""
    text = redact(text)
    for password in _dsn_passwords(dsn):
        text = text.replace(password, "***")
    return text


def describe(exc: BaseException) -> str:
    """``Type: message`` of a driver error (just the message of ingestd's own errors)."""
    if isinstance(exc, errors.IngestdError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_with_database(
    command: str,
    settings: Settings,
    body: Callable[[asyncpg.Pool], Awaitable[int]],
    *,
    err: TextIO,
    stopped_hint: str = "",
) -> int:
    """Connect, check the schema, ``return await body(pool)``; any failure is one line and 2.

    ``stopped_hint`` is added to the line of a failure after the connection was made (import-csv:
    "run the same command again to resume").
    """
    dsn = settings.storage.postgres.dsn

    def say(text: str) -> None:
        print(secret_free(f"ingestd {command}: {text}", dsn), file=err)

    try:
        with errors.database_edge():
            pool = await create_pool(settings.storage.postgres, min_size=1)
    except (errors.DatabaseError, ValueError) as exc:  # ValueError: a malformed DSN
        say(f"cannot connect to {dsn}: {describe(exc)}")
        return EXIT_FAILED
    except errors.IngestdError as exc:
        say(describe(exc))
        return EXIT_FAILED
    try:
        with errors.database_edge():
            async with pool.acquire() as conn:
                await migrations.check_current(conn)
            return await body(pool)
    except errors.DriverError as exc:
        say(f"stopped: {describe(exc)}{stopped_hint}")
        return EXIT_FAILED
    except errors.IngestdError as exc:
        say(describe(exc))
        return EXIT_FAILED
    finally:
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
        except TimeoutError:  # a hung server: drop the connections instead of waiting on it
            pool.terminate()
