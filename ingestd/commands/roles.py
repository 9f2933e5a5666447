"""``ingestd roles``: the writer and reader groups, their grants, and the login roles.

``sql/roles.sql`` creates the NOLOGIN groups ``ingestd_writer`` and ``ingestd_reader`` and applies
their grants; this module runs it and then creates (or updates) login roles that are members of
one group each. A password never travels as plain text: it is turned into a SCRAM-SHA-256
verifier here, as ``psql``'s ``\\password`` does, so even a server that logs every statement
records only the verifier. Role names and the verifier reach SQL through ``format()`` with bind
parameters, never pasted into the statement by Python.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import stringprep
import unicodedata
from collections.abc import Sequence
from typing import Final

from ingestd.daemon.db import Connection
from ingestd.daemon.migrations import sql_dir
from ingestd.errors import ConfigError

WRITER_GROUP: Final = "ingestd_writer"
READER_GROUP: Final = "ingestd_reader"
GROUPS: Final = (WRITER_GROUP, READER_GROUP)
# Per-role settings of the login roles (a group's settings are not inherited by its members).
# ingestd never idles inside a transaction; a dashboard never writes and never runs for long.
LOGIN_SETTINGS: Final[dict[str, dict[str, str]]] = {
    WRITER_GROUP: {"idle_in_transaction_session_timeout": "60s"},
    READER_GROUP: {"default_transaction_read_only": "on", "statement_timeout": "30s"},
}
SCRAM_ITERATIONS: Final = 4096  # PostgreSQL's default (scram_iterations)
MAX_ROLE_NAME: Final = 63  # NAMEDATALEN - 1


def roles_sql() -> str:
    """The text of ``sql/roles.sql``."""
    return (sql_dir() / "roles.sql").read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True, slots=True)
class Login:
    """A login role to create or update as a member of ``group``."""

    name: str
    group: str
    password: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ConfigError(f"unknown group {self.group!r} (known: {', '.join(GROUPS)})")
        if not self.name or len(self.name) > MAX_ROLE_NAME or self.name in GROUPS:
            raise ConfigError(
                f"login role name must be 1-{MAX_ROLE_NAME} characters and not a group name, "
                f"got {self.name!r}"
            )


async def _execute_formatted(conn: Connection, template: str, *args: str) -> None:
    # PostgreSQL quotes the identifiers (%I) and literals (%L) itself; utility statements such
    # as CREATE ROLE take no bind parameters, so this is the safe way to build them.
    statement = await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(args))
    await conn.execute(statement)


async def _member_of(conn: Connection, role: str, group: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_auth_members m "
            "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member "
            "WHERE g.rolname = $1 AND r.rolname = $2)",
            group,
            role,
        )
    )


async def _ensure_login(conn: Connection, login: Login) -> str:
    row = await conn.fetchrow(
        "SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = $1",
        login.name,
    )
    if row is None:
        if login.password is None:
            raise ConfigError(
                f"login role {login.name} does not exist: give it a password to create it"
            )
        await _execute_formatted(conn, "CREATE ROLE %I LOGIN", login.name)
        action = "created"
    else:
        if row["rolsuper"] or row["rolcreaterole"] or row["rolbypassrls"]:
            raise ConfigError(
                f"{login.name} is a superuser or may create roles or bypass row security: "
                "a least-privilege login must be an ordinary role"
            )
        await _execute_formatted(conn, "ALTER ROLE %I LOGIN", login.name)
        action = "updated"
    for group in GROUPS:
        member = await _member_of(conn, login.name, group)
        if group == login.group and not member:
            await _execute_formatted(conn, "GRANT %I TO %I", group, login.name)
        elif group != login.group and member:
            await _execute_formatted(conn, "REVOKE %I FROM %I", group, login.name)
    if login.password is not None:
        await _execute_formatted(
            conn, "ALTER ROLE %I PASSWORD %L", login.name, scram_verifier(login.password)
        )
        action += ", password set"
    # Setting names come from the fixed table above, never from input.
    wanted = LOGIN_SETTINGS[login.group]
    for group, settings in LOGIN_SETTINGS.items():
        for name in settings.keys() - wanted.keys() if group != login.group else ():
            await _execute_formatted(conn, f"ALTER ROLE %I RESET {name}", login.name)
    for name, value in wanted.items():
        await _execute_formatted(conn, f"ALTER ROLE %I SET {name} = %L", login.name, value)
    return f"{login.name} ({login.group}): {action}"


async def apply_roles(conn: Connection, logins: Sequence[Login] = ()) -> list[str]:
    """Create the groups, (re)apply their grants, ensure the logins; one transaction."""
    done = []
    async with conn.transaction():
        await conn.execute(roles_sql())
        done.append(f"groups {', '.join(GROUPS)}: grants applied")
        for login in logins:
            done.append(await _ensure_login(conn, login))
    return done


# --- SCRAM-SHA-256 verifiers (RFC 5802 / RFC 7677, as PostgreSQL stores them) ------------------


def saslprep(password: str) -> bytes:
    """The password bytes PostgreSQL hashes: SASLprep (RFC 4013) or, where it fails, raw UTF-8.

    PostgreSQL falls back to the raw bytes when the password is not a valid SASLprep string, and
    does so silently; so does this, so that the verifier matches what the server computes.
    """
    raw = password.encode("utf-8")
    if password.isascii():
        return raw  # PostgreSQL's pg_saslprep() passes pure ASCII through unchanged
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return raw
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(ch) for ch in normalized for check in prohibited):
        return raw
    # Bidirectional rule: text with RandALCat characters must contain no LCat character and must
    # start and end with RandALCat; otherwise the string is invalid.
    rtl = any(stringprep.in_table_d1(ch) for ch in normalized)
    if rtl and (
        any(stringprep.in_table_d2(ch) for ch in normalized)
        or not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1]))
    ):
        return raw
    return normalized.encode("utf-8")


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` for ``password``."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
