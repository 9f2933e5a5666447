"""The CSV layout: headers, row -> event (the wire rules), and the streaming reader."""

from __future__ import annotations

import io

import pytest

from ingestd.errors import InvalidEvent
from ingestd.wire import csv_format, events
from ingestd.wire.csv_format import CSV_TABLES_BY_NAME, CsvLayoutError, RecordReader, RowConverter
from tests.samples import POSITION_HEADER, SPREAD_HEADER, SPREAD_PRICES

SPREADS = CSV_TABLES_BY_NAME["spreads"]
POSITIONS = CSV_TABLES_BY_NAME["positions"]


def records(data: bytes) -> list[csv_format.Record]:
    """Every record of a file's bytes."""
    return list(RecordReader(io.BytesIO(data)))


def spreads_converter(header: str = SPREAD_HEADER) -> RowConverter:
    """A converter for spreads.csv with this header."""
    return RowConverter(SPREADS, header.split(","), source="spreads.csv")


def row(**changes: str) -> list[str]:
    """A valid spreads row (header order) with some fields changed."""
    values = {
        **SPREAD_PRICES,
        "is_opportunity": "true",
        "timestamp": "2025-11-15T03:40:15.123Z",
    }
    values.update(changes)
    return list(values.values())


def test_layout_headers_are_the_documented_layout() -> None:
    # The table's columns minus id/position_id/created_at/updated_at, plus position_key, plus the
    # optional event_id and producer.
    assert SPREADS.columns == (*SPREAD_HEADER.split(","), "event_id", "producer")
    assert POSITIONS.columns == (*POSITION_HEADER.split(","), "event_id", "producer")
    orders = CSV_TABLES_BY_NAME["orders"].columns
    assert orders[0] == "position_key" and "position_id" not in orders and "id" not in orders
    assert "created_at" not in CSV_TABLES_BY_NAME["trades"].columns
    assert [t.file_name for t in csv_format.CSV_TABLES] == [
        "positions.csv",
        "orders.csv",
        "trades.csv",
        "spreads.csv",
        "fx_rates.csv",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(text, "true") for text in ("true", "True", "t", "1", "TRUE")],
        *[(text, "false") for text in ("false", "False", "f", "0", "")],
    ],
)
def test_booleans(text: str, expected: str) -> None:
    ev = spreads_converter().event(row(is_opportunity=text), 2)
    assert ev.values["is_opportunity"] == expected


def test_bad_boolean_names_the_field() -> None:
    with pytest.raises(InvalidEvent) as excinfo:
        spreads_converter().event(row(is_opportunity="yes"), 2)
    assert excinfo.value.field == "is_opportunity"


def test_numbers_keep_every_digit_and_round_like_postgresql() -> None:
    conv = spreads_converter()
    ev = conv.event(row(upbit_price="140123456.125", spread_pct="1e-05", binance_price=" 2 "), 2)
    assert ev.values["upbit_price"] == "140123456.13"
    assert ev.values["spread_pct"] == "0.0000"  # str(float) writes small numbers with exponents
    assert ev.values["binance_price"] == "2"
    for bad, field in [("NaN", "upbit_price"), ("1,5", "spread_pct"), ("1e400", "spread_pct")]:
        with pytest.raises(InvalidEvent) as excinfo:
            conv.event(row(**{field: bad}), 2)
        assert excinfo.value.field == field


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-11-15T12:40:15+09:00", "2025-11-15T12:40:15+09:00"),
        ("2025-11-15T12:40:15+0900", "2025-11-15T12:40:15+09:00"),  # strftime's %z
        ("2025-11-15 03:40:15.5Z", "2025-11-15T03:40:15.5+00:00"),  # str(datetime) style
    ],
)
def test_times_with_an_offset(text: str, expected: str) -> None:
    assert spreads_converter().event(row(timestamp=text), 2).values["timestamp"] == expected


def test_naive_time_is_a_bad_row() -> None:
    with pytest.raises(InvalidEvent, match="naive") as excinfo:
        spreads_converter().event(row(timestamp="2025-11-15T03:40:15"), 2)
    assert excinfo.value.field == "timestamp"


def test_derived_id_is_file_and_line_and_explicit_id_wins() -> None:
    conv = spreads_converter()
    assert conv.event(row(), 7).event_id == "csv:spreads.csv:7"
    with_id = spreads_converter(SPREAD_HEADER + ",event_id,producer")
    ev = with_id.event([*row(), "c1-42", "collector"], 7)
    assert (ev.event_id, ev.producer) == ("c1-42", "collector")
    ev = with_id.event([*row(), "", ""], 8)
    assert (ev.event_id, ev.producer) == ("csv:spreads.csv:8", None)
    long_source = RowConverter(SPREADS, SPREAD_HEADER.split(","), source="h/" + "x" * 120)
    ids = {long_source.event(row(), n).event_id for n in (1, 2)}
    assert len(ids) == 2 and all(len(i) <= 100 for i in ids)


def test_default_producer_for_files_without_the_column() -> None:
    conv = RowConverter(SPREADS, SPREAD_HEADER.split(","), source="s", default_producer="paper")
    assert conv.event(row(), 2).producer == "paper"


def test_field_count_must_match_the_header() -> None:
    with pytest.raises(InvalidEvent, match="9 field"):
        spreads_converter().event([*row(), "extra"], 2)
    with pytest.raises(InvalidEvent, match="7 field"):
        spreads_converter().event(row()[:7], 2)


