"""The fuzz campaign's judge: what the database, Redis and the daemon's log hold, case by case.

Every check reads the real state (rows, dead letters, the consumer groups, the log) and compares
it with the fates the generator assigned; nothing here asks ingestd what it did.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis

from ingestd.tools.fuzz.generate import FORGE, STREAM, STREAM_B, SUBMIT, Case, Fate
from ingestd.wire import keys, tables
from ingestd.wire.events import utc_iso

DEAD_FATES: Final = frozenset({Fate.DEAD, Fate.CONFLICT})
_MARKER: Final = re.compile(r"fzq[0-9a-f]+n[0-9]+z")
# A plain log line: "2026-12-03 10:00:00,123 INFO ingestd.daemon.app action=started ..."
_LOG_LINE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2},[0-9]{3} [A-Z]+ \S+ action=\S+ "
)
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\u2028\u2029\x85]")
_POSITION_COLUMNS: Final = (
    *(name for name, _ in tables.POSITION_ENTRY_COLUMNS),
    *(name for name, _ in tables.POSITION_EXIT_COLUMNS),
    "open_event_id",
    "close_event_id",
    "status",
)


@dataclasses.dataclass(slots=True)
class Violation:
    """One broken invariant, with the case it is about when there is one."""

    check: str
    detail: str
    case: Case | None = None

    def describe(self) -> str:
        """The detail and a minimal description of the case."""
        text = self.detail
        if self.case is not None:
            text += "\n      " + self.case.describe()
        return text


@dataclasses.dataclass(slots=True)
class Observed:
    """What the campaign saw while running: the daemon, the probes, the in-process outcomes."""

    stream_key: str
    stream_b_key: str
    group: str
    key_prefix: str
    last_ids: dict[str, str | None]
    submit_outcomes: dict[int, str]
    healthz: tuple[int, str] | None
    heartbeat: str | None
    exit_code: int | None
    daemon_log: str
    daemon_log_format: str = "plain"
    service_log: str = ""
    stalled: str | None = None
    died: str | None = None
    service_clean: bool = True


@dataclasses.dataclass(slots=True)
class Verdict:
    """Every violation found, and the figures of the checks."""

    violations: list[Violation] = dataclasses.field(default_factory=list)
    landed: int = 0
    dead_letters: int = 0
    positions: int = 0

    def add(self, check: str, detail: str, case: Case | None = None) -> None:
        """Record one violation."""
        self.violations.append(Violation(check, detail, case))

    def by_check(self) -> dict[str, list[Violation]]:
        """Violations grouped by the check that found them."""
        out: dict[str, list[Violation]] = collections.defaultdict(list)
        for v in self.violations:
            out[v.check].append(v)
        return dict(out)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, Decimal):
        return isinstance(got, Decimal) and got == want
    if isinstance(want, dt.datetime):
        return isinstance(got, dt.datetime) and got == want
    return bool(got == want) and type(got) is type(want)


def _derived_id(case: Case, obs: Observed) -> str | None:
    if case.entry_id is None:
        return None
    key = obs.stream_b_key if case.route == STREAM_B else obs.stream_key
    return f"stream:{key}:{case.entry_id}"


def _ascii_head(text: str) -> str:
    m = re.match(r"[A-Za-z0-9_-]+", text)
    return m.group(0) if m else text[:20]


async def judge(
    conn: asyncpg.Connection,
    client: aioredis.Redis,
    cases: Sequence[Case],
    position_rows: Mapping[tuple[str, str], Mapping[str, Any]],
    obs: Observed,
) -> Verdict:
    """Run every check; the verdict lists each violation with the case it concerns."""
    verdict = Verdict()
    _process(verdict, obs)
    await _append_rows(verdict, conn, cases, obs)
    await _positions(verdict, conn, cases, position_rows)
    await _dead_letters(verdict, conn, cases, obs)
    _submit_outcomes(verdict, cases, obs)
    await _streams(verdict, client, obs)
    await _mirror(verdict, conn, client, cases, obs)
    if obs.daemon_log_format == "json":
        _json_log(verdict, "ingestd run", obs.daemon_log)
    else:
        _log(verdict, "ingestd run", obs.daemon_log)
    _log(verdict, "in-process service", obs.service_log)
    return verdict


def _process(verdict: Verdict, obs: Observed) -> None:
    if obs.died:
        verdict.add("daemon_alive", obs.died)
    if obs.stalled:
        verdict.add("intake_progress", obs.stalled)
    if obs.healthz is None or obs.healthz[0] != 200:
        verdict.add("healthz", f"/healthz answered {obs.healthz!r}, want 200")
    if obs.heartbeat is None:
        verdict.add("heartbeat", "health:ingestd is missing (expired: no fresh heartbeat)")
    if not obs.service_clean:
        verdict.add(
            "clean_exit",
            "the in-process service stopped unclean: a submitted event was left unanswered",
        )
    if obs.exit_code != 0:
        verdict.add("clean_exit", f"ingestd run exited {obs.exit_code} after SIGTERM, want 0")


async def _append_rows(
    verdict: Verdict, conn: asyncpg.Connection, cases: Sequence[Case], obs: Observed
) -> None:
    by_time: dict[dt.datetime, list[Case]] = collections.defaultdict(list)
    for c in cases:
        if c.row is not None:
            by_time[c.row.time].append(c)
    for table in tables.APPEND_TABLES:
        rows = await conn.fetch(f"SELECT * FROM {table.name}")  # name from the allow-list
        by_key: dict[tuple[str, dt.datetime], list[asyncpg.Record]] = collections.defaultdict(list)
        rows_at: dict[dt.datetime, list[asyncpg.Record]] = collections.defaultdict(list)
        for r in rows:
            by_key[(r["event_id"], r[table.time_column])].append(r)
            rows_at[r[table.time_column]].append(r)
        claimed: set[int] = set()
        for c in cases:
            if c.fate is not Fate.LAND or c.row is None or c.row.table != table.name:
                continue
            want_id = c.row.event_id or _derived_id(c, obs)
            found = by_key.get((want_id, c.row.time), []) if want_id is not None else []
            if not found:
                # Derived ids: find the row by its time (each case's time is its own).
                loose = [r for r in rows_at.get(c.row.time, []) if id(r) not in claimed]
                if loose and want_id is not None:
                    verdict.add(
                        "derived_event_id",
                        f"{table.name} row has event_id {loose[0]['event_id']!r}, want {want_id!r}",
                        c,
                    )
                found = loose[:1] if want_id is not None else loose
            found = [r for r in found if id(r) not in claimed]
            if not found:
                verdict.add("landed_exactly_once", f"{table.name}: the event is missing", c)
                continue
            if len(found) > 1:
                verdict.add("landed_exactly_once", f"{table.name}: {len(found)} rows", c)
            row = found[0]
            claimed.update(id(r) for r in found)
            wrong = [
                f"{col} is {row[col]!r}, want {want!r}"
                for col, want in c.row.values.items()
                if not _same(row[col], want)
            ]
            if wrong:
                verdict.add("exact_values", f"{table.name}: " + "; ".join(wrong), c)
            else:
                verdict.landed += 1
        for r in rows:
            if id(r) in claimed:
                continue
            t = r[table.time_column]
            near = by_time.get(t, [])
            guess = _case_by_second(cases, t) if not near else near[0]
            verdict.add(
                "no_unexpected_rows",
                f"{table.name} holds a row nobody sent as valid: event_id {r['event_id']!r} "
                f"at {t.isoformat()}",
                guess,
            )


def _case_by_second(cases: Sequence[Case], t: dt.datetime) -> Case | None:
    """The bad case whose time this was: each case's time is its own second after a base
    (shifted by whole days for the too-old ones)."""
    first = next((c for c in cases if c.row is not None), None)
    if first is None or first.row is None:
        return None
    base = first.row.time.replace(microsecond=0) - dt.timedelta(seconds=first.n)
    n = int((t.replace(microsecond=0) - base).total_seconds()) % 86_400
    return next((c for c in cases if c.n == n), None)


async def _positions(
    verdict: Verdict,
    conn: asyncpg.Connection,
    cases: Sequence[Case],
    expected: Mapping[tuple[str, str], Mapping[str, Any]],
) -> None:
    rows = {r["position_key"]: r for r in await conn.fetch("SELECT * FROM positions")}
    first_case: dict[str, Case] = {}
    for c in cases:
        if c.position is not None:
            first_case.setdefault(c.position.key, c)
    for (_, key), want in expected.items():
        row = rows.pop(key, None)
        case = first_case.get(key)
        if row is None:
            verdict.add("positions_model", f"position {key!r} has no row", case)
            continue
        wrong = [
            f"{col} is {row[col]!r}, want {want[col]!r}"
            for col in _POSITION_COLUMNS
            if col in want and not _same(row[col], want[col])
        ]
        if wrong:
            verdict.add(
                "positions_model",
                f"position {key!r} (first open and first close stand): " + "; ".join(wrong),
                case,
            )
        else:
            verdict.positions += 1
    for key in rows:
        verdict.add("positions_model", f"positions holds {key!r}, which no valid open created")
    parked = await conn.fetch("SELECT position_key, event_id FROM position_closes_pending")
    for p in parked:
        verdict.add(
            "positions_model",
            f"close {p['event_id']!r} of {p['position_key']!r} still parked after its open",
        )
    for table in ("orders", "trades"):
        unlinked = await conn.fetch(
            f"SELECT t.event_id, t.position_key FROM {table} AS t "  # name from a fixed tuple
            "JOIN positions AS p ON p.position_key = t.position_key "
            "AND p.producer IS NOT DISTINCT FROM t.producer "  # its own producer's position
            "WHERE t.position_id IS DISTINCT FROM p.id"
        )
        for r in unlinked:
            verdict.add(
                "position_links",
                f"{table} {r['event_id']!r} names {r['position_key']!r} but is not linked to it",
            )


def _payload_digest(payload: Any) -> str | None:
    if isinstance(payload, bytes):
        return hashlib.sha256(payload).hexdigest()
    if isinstance(payload, str):
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()
    return None


async def _dead_letters(
    verdict: Verdict, conn: asyncpg.Connection, cases: Sequence[Case], obs: Observed
) -> None:
    rows = await conn.fetch(
        "SELECT id, dedup_key, source, error, payload, payload_sha256 FROM dead_letters ORDER BY id"
    )
    verdict.dead_letters = len(rows)
    by_entry: dict[str, Case] = {}
    by_digest: dict[str, list[Case]] = collections.defaultdict(list)
    by_marker: dict[str, list[Case]] = collections.defaultdict(list)
    for c in cases:
        key = _derived_id(c, obs)
        if key is not None:
            by_entry[key] = c
        digest = _payload_digest(c.payload)
        if digest is not None:
            by_digest[digest].append(c)
        if c.marker is not None:
            by_marker[c.marker].append(c)
    got: dict[int, list[asyncpg.Record]] = collections.defaultdict(list)
    for r in rows:
        case = _attribute(r, by_entry, by_digest, by_marker)
        if case is None:
            verdict.add(
                "dead_letter_exactly_once",
                f"unexplained dead letter ({r['source']}, key {r['dedup_key']!r}): "
                f"{r['error'][:200]!r}; payload {r['payload'][:160]!r}",
            )
            continue
        got[case.n].append(r)
    for c in cases:
        found = got.get(c.n, [])
        if c.fate in DEAD_FATES:
            if not found:
                verdict.add(
                    "dead_letter_exactly_once",
                    f"{c.fate.value}: no dead letter"
                    + (" (see no_unexpected_rows: it may have landed)" if c.row is None else ""),
                    c,
                )
            elif len(found) > 1:
                verdict.add("dead_letter_exactly_once", f"{len(found)} dead letters", c)
            if found and c.fate is Fate.CONFLICT:
                error = found[0]["error"]
                if "conflict" not in error.lower() or (
                    c.names is not None and _ascii_head(c.names) not in error
                ):
                    verdict.add(
                        "conflict_reason",
                        f"the reason must say conflict and name {c.names!r}: {error[:200]!r}",
                        c,
                    )
        elif found:
            verdict.add(
                "valid_not_dead_lettered",
                f"{c.fate.value} event dead-lettered: {found[0]['error'][:240]!r}",
                c,
            )


def _attribute(
    row: asyncpg.Record,
    by_entry: Mapping[str, Case],
    by_digest: Mapping[str, list[Case]],
    by_marker: Mapping[str, list[Case]],
) -> Case | None:
    """The case a dead letter is about: by stream entry, else payload digest, else marker."""
    key = row["dedup_key"]
    if key is not None and key in by_entry:
        return by_entry[key]
    candidates = by_digest.get(row["payload_sha256"], [])
    if not candidates:
        markers = _MARKER.findall(row["payload"])
        candidates = [c for m in dict.fromkeys(markers) for c in by_marker.get(m, [])]
    if row["source"] == "submit":
        candidates = [c for c in candidates if c.route == SUBMIT] or candidates
    elif row["source"] == "stream":
        candidates = [c for c in candidates if c.route != SUBMIT] or candidates
    dead = [c for c in candidates if c.fate in DEAD_FATES]
    if len(dead) == 1:
        return dead[0]
    if dead:
        return dead[0]
    return candidates[0] if candidates else None


def _submit_outcomes(verdict: Verdict, cases: Sequence[Case], obs: Observed) -> None:
    for c in cases:
        if c.route != SUBMIT:
            continue
        outcome = obs.submit_outcomes.get(c.n)
        want = {"dead_letter", "invalid"} if c.fate in DEAD_FATES else {"committed"}
        if outcome not in want:
            verdict.add(
                "submit_outcome",
                f"submit said {outcome!r}, want {' or '.join(sorted(want))}",
                c,
            )


async def _streams(verdict: Verdict, client: aioredis.Redis, obs: Observed) -> None:
    for route, key in ((STREAM, obs.stream_key), (STREAM_B, obs.stream_b_key)):
        last = obs.last_ids.get(route)
        if last is None:
            continue
        groups = {_s(g["name"]): g for g in await client.xinfo_groups(key)}
        group = groups.get(obs.group)
        if group is None:
            verdict.add("stream_acked", f"{key}: consumer group {obs.group!r} is missing")
            continue
        pending = int(group["pending"])
        if pending:
            detail = await client.xpending_range(key, obs.group, "-", "+", 5)
            ids = [_s(d["message_id"]) for d in detail]
            verdict.add("stream_acked", f"{key}: {pending} entries pending, e.g. {ids}")
        delivered = _s(group["last-delivered-id"])
        if _parse_id(delivered) < _parse_id(last):
            verdict.add("stream_acked", f"{key}: read up to {delivered}, last entry sent {last}")


async def _mirror(
    verdict: Verdict,
    conn: asyncpg.Connection,
    client: aioredis.Redis,
    cases: Sequence[Case],
    obs: Observed,
) -> None:
    """The Redis mirror: open counts equal the table's; each ``spreads:<symbol>:last`` still
    alive (60 s TTL) is the newest landed spread of its symbol by event time."""
    counts = await conn.fetch(
        "SELECT symbol, (count(*) FILTER (WHERE status = 'OPEN'))::int AS n "
        "FROM positions GROUP BY symbol"
    )
    for r in counts:
        key = obs.key_prefix + keys.open_count(r["symbol"])
        got = await client.get(key)
        if got is None or got != str(r["n"]).encode():
            verdict.add("mirror", f"{key!r} is {got!r}, yet {r['n']} positions are open")
    newest: dict[str, Case] = {}
    for c in cases:
        if c.fate is Fate.LAND and c.row is not None and c.row.table == "spreads":
            symbol = c.row.values["symbol"]
            best = newest.get(symbol)
            if best is None or (best.row is not None and c.row.time > best.row.time):
                newest[symbol] = c
    for symbol, c in newest.items():
        assert c.row is not None
        key = obs.key_prefix + keys.spread(symbol)
        raw = await client.get(key)
        if raw is None:
            continue  # expired
        snap = json.loads(raw)
        want_time = utc_iso(c.row.time)
        want_price = c.row.values["upbit_price"]
        if snap.get("timestamp") != want_time or Decimal(snap.get("upbit_price")) != want_price:
            verdict.add(
                "mirror",
                f"{key!r} holds {snap.get('timestamp')} upbit_price {snap.get('upbit_price')}, "
                f"want the newest landed spread: {want_time} upbit_price {want_price}",
                c,
            )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _ErrorLines:
    """Lines logged as errors, one violation per logger and action (with how many)."""

    def __init__(self, whose: str) -> None:
        self.whose = whose
        self.first: dict[tuple[str, str], tuple[int, str]] = {}
        self.count: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, logger: str, action: str, number: int, line: str) -> None:
        key = (logger, action)
        self.first.setdefault(key, (number, line[:200]))
        self.count[key] += 1

    def report(self, verdict: Verdict) -> None:
        for key, (number, line) in self.first.items():
            verdict.add(
                "log_no_errors",
                f"{self.whose}: {self.count[key]} error lines from {key[0]} action={key[1]}, "
                f"the first (line {number}): {line!r}",
            )


def _log(verdict: Verdict, whose: str, text: str) -> None:
    """Plain log lines: none forged by input, no control characters, no errors logged."""
    errors = _ErrorLines(whose)
    for i, line in enumerate(text.split("\n")):
        if not line:
            continue
        head = line[:200]
        m = _LOG_LINE.match(line)
        if FORGE in line and not m:
            verdict.add("log_escaped", f"{whose} line {i + 1} starts with input text: {head!r}")
        bad = _CONTROL.search(line)
        if bad:
            verdict.add(
                "log_escaped",
                f"{whose} line {i + 1} holds control character {bad.group()!r}: {head!r}",
            )
        if m:
            _, _, level, logger, action = m.group(0).split(" ")[:5]
            if level in ("ERROR", "CRITICAL"):
                errors.add(logger, action.removeprefix("action="), i + 1, line)
    errors.report(verdict)


_JSON_LOG_KEYS: Final = frozenset({"ts", "level", "logger", "action", "msg"})


def _json_log(verdict: Verdict, whose: str, text: str) -> None:
    """JSON log lines: every line one object with the usual keys, no control character or
    line or paragraph separator in the line itself (JSON escapes them in values); no errors."""
    errors = _ErrorLines(whose)
    for i, line in enumerate(text.split("\n")):
        if not line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not doc.keys() >= _JSON_LOG_KEYS:
            verdict.add(
                "log_escaped", f"{whose} line {i + 1} is not a JSON log line: {line[:200]!r}"
            )
            continue
        bad = _CONTROL.search(line)
        if bad:
            verdict.add(
                "log_escaped",
                f"{whose} line {i + 1} holds control character {bad.group()!r}: {line[:200]!r}",
            )
        if doc["level"] in ("error", "critical"):
            errors.add(str(doc["logger"]), str(doc["action"]), i + 1, line)
    errors.report(verdict)


def summarize(cases: Iterable[Case]) -> dict[str, dict[str, int]]:
    """Cases sent, by category/name and by fate."""
    by_kind: collections.Counter[str] = collections.Counter()
    by_fate: collections.Counter[str] = collections.Counter()
    by_route: collections.Counter[str] = collections.Counter()
    for c in cases:
        by_kind[f"{c.category}/{c.name.split(':')[0]}"] += 1
        by_fate[c.fate.value] += 1
        by_route[c.route] += 1
    return {"kinds": dict(by_kind), "fates": dict(by_fate), "routes": dict(by_route)}
