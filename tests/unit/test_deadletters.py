"""Dead letters keep the size and digest of the whole payload and text PostgreSQL can store."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.daemon.deadletters import (
    PAYLOAD_PREFIX_CHARS,
    DeadLetter,
    ascii_dead_letter,
    bounded_key,
    make_dead_letter,
    safe_text,
)


def storable(text: str) -> bool:
    """True when PostgreSQL can store the text: valid UTF-8 and no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def test_small_payload_is_kept_whole() -> None:
    raw = b'{"type": "nope", "event_id": "e1"}'
    dl = make_dead_letter(raw, "type: unknown event type 'nope'", source="stream", field="type")
    assert dl.payload == raw.decode()
    assert dl.payload_bytes == len(raw)
    assert dl.payload_sha256 == hashlib.sha256(raw).hexdigest()
    assert dl.error == "type: unknown event type 'nope'"
    assert dl.field == "type"
    assert dl.source == "stream"


def test_str_payload_size_and_digest_are_of_its_utf8_bytes() -> None:
    raw = '{"component": "한국"}'
    dl = make_dead_letter(raw, "bad", source="submit")
    encoded = raw.encode("utf-8")
    assert dl.payload == raw
    assert dl.payload_bytes == len(encoded) == len(raw) + 4
    assert dl.payload_sha256 == hashlib.sha256(encoded).hexdigest()


def test_payload_of_exactly_the_prefix_size_is_kept_whole() -> None:
    raw = b"x" * PAYLOAD_PREFIX_CHARS
    dl = make_dead_letter(raw, "too big", source="s")
    assert dl.payload == raw.decode()


def test_oversize_payload_keeps_a_prefix_and_describes_the_whole() -> None:
    raw = b"{" + b"a" * (2 * 1024 * 1024) + b"}"
    dl = make_dead_letter(raw, "event is 2097154 bytes, larger than max_event_bytes", source="s")
    assert len(dl.payload) == PAYLOAD_PREFIX_CHARS
    assert raw.decode().startswith(dl.payload)
    assert dl.payload_bytes == len(raw)
    assert dl.payload_sha256 == hashlib.sha256(raw).hexdigest()
    assert len(dl.payload_sha256) == 64


def test_oversize_str_payload_keeps_a_prefix() -> None:
    raw = "한" * (PAYLOAD_PREFIX_CHARS + 10)
    dl = make_dead_letter(raw, "too big", source="s")
    assert dl.payload == "한" * PAYLOAD_PREFIX_CHARS
    assert dl.payload_bytes == 3 * len(raw)
    assert dl.payload_sha256 == hashlib.sha256(raw.encode()).hexdigest()


def test_oversize_multibyte_bytes_cut_mid_character_stays_valid() -> None:
    raw = "é".encode() * (PAYLOAD_PREFIX_CHARS * 3)
    dl = make_dead_letter(raw, "too big", source="s")
    assert storable(dl.payload)
    assert dl.payload.startswith("é" * 100)
    assert len(dl.payload) <= PAYLOAD_PREFIX_CHARS
    assert dl.payload_bytes == len(raw)


def test_invalid_utf8_bytes_are_escaped() -> None:
    raw = b'{"a": "\xff\xfe ok \xed\xa0\x80"}'
    dl = make_dead_letter(raw, "not valid JSON", source="s")
    assert dl.payload == '{"a": "\\xff\\xfe ok \\xed\\xa0\\x80"}'
    assert storable(dl.payload)
    assert dl.payload_bytes == len(raw)
    assert dl.payload_sha256 == hashlib.sha256(raw).hexdigest()


def test_lone_surrogates_in_str_are_escaped() -> None:
    raw = '{"component": "a\ud800b\udfff"}'
    dl = make_dead_letter(raw, "contains a lone surrogate", source="submit")
    assert dl.payload == '{"component": "a\\ud800b\\udfff"}'
    assert storable(dl.payload)
    encoded = raw.encode("utf-8", errors="surrogatepass")
    assert dl.payload_bytes == len(encoded)
    assert dl.payload_sha256 == hashlib.sha256(encoded).hexdigest()


@pytest.mark.parametrize("raw", [b'{"a": "x\x00y"}', '{"a": "x\x00y"}'])
def test_nul_is_escaped(raw: bytes | str) -> None:
    dl = make_dead_letter(raw, "NUL\x00in error", source="s", field="a\x00")
    assert dl.payload == '{"a": "x\\x00y"}'
    assert dl.error == "NUL\\x00in error"
    assert dl.field == "a\\x00"
    assert storable(dl.payload)
    assert dl.payload_bytes == 12


