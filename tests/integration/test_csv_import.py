"""import-csv and verify-csv against real PostgreSQL, with generated CSV files of every case."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import shutil
from decimal import Decimal as D
from pathlib import Path

import asyncpg
import pytest

from ingestd.commands.csv_import import INCOMPLETE_LAST_LINE, run_import
from ingestd.commands.csv_verify import run_verify
from ingestd.settings import Settings
from tests.samples import POSITION_HEADER, RECENT_DAY, SPREAD_HEADER, spread_rows, write_csv

pytestmark = pytest.mark.pg


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No retention: the sample history (tests/samples.py, from 2025) is older than the 90-day
    retention of spreads, and these tests are about importing it, not about refusing old events."""
    return settings.replace(
        **{"retention.spreads_days": 0, "retention.fx_rates_days": 0, "retention.orders_days": 0}
    )


FX_HEADER = "pair,rate,source,timestamp"
ORDER_HEADER = (
    "position_key,symbol,venue,side,qty,price_theoretical,price_effective,slippage_bps,leg_id,"
    "order_id,timestamp"
)


async def imported(settings: Settings, directory: Path, **kwargs: object) -> tuple[int, str, str]:
    """Run import-csv in-process: (exit code, summary, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = await run_import(
        settings,
        directory,
        progress_mode="off",
        out=out,
        err=err,
        **kwargs,  # type: ignore[arg-type]
    )
    return code, out.getvalue(), err.getvalue()


async def verified(settings: Settings, directory: Path) -> tuple[int, str]:
    """Run verify-csv in-process: (exit code, report)."""
    out, err = io.StringIO(), io.StringIO()
    code = await run_verify(settings, directory, out=out, err=err)
    return code, out.getvalue() + err.getvalue()


TABLES = ("spreads", "fx_rates", "orders", "trades", "positions", "dead_letters")


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    """Rows per table."""
    return {n: int(await db.fetchval(f"SELECT count(*) FROM {n}")) for n in TABLES}


def real_world_directory(path: Path) -> Path:
    """Every case a real CSV file contains, across the five files."""
    path.mkdir()
    spreads = [
        "BTC,140123456.12,98012.12345678,135800000.55,3.1836,2.9836,True,2025-11-15T12:40:15+09:00",
        "ETH,5200000.5,3700.1,5199999.99,1.5,1.3,f,2025-11-15 03:40:16.5Z",
        "XRP,850,0.6,849.1,0.1,-0.1,,2025-11-15T03:40:17+0000",  # empty optional: default false
        "XRP,850,0.6,849.1,abc,-0.1,0,2025-11-15T03:40:18Z",  # bad decimal
        "XRP,850,0.6,849.1,0.1,-0.1,1,2025-11-15T03:40:19",  # naive time
        'XRP,850,0.6,849.1,0.1,"-0.1",t,2025-11-15T03:40:20Z',  # a quoted number is fine
        "XRP,850,0.6,849.1,0.1,-0.1,1,2025-11-15T03:40:21Z,extra",  # too many fields
        "SOL,1e2,2.5E-1,100,0.5,0.4,FALSE,2025-11-15T03:40:22Z",  # exponents, exactly
    ]
    data = ("\r\n".join([SPREAD_HEADER, *spreads]) + "\r\n\r\n").encode("utf-8")
    (path / "spreads.csv").write_bytes(b"\xef\xbb\xbf" + data)  # BOM, CRLF, trailing empty line
    fx = [
        'USDKRW,1385.5,"api, v2\nfallback",2025-11-15T03:40:15Z',  # quoted comma and newline
        "USDKRW,1385.75,,2025-11-15T03:40:16Z",  # empty optional -> NULL
        "EURKRW,1500.123456789,static,2025-11-15T03:40:17Z",  # beyond the scale: rounded
    ]
    write_csv(path / "fx_rates.csv", FX_HEADER, fx)
    write_csv(path / "orders.csv", ORDER_HEADER, [])  # header only
    (path / "trades.csv").write_bytes(b"")  # empty file
    positions = [
        "pos_001,BTC,upbit_short_binance_long,0.01,140123456.12,98012.12345678,3.1836,"
        ",,,,,OPEN,2025-11-15T03:40:15Z,",
        "pos_002,ETH,upbit_long_binance_short,1.5,5200000,3700.1,1.2,,,,,,OPEN,"
        "2025-11-15T03:41:00Z,",
        "pos_001,BTC,upbit_short_binance_long,0.01,140123456.12,98012.12345678,3.1836,"
        "140000000,98100.5,0.5,12345.67,0.8812,CLOSED,2025-11-15T03:40:15Z,2025-11-15T04:00:00Z",
    ]
    write_csv(path / "positions.csv", POSITION_HEADER, positions)
    return path


async def test_real_csv_files_import_exactly_and_bad_rows_are_reported(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = real_world_directory(tmp_path / "in")
    code, summary, err = await imported(settings, directory)
    assert code == 1  # rows went to dead_letters
    for line, reason in [
        (5, "spread_pct: 'abc' is not a decimal number"),
        (6, "timestamp: '2025-11-15T03:40:19' has no offset (naive time)"),
        (8, "the row has 9 field(s), the header has 8"),
    ]:
        assert f"spreads.csv:{line}: {reason}" in err
    assert await counts(db) == {
        "spreads": 5,
        "fx_rates": 3,
        "orders": 0,
        "trades": 0,
        "positions": 2,
        "dead_letters": 3,
    }
    btc = await db.fetchrow("SELECT * FROM spreads WHERE symbol = 'BTC'")
    assert btc is not None
    assert btc["upbit_price"] == D("140123456.12") and btc["is_opportunity"] is True
    assert btc["event_id"] == "csv:spreads.csv:2"
    assert btc["timestamp"].isoformat() == "2025-11-15T03:40:15+00:00"
    sol = await db.fetchrow("SELECT * FROM spreads WHERE symbol = 'SOL'")
    assert (
        sol is not None and sol["upbit_price"] == D("100.00") and sol["binance_price"] == D("0.25")
    )
    xrp = await db.fetch("SELECT is_opportunity FROM spreads WHERE symbol='XRP' ORDER BY timestamp")
    assert [r[0] for r in xrp] == [False, True]
    fx = await db.fetch("SELECT pair, rate, source FROM fx_rates ORDER BY timestamp")
    assert [tuple(r) for r in fx] == [
        ("USDKRW", D("1385.50000000"), "api, v2\nfallback"),
        ("USDKRW", D("1385.75000000"), None),
        ("EURKRW", D("1500.12345679"), "static"),
    ]
    pos = await db.fetchrow("SELECT * FROM positions WHERE position_key = 'pos_001'")
    assert pos is not None and pos["status"] == "CLOSED" and pos["pnl_krw"] == D("12345.67")
    dead = await db.fetch("SELECT dedup_key, field, source, payload FROM dead_letters ORDER BY id")
    assert [r["dedup_key"] for r in dead] == [f"csv:spreads.csv:{n}" for n in (5, 6, 8)]
    assert [r["field"] for r in dead] == ["spread_pct", "timestamp", None]
    assert dead[0]["source"] == "csv" and dead[0]["payload"].startswith("XRP,850,0.6,849.1,abc")
    lines = {line.split()[0]: line.split() for line in summary.splitlines()[2:]}
    assert lines["spreads"][2:5] == ["imported", "8", "5"]
    assert lines["trades"][2] == "empty" and lines["orders"][3] == "0"

    # Re-import: nothing added, no dead letter twice (checkpoints, then without them).
    before = await counts(db)
    code, summary, err = await imported(settings, directory)
    assert code == 0 and "spreads.csv:5" not in err
    assert "up to date" in summary
    assert await counts(db) == before
    code, _, err = await imported(settings, directory, resume=False)
    assert code == 1 and "spreads.csv:5: spread_pct" in err  # reported again, stored once
    assert await counts(db) == before

    code, report = await verified(settings, directory)
    assert code == 0, report
    assert "3 row(s) rejected by import-csv" in report
    assert "spreads.csv:6: timestamp: '2025-11-15T03:40:19' has no offset" in report


async def test_unknown_or_missing_columns_refuse_that_file_only(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER + ",colour", [])
    write_csv(
        tmp_path / "fx_rates.csv", "pair,source,timestamp", ["USDKRW,api,2025-11-15T03:40:15Z"]
    )
    write_csv(tmp_path / "positions.csv", POSITION_HEADER, [])
    write_csv(
        tmp_path / "orders.csv",
        ORDER_HEADER,
        [
            "pos_9,BTC,upbit,buy,0.01,1,,,pos_9_leg_0,,2025-11-15T03:40:15Z",
        ],
    )
    code, summary, err = await imported(settings, tmp_path)
    assert code == 1
    assert "spreads.csv: unknown column(s) 'colour' (the spreads layout has: symbol," in err
    assert "fx_rates.csv: missing required column(s): rate" in err
    assert [ln.split()[2] for ln in summary.splitlines()[2:]] == [
        "imported",
        "imported",
        "absent",
        "refused",
        "refused",
    ]
    assert (await counts(db))["orders"] == 1  # the other files were imported all the same
    code, report = await verified(settings, tmp_path)
    assert code == 1 and "refused" in report


async def test_appended_rows_are_the_only_ones_added(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    first, fresh = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    path = write_csv(first / "spreads.csv", SPREAD_HEADER, spread_rows(1200))
    assert (await imported(settings, first, batch_rows=500))[0] == 0
    assert (await counts(db))["spreads"] == 1200
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(spread_rows(300, start=1200)) + "\n")
    code, summary, err = await imported(settings, first, batch_rows=500)
    assert code == 0 and "resuming at line 1202" in err
    assert "line 1202" in summary
    assert (await counts(db))["spreads"] == 1500
    # The same grown file elsewhere is the same source (same name, same bytes): up to date.
    fresh.mkdir()
    shutil.copy(path, fresh / "spreads.csv")
    code, summary, _ = await imported(settings, fresh, batch_rows=500)
    assert code == 0 and "up to date" in summary
    # Without the checkpoint every row is read: ids from the line numbers match, none is added.
    code, summary, _ = await imported(settings, fresh, batch_rows=500, resume=False)
    assert code == 0
    assert summary.splitlines()[5].split()[3:6] == ["1,500", "0", "1,500"]
    assert (await counts(db))["spreads"] == 1500
    want = sum(D(r.split(",")[1]) for r in spread_rows(1500))
    assert await db.fetchval("SELECT sum(upbit_price) FROM spreads") == want
    code, report = await verified(settings, first)
    assert code == 0, report


async def test_a_replaced_file_without_event_ids_is_refused_not_imported_under_old_ids(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(100))
    assert (await imported(settings, tmp_path))[0] == 0
    # Replaced, not appended to: the same times, corrected prices, and a bad row at line 7. Under
    # the old ids (csv:spreads.csv:<line>) every row would be "already there".
    rows = [r.replace(",98012.12345678,", ",98012.12345679,") for r in spread_rows(100)]
    rows[5] = rows[5].replace(",3.1836,", ",3.18x6,")
    write_csv(path, SPREAD_HEADER, rows)
    for resume in (True, False):
        code, summary, err = await imported(settings, tmp_path, resume=resume)
        assert code == 1, err
        assert "spreads.csv: refused: this is not the file imported before under this name" in err
        assert "bytes differ from those of the file imported before" in err
        assert "distinct --id-prefix" in err
        assert "rows already imported are not added again" not in err
        assert "refused" in summary
    assert await counts(db) == {**dict.fromkeys(TABLES, 0), "spreads": 100}
    code, report = await verified(settings, tmp_path)
    assert code == 1 and "import-csv refuses it. If it replaced that file" in report
    # With a prefix of its own it is another source: every row lands, the bad one is recorded.
    code, _, err = await imported(settings, tmp_path, id_prefix="rotated-1")
    assert code == 1 and "rotated-1/spreads.csv:7: spread_pct" in err
    assert (await counts(db))["spreads"] == 199
    corrected = "SELECT count(*) FROM spreads WHERE binance_price = 98012.12345679"
    assert await db.fetchval(corrected) == 99
    assert await db.fetchval("SELECT dedup_key FROM dead_letters") == "csv:rotated-1/spreads.csv:7"
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, id_prefix="rotated-1", out=out) == 0, out
    # A shorter file cannot be shown to be the same one: refused as well.
    write_csv(path, SPREAD_HEADER, spread_rows(5, start=500))
    code, _, err = await imported(settings, tmp_path)
    assert code == 1 and "(it is shorter (" in err and "distinct --id-prefix" in err
    assert (await counts(db))["spreads"] == 199


async def test_a_replaced_file_with_event_ids_is_read_from_the_start(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    header = SPREAD_HEADER + ",event_id"
    path = write_csv(
        tmp_path / "spreads.csv", header, [f"{r},a-{i}" for i, r in enumerate(spread_rows(10))]
    )
    assert (await imported(settings, tmp_path))[0] == 0
    write_csv(path, header, [f"{r},b-{i}" for i, r in enumerate(spread_rows(10, start=10))])
    code, _, err = await imported(settings, tmp_path)
    assert code == 0, err
    assert "is not the file imported before under this name" in err
    assert "Rows whose event_id is already in the database are not added again" in err
    assert (await counts(db))["spreads"] == 20


async def test_an_edited_file_with_the_same_start_is_read_again_honestly(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    rows = spread_rows(3000)  # more than the 64 KiB head
    path = write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, rows)
    assert (await imported(settings, tmp_path))[0] == 0
    rows[2500] = rows[2500].replace(",3.1836,", ",3.1837,")
    write_csv(path, SPREAD_HEADER, rows)
    code, _, err = await imported(settings, tmp_path)
    assert code == 1, err  # the edited row is a conflict: the stored row stays
    assert "changed since its last import (its start is the same" in err
    assert "one whose other values were edited is a conflict" in err
    assert "spreads.csv:2502: conflict: spreads already holds event csv:spreads.csv:2502" in err
    assert (await counts(db))["spreads"] == 3000
    assert await db.fetchval("SELECT dedup_key FROM dead_letters") == "csv:spreads.csv:2502"
    code, report = await verified(settings, tmp_path)
    # verify-csv lists the conflict with the rows in dead_letters, apart from mismatches.
    assert code == 0 and "spreads.csv:2502: conflict: spreads already holds event" in report


async def test_last_line_without_line_end_is_read_again_next_time(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    rows = spread_rows(3)
    path = tmp_path / "spreads.csv"
    path.write_text("\n".join([SPREAD_HEADER, *rows[:2], rows[2][:20]]), encoding="utf-8")
    code, summary, err = await imported(settings, tmp_path)  # the producer is still writing it
    assert code == 2, err  # not complete yet: run it again
    assert f"spreads.csv:4: {INCOMPLETE_LAST_LINE}" in err
    assert "incomplete" in summary
    assert await counts(db) == {**dict.fromkeys(TABLES, 0), "spreads": 2}  # no dead letter
    path.write_text("\n".join([SPREAD_HEADER, *rows]) + "\n", encoding="utf-8")
    code, _, err = await imported(settings, tmp_path)
    assert code == 0 and "resuming at line 4" in err
    assert (await counts(db))["spreads"] == 3


async def test_a_half_flushed_last_row_that_still_validates_is_never_imported(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # Columns in another order, so that a number ends the row: "2.9836" cut to "2.98" is valid.
    header = (
        "symbol,upbit_price,binance_price,binance_price_krw,spread_pct,is_opportunity,"
        "timestamp,net_spread_pct"
    )
    rows = [
        f"BTC,14012345{i}.12,98012.12345678,135800000.55,3.1836,true,2025-11-15T03:40:1{i}Z,2.9836"
        for i in range(3)
    ]
    path = tmp_path / "spreads.csv"
    path.write_text("\n".join([header, *rows[:2], rows[2][:-2]]), encoding="utf-8")
    code, _, err = await imported(settings, tmp_path)
    assert code == 2 and f"spreads.csv:4: {INCOMPLETE_LAST_LINE}" in err
    assert (await counts(db))["spreads"] == 2
    code, report = await verified(settings, tmp_path)  # consistent: not compared, noted
    assert code == 0, report
    assert "spreads.csv:4: incomplete last line: not compared" in report
    with path.open("a", encoding="utf-8") as f:  # the producer finishes the row
        f.write("36\n")
    code, _, err = await imported(settings, tmp_path)
    assert code == 0, err
    stored = await db.fetch("SELECT net_spread_pct FROM spreads ORDER BY timestamp")
    assert [r[0] for r in stored] == [D("2.9836")] * 3
    code, report = await verified(settings, tmp_path)
    assert code == 0 and "incomplete" not in report, report


async def test_an_open_quoted_field_at_the_end_is_an_incomplete_record(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "fx_rates.csv"
    # The line ends, but inside a quoted field: the record goes on in the next write.
    path.write_text(
        f'{FX_HEADER}\nUSDKRW,1385.5,upbit,2025-11-15T03:40:15Z\nUSDKRW,1385.6,"api, v2\n',
        encoding="utf-8",
    )
    code, _, err = await imported(settings, tmp_path)
    assert code == 2 and f"fx_rates.csv:3: {INCOMPLETE_LAST_LINE}" in err
    assert (await counts(db))["fx_rates"] == 1 and (await counts(db))["dead_letters"] == 0
    with path.open("a", encoding="utf-8") as f:
        f.write('fallback",2025-11-15T03:40:16Z\n')
    code, _, err = await imported(settings, tmp_path)
    assert code == 0, err
    assert (
        await db.fetchval("SELECT source FROM fx_rates WHERE rate = 1385.6") == "api, v2\nfallback"
    )


async def test_rows_the_database_rejects_are_isolated_and_listed_apart(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # A constraint the wire rules do not know: PostgreSQL rejects the row in the COPY, the sink
    # isolates it by halving, and only it becomes a dead letter.
    await db.execute("ALTER TABLE spreads ADD CONSTRAINT test_positive CHECK (upbit_price > 0)")
    rows = spread_rows(40)
    rows[17] = rows[17].replace("BTC,140123473.12", "BTC,-5")
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, rows)
    code, _, err = await imported(settings, tmp_path, batch_rows=16)
    assert code == 1
    assert "spreads.csv:19: database rejected the row" in err and "23514" in err
    assert (await counts(db))["spreads"] == 39
    key = await db.fetchval("SELECT dedup_key FROM dead_letters")
    assert key == "csv:spreads.csv:19"
    code, report = await verified(settings, tmp_path)
    assert code == 0, report
    assert "spreads.csv:19: database rejected the row" in report


async def test_verify_reports_an_altered_row_a_missing_row_and_ignores_other_sources(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(500))
    real_world = real_world_directory(tmp_path / "rw")
    shutil.copy(real_world / "positions.csv", tmp_path / "positions.csv")
    assert (await imported(settings, tmp_path))[0] == 0
    code, report = await verified(settings, tmp_path)
    assert code == 0 and "MISMATCH" not in report, report
    # Rows from elsewhere (the daemon) in the same time span: information, not a mismatch.
    await db.execute(
        "INSERT INTO spreads (event_id, symbol, upbit_price, binance_price, binance_price_krw,"
        " spread_pct, net_spread_pct, timestamp) SELECT 'stream:' || g, 'BTC', 1, 1, 1, 1, 1,"
        " $1 FROM generate_series(1, 7) AS g",
        dt.datetime.fromisoformat(f"{RECENT_DAY}T03:40:30+00:00"),
    )
    code, report = await verified(settings, tmp_path)
    assert code == 0, report
    assert "7 database row(s) in the file's time span come from elsewhere" in report

    await db.execute(
        "UPDATE spreads SET net_spread_pct = net_spread_pct + 0.0001"
        " WHERE event_id = 'csv:spreads.csv:42'"
    )
    await db.execute("DELETE FROM spreads WHERE event_id = 'csv:spreads.csv:300'")
    await db.execute("UPDATE positions SET pnl_krw = 1 WHERE position_key = 'pos_001'")
    code, report = await verified(settings, tmp_path)
    assert code == 1
    assert "spreads.csv:42: differs in net_spread_pct (event_id=csv:spreads.csv:42" in report
    assert "spreads.csv:300: not in the database (event_id=csv:spreads.csv:300" in report
    assert "sum(net_spread_pct): csv " in report and "sum(upbit_price): csv " in report
    assert "positions.csv:2: differs in pnl_krw (position_key=pos_001)" in report
    table = {ln.split()[0]: ln.split() for ln in report.splitlines()[2:7]}
    assert table["spreads"][2:5] == ["500", "499", "1"] and table["spreads"][-1] == "MISMATCH"
    assert table["positions"][-1] == "MISMATCH" and table["fx_rates"][-1] == "absent"


async def test_verify_an_edited_csv_file_and_rows_never_imported(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    rows = spread_rows(50)
    path = write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, rows)
    assert (await imported(settings, tmp_path))[0] == 0
    rows[9] = rows[9].replace(",3.1836,", ",3.1837,")  # the file changed after the import
    rows.append("BTC,1,2,3,x,5,true,2025-11-15T03:40:15Z")  # a bad row import never saw
    write_csv(path, SPREAD_HEADER, rows)
    code, report = await verified(settings, tmp_path)
    assert code == 1
    assert "spreads.csv:11: differs in spread_pct" in report
    assert "1 bad row(s) not in dead_letters (run import-csv)" in report
    assert "spreads.csv:52: spread_pct: 'x' is not a decimal number" in report


async def test_verify_missing_directory_and_no_files(settings: Settings, tmp_path: Path) -> None:
    assert (await verified(settings, tmp_path / "nope"))[0] == 2
    code, report = await verified(settings, tmp_path)
    assert code == 1 and "no CSV files of the layout" in report
    assert (await imported(settings, tmp_path / "nope"))[0] == 2


async def test_import_of_a_directory_without_the_layout_says_which_names_it_reads(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    # Before: exit 0 and nothing said, for an empty directory and for misspelt names alike.
    code, summary, err = await imported(settings, tmp_path)
    assert code == 2 and summary == ""
    assert "positions.csv, orders.csv, trades.csv, spreads.csv, fx_rates.csv" in err
    assert "no *.csv file at all" in err
    write_csv(tmp_path / "position.csv", "symbol", ["BTC"])
    write_csv(tmp_path / "Spreads.CSV", SPREAD_HEADER, spread_rows(2))
    code, summary, err = await imported(settings, tmp_path)
    assert code == 2 and summary == ""
    assert "Spreads.CSV, position.csv" in err and "positions.csv, orders.csv" in err
    assert len(err.strip().splitlines()) == 1, err
    assert (await counts(db))["spreads"] == 0


async def test_a_file_import_csv_does_not_read_is_named_and_the_exit_is_1(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(3))
    write_csv(tmp_path / "spreads-old.csv", SPREAD_HEADER, spread_rows(3))
    code, _, err = await imported(settings, tmp_path)
    assert code == 1
    assert "spreads-old.csv: not read (import-csv reads positions.csv" in err
    assert (await counts(db))["spreads"] == 3


async def test_import_with_id_prefix_and_default_producer(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(3))
    code, _, _ = await imported(settings, tmp_path, id_prefix="host-a", default_producer="paper")
    assert code == 0
    rows = await db.fetch("SELECT event_id, producer FROM spreads ORDER BY event_id")
    assert [tuple(r) for r in rows] == [(f"csv:host-a/spreads.csv:{n}", "paper") for n in (2, 3, 4)]
    # The same file from another host is other rows.
    assert (await imported(settings, tmp_path, id_prefix="host-b"))[0] == 0
    assert (await counts(db))["spreads"] == 6
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, id_prefix="host-a", out=out) == 0, out.getvalue()


# --- failures of the commands themselves: one redacted line, exit 2, bounded -------------------


async def test_a_database_error_is_one_line_and_exit_2_not_a_traceback(
    settings: Settings, db: asyncpg.Connection, db_dsn: str, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(5))
    name = db_dsn.rsplit("/", 1)[1].split("?", maxsplit=1)[0]
    await db.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '200ms'")
    async with db.transaction():  # a session that holds the tables the commands read first
        await db.execute("LOCK TABLE dead_letters, csv_import_checkpoints IN ACCESS EXCLUSIVE MODE")
        code, report = await verified(settings, tmp_path)
        assert code == 2, report
        assert report.count("\n") == 1, report  # one line
        assert "ingestd verify-csv: stopped: LockNotAvailableError: " in report
        code, _, err = await imported(settings, tmp_path)
        assert code == 2, err
        assert "ingestd import-csv: stopped: LockNotAvailableError: " in err
        assert err.rstrip().endswith("run the same command again to resume")
    assert (await counts(db))["spreads"] == 0


async def test_verify_csv_is_bounded_by_the_command_timeout(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(5))
    quick = settings.replace(**{"storage.postgres.command_timeout_s": 1.0})
    async with db.transaction():  # a hung lock: nothing on the server ends the wait by itself
        await db.execute("LOCK TABLE spreads IN ACCESS EXCLUSIVE MODE")
        async with asyncio.timeout(30):
            code, report = await verified(quick, tmp_path)
    assert code == 2, report
    assert "ingestd verify-csv: stopped: TimeoutError" in report


@pytest.mark.parametrize("command", ["import-csv", "verify-csv"])
async def test_a_password_in_a_driver_error_is_redacted(
    settings: Settings, tmp_path: Path, command: str
) -> None:
    # An unencoded '#' in the password: asyncpg's DSN parser reports the part before it.
    secret = "S3cr3t-" + os.urandom(4).hex()
    broken = settings.replace(
        **{"storage.postgres.dsn": f"postgresql://owner:{secret}#x@127.0.0.1:5432/ingestd"}
    )
    write_csv(tmp_path / "spreads.csv", SPREAD_HEADER, spread_rows(1))
    if command == "import-csv":
        code, _, text = await imported(broken, tmp_path)
    else:
        code, text = await verified(broken, tmp_path)
    assert code == 2
    assert f"ingestd {command}: cannot connect to postgresql://owner:***" in text, text
    assert "ValueError: invalid literal for int()" in text
    assert secret not in text


# --- paper and live apart, stale inputs ----------------------------------------------------------


async def test_positions_of_two_producers_with_one_key_and_spreads_with_input_times(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    entry = "BTC,d,1,1,1,1"
    write_csv(
        tmp_path / "positions.csv",
        POSITION_HEADER + ",producer,mode",
        [
            f"pos_1,{entry},,,,,,OPEN,2025-11-15T03:00:00Z,,paper,paper",
            f"pos_1,{entry},,,,,,OPEN,2025-11-15T03:00:00Z,,live,live",
            f"pos_1,{entry},2,2,2,5.5,1,CLOSED,2025-11-15T03:00:00Z,2025-11-15T04:00:00Z,live,",
        ],
    )
    t = "2025-11-15T03:40:15Z"
    write_csv(
        tmp_path / "spreads.csv",
        SPREAD_HEADER + ",upbit_ts,binance_ts,fx_ts",
        [
            f"BTC,1,1,1,1,1,false,{t},{t},{t},{t}",
            f"ETH,1,1,1,1,1,false,{t},{t},2025-11-15T03:40:11Z,{t}",
            f"XRP,1,1,1,1,1,false,{t},,,",
        ],
    )
    code, summary, err = await imported(settings, tmp_path)
    assert code == 0, err
    rows = {
        r["producer"]: r
        for r in await db.fetch("SELECT * FROM positions WHERE position_key = 'pos_1'")
    }
    assert set(rows) == {"paper", "live"}
    assert (rows["paper"]["status"], rows["paper"]["mode"]) == ("OPEN", "paper")
    assert (rows["live"]["status"], rows["live"]["mode"]) == ("CLOSED", "live")
    assert rows["live"]["pnl_krw"] == D("5.50")
    # Two positions inserted (one per producer), the close of one of them already there.
    line = next(x for x in summary.splitlines() if x.startswith("positions "))
    assert line.split()[3:6] == ["3", "2", "1"]
    stale = {r["symbol"]: r["is_stale"] for r in await db.fetch("SELECT * FROM spreads")}
    assert stale == {"BTC": False, "ETH": True, "XRP": False}
    # Importing again adds nothing: each (producer, key) is there already.
    assert (await imported(settings, tmp_path))[0] == 0
    assert (await counts(db))["positions"] == 2


async def test_verify_compares_positions_by_producer_and_position_key(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two producers' pos_1 are two positions: verify-csv agrees with what import-csv stored and
    names the producer of the one that differs (it compared by position_key alone, and reported
    the two producers' rows as one position)."""
    entry = "BTC,d,1,1,1,1"
    write_csv(
        tmp_path / "positions.csv",
        POSITION_HEADER + ",producer,mode",
        [
            f"pos_1,{entry},,,,,,OPEN,2025-11-15T03:00:00Z,,paper,paper",
            f"pos_1,{entry},2,2,2,5.5,1,CLOSED,2025-11-15T03:00:00Z,2025-11-15T04:00:00Z,live,live",
            f"pos_2,{entry},,,,,,OPEN,2025-11-15T03:00:00Z,,,",
        ],
    )
    assert (await imported(settings, tmp_path))[0] == 0
    code, report = await verified(settings, tmp_path)
    assert code == 0, report
    positions = next(ln.split() for ln in report.splitlines() if ln.startswith("positions "))
    assert positions[2:4] == ["3", "3"], report  # csv rows, db rows: three positions

    await db.execute(
        "UPDATE positions SET pnl_krw = 7 WHERE position_key = 'pos_1' AND producer = 'live'"
    )
    code, report = await verified(settings, tmp_path)
    assert code == 1
    assert "positions.csv:3: differs in pnl_krw (producer=live, position_key=pos_1)" in report
    await db.execute(
        "UPDATE positions SET pnl_krw = 5.5 WHERE position_key = 'pos_1' AND producer = 'live'"
    )
    # Another producer's position under a key of the file is not the file's.
    await db.execute(
        "INSERT INTO positions (position_key, producer, symbol, direction, size, entry_upbit_price,"
        " entry_binance_price, entry_spread_pct, status, timestamp_open)"
        " VALUES ('pos_2', 'other', 'BTC', 'd', 1, 1, 1, 1, 'OPEN', '2025-11-15T03:00:00Z')"
    )
    code, report = await verified(settings, tmp_path)
    assert code == 0, report
    # The position without a producer is named by its key alone; gone, it is missing.
    await db.execute("DELETE FROM positions WHERE position_key = 'pos_2' AND producer IS NULL")
    code, report = await verified(settings, tmp_path)
    assert code == 1
    assert "positions.csv:4: not in the database (position_key=pos_2)" in report


async def test_verify_with_the_producer_given_to_import(settings: Settings, tmp_path: Path) -> None:
    entry = "BTC,d,1,1,1,1"
    write_csv(
        tmp_path / "positions.csv",
        POSITION_HEADER,
        [f"pos_1,{entry},,,,,,OPEN,2025-11-15T03:00:00Z,"],
    )
    assert (await imported(settings, tmp_path, default_producer="paper"))[0] == 0
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, default_producer="paper", out=out) == 0, out
    # Without it the file names pos_1 of no producer, which is not there.
    out = io.StringIO()
    assert await run_verify(settings, tmp_path, out=out) == 1
    assert "positions.csv:2: not in the database (position_key=pos_1)" in out.getvalue()
