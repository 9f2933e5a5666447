"""Dead letters: bad input kept with its raw payload, its size, its SHA-256 and a clear reason.

Writing a dead letter must not fail, whatever the input, so every field is made storable and
bounded by construction: a NUL (which PostgreSQL text refuses), a lone surrogate and a byte
that is not UTF-8 become backslash escapes, and each field is cut to its column's width AFTER
escaping (an escape is longer than what it stands for), never inside an escape.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

# A dead letter keeps at most this much of the payload; the size and digest describe the whole.
PAYLOAD_PREFIX_CHARS = 16_384
# The widths of dead_letters' bounded columns, in characters (what VARCHAR(n) counts).
DEDUP_KEY_CHARS = 300
SOURCE_CHARS = 50
EVENT_TYPE_CHARS = 50
EVENT_ID_CHARS = 100
PRODUCER_CHARS = 50
FIELD_CHARS = 100
# error is TEXT: bounded only to keep a row readable.
ERROR_CHARS = 2000
# payload_bytes is an INTEGER.
MAX_PAYLOAD_BYTES = 2**31 - 1


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


def _storable(text: str) -> bool:
    """True when PostgreSQL (UTF-8) stores ``text`` as it is: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escape_str_char(ch: str) -> str:
    if ch == "\x00":
        return "\\x00"
    if "\ud800" <= ch <= "\udfff":  # a lone surrogate
        return f"\\u{ord(ch):04x}"
    return ch


def _escape_bytes_char(ch: str) -> str:
    # Decoded with surrogateescape: a byte that was not UTF-8 is U+DC80..U+DCFF.
    if "\udc80" <= ch <= "\udcff":
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return _escape_str_char(ch)


def _escape_ascii_char(ch: str) -> str:
    if " " <= ch <= "~":
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: str, limit: int, escape: Callable[[str], str]) -> tuple[str, bool]:
    """``text`` escaped character by character and cut at ``limit`` characters of the result
    (never inside an escape); and whether all of it fitted."""
    out: list[str] = []
    used = 0
    for ch in text:
        piece = escape(ch)
        used += len(piece)
        if used > limit:
            return "".join(out), False
        out.append(piece)
    return "".join(out), True


def safe_text(raw: bytes | str, limit: int = PAYLOAD_PREFIX_CHARS) -> str:
    """At most ``limit`` characters that PostgreSQL can store, counted after escaping.

    Invalid UTF-8 becomes ``\\xNN``, a lone surrogate ``\\udNNN``, a NUL ``\\x00``.
    """
    if isinstance(raw, bytes):
        # An escape stands for at least one byte and a character is at most 4: this prefix
        # holds at least ``limit`` characters of the result.
        text = raw[: limit * 4].decode("utf-8", errors="surrogateescape")
        escape = _escape_bytes_char
    else:
        text = raw
        escape = _escape_str_char
    head = text[:limit]
    if _storable(head):  # the usual case: nothing to escape, one slice
        return head
    # Each character becomes at least one: ``limit`` of them are all that can fit.
    return _escaped(text[:limit], limit, escape)[0]


def ascii_text(raw: str, limit: int) -> str:
    """``raw`` with everything but printable ASCII escaped, at most ``limit`` characters.

    The last resort for a database that refuses even escaped text (an encoding other than
    UTF-8, where a character outside it cannot be stored).
    """
    return _escaped(raw[:limit], limit, _escape_ascii_char)[0]


def bounded_key(key: str, limit: int = DEDUP_KEY_CHARS) -> str:
    """The key itself when it fits ``dead_letters.dedup_key`` and needs no escape, else a
    storable prefix plus the key's SHA-256.

    Cutting or escaping alone would let two keys collide (a long key and its twin, or a NUL and
    the text ``\\x00``), and the second poison entry would then be recorded nowhere (the insert
    does nothing on a conflict); the digest keeps distinct keys distinct.
    """
    if len(key) <= limit and _storable(key):
        return key
    return _with_digest(key, limit, safe_text)


def _with_digest(key: str, limit: int, prefix: Callable[[str, int], str]) -> str:
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()
    return f"{prefix(key, limit - len(digest) - 1)}~{digest}"


def ascii_dead_letter(dl: DeadLetter) -> DeadLetter:
    """The same dead letter with every text field in printable ASCII (see ``ascii_text``)."""

    def opt(value: str | None, limit: int) -> str | None:
        return None if value is None else ascii_text(value, limit)

    return dataclasses.replace(
        dl,
        source=ascii_text(dl.source, SOURCE_CHARS),
        error=ascii_text(dl.error, ERROR_CHARS),
        payload=ascii_text(dl.payload, PAYLOAD_PREFIX_CHARS),
        field=opt(dl.field, FIELD_CHARS),
        # A key already in printable ASCII stays as it was; another gets its digest, as in
        # bounded_key.
        dedup_key=None if dl.dedup_key is None else _ascii_key(dl.dedup_key),
        event_type=opt(dl.event_type, EVENT_TYPE_CHARS),
        event_id=opt(dl.event_id, EVENT_ID_CHARS),
        producer=opt(dl.producer, PRODUCER_CHARS),
    )


def _ascii_key(key: str) -> str:
    if len(key) <= DEDUP_KEY_CHARS and all(" " <= ch <= "~" for ch in key):
        return key
    return _with_digest(key, DEDUP_KEY_CHARS, ascii_text)


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
        source=safe_text(source, SOURCE_CHARS),
        error=safe_text(error, ERROR_CHARS),
        payload=safe_text(raw),
        payload_bytes=min(len(data), MAX_PAYLOAD_BYTES),
        payload_sha256=hashlib.sha256(data).hexdigest(),
        field=None if field is None else safe_text(field, FIELD_CHARS),
        dedup_key=None if dedup_key is None else bounded_key(dedup_key),
        event_type=None if event_type is None else safe_text(event_type, EVENT_TYPE_CHARS),
        event_id=None if event_id is None else safe_text(event_id, EVENT_ID_CHARS),
        producer=None if producer is None else safe_text(producer, PRODUCER_CHARS),
    )
