"""Dead letters: bad input kept with its raw payload, its size, its SHA-256 and a clear reason."""

from __future__ import annotations

import dataclasses
import hashlib

# A dead letter keeps at most this much of the payload; the size and digest describe the whole.
PAYLOAD_PREFIX_CHARS = 16_384
# The width of dead_letters.dedup_key (VARCHAR(300)).
DEDUP_KEY_CHARS = 300


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected event, ready to insert into ``dead_letters``."""

    source: str
    error: str
    payload: str
    payload_bytes: int
    payload_sha256: str
    field: str | None = None
    dedup_key: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    producer: str | None = None


def safe_text(raw: bytes | str, limit: int = PAYLOAD_PREFIX_CHARS) -> str:
    """Text PostgreSQL can store: invalid UTF-8, lone surrogates and NULs become escapes."""
    if isinstance(raw, bytes):
        text = raw[: limit * 4].decode("utf-8", errors="backslashreplace")
    else:
        text = raw[:limit].encode("utf-8", errors="backslashreplace").decode("utf-8")
    return text[:limit].replace("\x00", "\\x00")


def bounded_key(key: str, limit: int = DEDUP_KEY_CHARS) -> str:
    """The key itself when it fits ``dead_letters.dedup_key``, else a prefix plus its SHA-256.

    Cutting alone would let two long keys collide, and the second poison entry would then be
    recorded nowhere; the digest keeps distinct keys distinct.
    """
    if len(key) <= limit:
        return key
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()
    return f"{key[: limit - len(digest) - 1]}~{digest}"


def content_key(wire: bytes) -> str:
    """The dead-letter key of an event by its content: its wire form's SHA-256.

    For the events that no broker numbers (spooled, submitted in-process): one event that is
    committed from memory and replayed from the spool as well meets one key, so a database that
    refuses it records it once. The ``spool:`` prefix is the key's first home and stays, so that
    rows already written keep matching.
    """
    return f"spool:{hashlib.sha256(wire).hexdigest()}"


def make_dead_letter(
    raw: bytes | str,
    error: str,
    *,
    source: str,
    field: str | None = None,
    dedup_key: str | None = None,
    event_type: str | None = None,
    event_id: str | None = None,
    producer: str | None = None,
) -> DeadLetter:
    """Describe a rejected payload; only a prefix of an oversize payload is kept."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", errors="surrogatepass")
    return DeadLetter(
        source=source,
        error=safe_text(error, 2000),
        payload=safe_text(raw),
        payload_bytes=len(data),
        payload_sha256=hashlib.sha256(data).hexdigest(),
        field=None if field is None else safe_text(field, 100),
        dedup_key=None if dedup_key is None else bounded_key(dedup_key),
        event_type=None if event_type is None else safe_text(event_type, 50),
        event_id=None if event_id is None else safe_text(event_id, 100),
        producer=None if producer is None else safe_text(producer, 50),
    )