def test_unknown_missing_and_repeated_columns_are_clear_errors() -> None:
    with pytest.raises(CsvLayoutError, match=r"unknown column\(s\) 'colour'"):
        spreads_converter(SPREAD_HEADER + ",colour")
    with pytest.raises(CsvLayoutError, match=r"missing required column\(s\): spread_pct"):
        spreads_converter(SPREAD_HEADER.replace(",spread_pct,", ","))
    with pytest.raises(CsvLayoutError, match="repeated"):
        spreads_converter(SPREAD_HEADER + ",symbol")
    # Optional columns may be absent (files written before a column existed).
    ev = spreads_converter(SPREAD_HEADER.replace(",is_opportunity", "")).event(
        [v for i, v in enumerate(row()) if i != 6], 2
    )
    assert ev.values["is_opportunity"] == "false"


def test_position_rows_by_status() -> None:
    conv = RowConverter(POSITIONS, POSITION_HEADER.split(","), source="positions.csv")
    entry = ["pos_1", "BTC", "up", "0.01", "1000", "2", "1.5"]
    times = ["2025-11-15T03:40:15Z"]
    opened = conv.event([*entry, "", "", "", "", "", "OPEN", *times, ""], 2)
    assert opened.type == "position_open" and opened.values.get("pnl_krw") is None
    exits = ["990", "2.1", "0.2", "100", "0.5"]
    closing = conv.event([*entry, *exits, "CLOSED", *times, "2025-11-15T04:00:00Z"], 3)
    assert closing.type == "position_close" and closing.values["pnl_krw"] == "100"
    assert closing.values["symbol"] == "BTC"  # entry columns travel with the close
    # No status: closed when timestamp_close is set.
    inferred = conv.event([*entry, *exits, "", *times, "2025-11-15T04:00:00Z"], 4)
    assert inferred.type == "position_close"
    with pytest.raises(InvalidEvent) as excinfo:
        conv.event([*entry, "990", "", "", "", "", "OPEN", *times, ""], 5)
    assert excinfo.value.field == "exit_upbit_price"
    with pytest.raises(InvalidEvent) as excinfo:
        conv.event([*entry, *exits, "DONE", *times, "2025-11-15T04:00:00Z"], 6)
    assert excinfo.value.field == "status"
    with pytest.raises(InvalidEvent) as excinfo:  # CLOSED needs the exit columns
        conv.event([*entry, "", "", "", "", "", "CLOSED", *times, ""], 7)
    assert excinfo.value.field == "exit_upbit_price"


def test_reader_bom_crlf_quotes_blank_lines_and_line_numbers() -> None:
    data = b'\xef\xbb\xbfa,b\r\n1,2\r\n\r\n"x, y","multi\r\nline ""quoted"""\r\n3,4\r\n\r\n'
    recs = records(data)
    assert [r.fields for r in recs] == [
        ["a", "b"],
        ["1", "2"],
        ["x, y", 'multi\r\nline "quoted"'],
        ["3", "4"],
    ]
    assert [r.line for r in recs] == [1, 2, 4, 6]  # a record is named by its first line
    assert [r.end_line for r in recs] == [1, 2, 5, 6]
    assert recs[2].raw == '"x, y","multi\r\nline ""quoted"""\r\n'
    assert all(r.error is None and r.terminated for r in recs)
    # Byte offsets count the file's bytes (the BOM too): reading on from one gives the rest.
    f = io.BytesIO(data)
    f.seek(recs[2].end_offset)
    rest = list(RecordReader(f, offset=recs[2].end_offset, line=recs[2].end_line))
    assert [(r.line, r.fields) for r in rest] == [(6, ["3", "4"])]


def test_reader_final_line_without_line_end_and_empty_file() -> None:
    recs = records(b"a,b\n1,2")
    assert recs[-1].fields == ["1", "2"] and not recs[-1].terminated
    assert records(b"") == []
    assert records(b"\n\n") == []
    reader = RecordReader(io.BytesIO(b"a,b\n1,2\n\n"))
    assert len(list(reader)) == 2
    assert (reader.offset, reader.line, reader.terminated) == (9, 3, True)


def test_reader_reports_malformed_records_and_goes_on() -> None:
    recs = records(b'a,b\n1,"2"x\n3,4\n"unterminated,5\n')
    assert recs[1].fields is None and recs[1].error is not None
    assert "malformed CSV" in recs[1].error
    assert recs[2].fields == ["3", "4"]
    assert recs[3].fields is None and recs[3].line == 4


def test_reader_flags_invalid_utf8() -> None:
    recs = records(b"a,b\n\xff\xfe,2\n3,4\n")
    assert recs[1].error == "not valid UTF-8"
    assert recs[2].error is None


def test_row_of_writes_the_validated_text() -> None:
    ev = events.parse_event(
        {
            "type": "spread",
            "event_id": "e1",
            "producer": "collector",
            "symbol": "B,TC",
            "upbit_price": "1.125",
            "binance_price": "2",
            "binance_price_krw": "3",
            "spread_pct": "4",
            "net_spread_pct": "5",
            "timestamp": "2025-11-15T03:40:15Z",
        }
    )
    assert csv_format.row_of(SPREADS, ev) == [
        "B,TC",
        "1.13",
        "2",
        "3",
        "4",
        "5",
        "false",
        "2025-11-15T03:40:15+00:00",
        "e1",
        "collector",
    ]