def test_descriptive_fields_are_made_storable_and_bounded() -> None:
    dl = make_dead_letter(
        b"{}",
        "e\ud800" * 3000,
        source="s",
        field="f" * 500,
        dedup_key="stream:1-0",
        event_type="t\x00" * 100,
        event_id="i" * 500,
        producer="p\udc80" * 100,
    )
    assert isinstance(dl, DeadLetter)
    for text in (dl.error, dl.field, dl.event_type, dl.event_id, dl.producer):
        assert text is not None
        assert storable(text)
    assert len(dl.error) <= 2000
    assert dl.field == "f" * 100
    assert dl.event_id == "i" * 100
    assert dl.event_type is not None
    assert len(dl.event_type) <= 50 * 4
    assert dl.dedup_key == "stream:1-0"


def test_optional_fields_default_to_none() -> None:
    dl = make_dead_letter(b"x", "bad", source="s")
    assert (dl.field, dl.dedup_key, dl.event_type, dl.event_id, dl.producer) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_safe_text_limit() -> None:
    assert safe_text("abcdef", 3) == "abc"
    assert safe_text(b"abcdef", 3) == "abc"
    assert safe_text(b"", 3) == ""


_PAYLOAD_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(
        ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\\", "é", "한", "\U0001f600"]
    ),
)


@settings(max_examples=300, database=None, deadline=None)
@given(st.lists(_PAYLOAD_CHARS, max_size=200).map("".join))
def test_property_any_str_payload_becomes_storable(raw: str) -> None:
    dl = make_dead_letter(raw, "bad", source="s")
    assert storable(dl.payload)
    encoded = raw.encode("utf-8", errors="surrogatepass")
    assert dl.payload_bytes == len(encoded)
    assert dl.payload_sha256 == hashlib.sha256(encoded).hexdigest()


@settings(max_examples=300, database=None, deadline=None)
@given(st.binary(max_size=300))
def test_property_any_bytes_payload_becomes_storable(raw: bytes) -> None:
    dl = make_dead_letter(raw, "bad", source="s")
    assert storable(dl.payload)
    assert dl.payload_bytes == len(raw)
    assert dl.payload_sha256 == hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    if "\x00" not in text and "\\" not in text:
        assert dl.payload == text  # valid text is kept as it is


# --- every field bounded after escaping -----------------------------------------------------

# Each column of dead_letters that has a width, with the make_dead_letter keyword that fills it.
_WIDTHS = {"field": 100, "event_type": 50, "event_id": 100, "producer": 50, "dedup_key": 300}


@pytest.mark.parametrize("column", sorted(_WIDTHS))
@pytest.mark.parametrize("char", ["\x00", "\ud800", "\udcff", "é", "\U0001f600"])
def test_a_field_at_its_width_stays_within_it_once_escaped(column: str, char: str) -> None:
    width = _WIDTHS[column]
    dl = make_dead_letter(b"{}", "bad", source="s", **{column: char * width})
    value = getattr(dl, column)
    assert value is not None
    assert len(value) <= width
    assert storable(value)


def test_the_cut_never_falls_inside_an_escape() -> None:
    # 25 NULs fill 100 characters exactly; a 26th would need 4 more.
    assert safe_text("\x00" * 26, 100) == "\\x00" * 25
    assert safe_text("a" + "\x00" * 26, 100) == "a" + "\\x00" * 24
    assert safe_text(b"\xff" * 30, 10) == "\\xff\\xff"


def test_long_or_unstorable_keys_stay_distinct_and_bounded() -> None:
    a, b = "k" * 400 + "a", "k" * 400 + "b"
    assert bounded_key(a) != bounded_key(b)
    assert len(bounded_key(a)) <= 300
    nul_a, nul_b = "\x00" * 100 + "a", "\x00" * 100 + "b"
    assert bounded_key(nul_a) != bounded_key(nul_b)
    assert len(bounded_key(nul_a)) <= 300 and storable(bounded_key(nul_a))
    assert bounded_key("stream:ingestd:events:1-0") == "stream:ingestd:events:1-0"
    # An escape must not make a key meet another whose text is that escape.
    assert bounded_key("k\x00") != bounded_key("k\\x00") == "k\\x00"
    assert bounded_key("k\udc80") != bounded_key("k\\udc80")


def test_ascii_fallback_is_printable_ascii_and_bounded() -> None:
    dl = make_dead_letter(
        "한\x00\U0001f600" * 10_000,
        "é" * 3000,
        source="s",
        field="\ud800" * 100,
        dedup_key="키" * 300,
        event_type="é" * 50,
        event_id="\x01" * 100,
        producer="p" * 50,
    )
    plain = ascii_dead_letter(dl)
    for name, width in {**_WIDTHS, "payload": PAYLOAD_PREFIX_CHARS, "error": 2000}.items():
        value = getattr(plain, name)
        assert value is not None
        assert len(value) <= width, name
        assert all(" " <= ch <= "~" for ch in value), name
    assert plain.payload_sha256 == dl.payload_sha256
