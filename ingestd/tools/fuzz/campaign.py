"""Running the fuzz campaign: a real ``ingestd run``, a real stream, an in-process service.

The daemon reads the main stream; an in-process ``Service`` in this process reads a second
stream (for the derived-id collisions across streams) and takes ``submit``/``submit_many``.
Both run with one writer, so that within a route the order of commit is the order of sending,
which the positions model relies on ("the first open and the first close that commit stand").
Rounds of cases are sent and drained one after the other (so the backlog stays bounded) until
the case count or the time is reached; then the daemon's health is probed, everything is
stopped, and the oracle judges the database, the streams and the daemon's log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import clients, errors, logs
from ingestd.daemon import db, migrations
from ingestd.daemon.app import Service
from ingestd.daemon.sources.inprocess import Outcome
from ingestd.settings import Settings
from ingestd.tools.bench.replicas import Replica, replica_config, replica_env, write_config
from ingestd.tools.bench.scratch import (
    BenchFailed,
    delete_keys,
    drop_database,
    group_done,
    parse_entry_id,
    recreate_database,
    scratch_dsn,
)
from ingestd.tools.fuzz import oracle
from ingestd.tools.fuzz.generate import STREAM, STREAM_B, SUBMIT, Case, Generator
from ingestd.tools.throwaway import free_port

DAEMON_CONSUMER: Final = "fuzz-daemon"
IN_PROCESS_CONSUMER: Final = "fuzz-in-process"
XADD_CHUNK: Final = 200
POLL_S: Final = 0.2
DEFAULT_SCRATCH_DATABASE: Final = "ingestd_fuzz"


@dataclasses.dataclass(frozen=True, slots=True)
class FuzzOptions:
    """How much to send: up to ``max_events`` cases and/or ``duration_s`` seconds."""

    seed: int
    max_events: int | None = None
    duration_s: float | None = None
    round_size: int = 400
    # Oversize (1 MiB) payloads now and then; the bounded CI run keeps them too.
    big_payloads: bool = True
    # No progress (entries read, acknowledged, submits answered) for this long: intake stalled.
    stall_s: float = 30.0
    # The daemon's log format ("plain" or "json"); None: by the seed (odd seeds json).
    log_format: str | None = None


@dataclasses.dataclass(slots=True)
class FuzzReport:
    """The campaign's figures and verdict."""

    seed: int
    # Not in the repr: a case may hold a payload nested thousands deep (repr would recurse
    # past the limit, and a failing test's report would show a RecursionError instead).
    cases: list[Case] = dataclasses.field(repr=False)
    rounds: int
    elapsed_s: float
    verdict: oracle.Verdict
    options: FuzzOptions
    log_format: str

    @property
    def ok(self) -> bool:
        """True when no invariant was violated."""
        return not self.verdict.violations

    def figures(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""
        summary = oracle.summarize(self.cases)
        expected_dead = sum(1 for c in self.cases if c.fate in oracle.DEAD_FATES)
        return {
            "seed": self.seed,
            "daemon_log_format": self.log_format,
            "cases": len(self.cases),
            "rounds": self.rounds,
            "elapsed_s": round(self.elapsed_s, 1),
            "cases_per_s": round(len(self.cases) / self.elapsed_s, 1) if self.elapsed_s else None,
            **summary,
            "landed_exact": self.verdict.landed,
            "positions_right": self.verdict.positions,
            "dead_letters": self.verdict.dead_letters,
            "dead_letters_expected": expected_dead,
            "violations": {k: len(v) for k, v in self.verdict.by_check().items()},
        }

    def format(self, examples: int = 5) -> str:
        """A readable report: figures, each violated check with examples, how to replay."""
        f = self.figures()
        lines = [
            f"fuzz: seed {self.seed}, {f['cases']:,} cases in {f['rounds']} rounds, "
            f"{f['elapsed_s']} s ({f['cases_per_s']} cases/s); daemon logs {self.log_format}",
            "sent by route: " + ", ".join(f"{k} {v:,}" for k, v in sorted(f["routes"].items())),
            "expected fates: " + ", ".join(f"{k} {v:,}" for k, v in sorted(f["fates"].items())),
            "sent by kind: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(f["kinds"].items(), key=lambda kv: -kv[1])),
            f"landed with exact values: {f['landed_exact']:,}; positions as modelled: "
            f"{f['positions_right']:,}; dead letters: {f['dead_letters']:,} "
            f"(expected {f['dead_letters_expected']:,})",
            f"violations: {len(self.verdict.violations)}",
        ]
        for check, found in sorted(self.verdict.by_check().items()):
            lines.append(f"  [{check}] x{len(found)}")
            kinds = collections.Counter(
                f"{v.case.route} {v.case.category}/{v.case.name}" for v in found if v.case
            )
            if kinds:
                lines.append(
                    "    by case: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
                )
            for v in found[:examples]:
                lines.append("    - " + v.describe())
        lines.append(
            f"replay: ingestd bench --fuzz 0 --seed {self.seed} --events {len(self.cases)} "
            f"(round size {self.options.round_size})"
        )
        lines.append("VERDICT: " + ("every invariant held" if self.ok else "FAILED"))
        return "\n".join(lines)


@contextlib.contextmanager
def captured_log(path: Path) -> Iterator[None]:
    """The in-process service's log lines, in the daemon's plain format, into ``path`` (and not
    to the console meanwhile): the oracle checks them as it checks the daemon's."""
    # backslashreplace, as on the daemon's stderr: a lone surrogate is written escaped.
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    # The daemon's plain format (ingestd.logs.configure), so that one check reads both logs.
    handler.setFormatter(
        logs.PlainFormatter("%(asctime)s %(levelname)s %(name)s%(action_part)s %(message)s")
    )
    target = logging.getLogger("ingestd")
    propagate = target.propagate
    target.addHandler(handler)
    target.propagate = False
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.propagate = propagate
        handler.close()


class Campaign:
    """One campaign on one database and Redis (``settings``), with its own stream keys."""

    def __init__(
        self,
        settings: Settings,
        options: FuzzOptions,
        workdir: Path,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self._say = progress or (lambda _: None)
        self.workdir = workdir
        self.stream_key = settings.stream.key
        self.stream_b_key = f"{settings.stream.key}:fuzz-b"
        self.group = settings.stream.group
        self.prefix = settings.storage.redis.key_prefix
        self.settings = settings
        self.service_settings = settings.replace(
            **{
                "stream.key": self.stream_b_key,
                "stream.consumer": IN_PROCESS_CONSUMER,
                "pipeline.writers": 1,
                "metrics_port": 0,
                "maintenance.enabled": False,
            }
        ).check()
        self.port = free_port()
        self.log_format = options.log_format or ("json" if options.seed % 2 else "plain")
        self.generator = Generator(
            options.seed,
            now=dt.datetime.now(dt.UTC),
            max_event_bytes=settings.pipeline.max_event_bytes,
            retention_days={
                "spreads": settings.retention.spreads_days,
                "fx_rates": settings.retention.fx_rates_days,
                "orders": settings.retention.orders_days,
            },
            big_payloads=options.big_payloads,
        )
        self.cases: list[Case] = []
        self.by_n: dict[int, Case] = {}
        self.last_ids: dict[str, str | None] = {STREAM: None, STREAM_B: None}
        self.outcomes: dict[int, str] = {}
        self.daemon: Replica | None = None
        self._rng = random.Random(options.seed ^ 0x5EED)  # noqa: S311 - submit chunking only

    def _daemon(self) -> Replica:
        config = replica_config(self.settings)
        # One writer: commits follow the stream's order (the positions model needs it).
        config["pipeline"]["writers"] = 1
        config["log_format"] = self.log_format
        # The retention the generator judges "too old" by (the bench's replica YAML leaves it out).
        config["retention"] = dataclasses.asdict(self.settings.retention)
        path = write_config(self.workdir / "fuzz-daemon.yml", config)
        env = replica_env(self.settings)
        env["INGESTD_METRICS_PORT"] = str(self.port)
        return Replica(DAEMON_CONSUMER, path, env, self.workdir / "fuzz-daemon.log")

    async def _start_daemon(self) -> None:
        """Start ``ingestd run``; once more on another port if its port was taken meanwhile."""
        assert self.daemon is not None
        self.daemon.start()
        try:
            await self.daemon.wait_started(60)
        except BenchFailed:
            if "cannot serve metrics" not in self.daemon.log_text:
                raise
            self.port = free_port()
            self.daemon = self._daemon()
            self.daemon.start()
            await self.daemon.wait_started(60)

    async def run(self) -> FuzzReport:
        """Start everything, send rounds until done, stop, judge."""
        client = clients.redis_async(self.settings.storage.redis.url, socket_timeout_s=30)
        self.daemon = self._daemon()
        service = Service(self.service_settings)
        service_log = self.workdir / "fuzz-in-process.log"
        try:
            with captured_log(service_log):
                return await self._run(client, service, service_log)
        finally:
            await client.aclose()

    async def _run(self, client: aioredis.Redis, service: Service, service_log: Path) -> FuzzReport:
        o = self.options
        assert self.daemon is not None
        stalled: str | None = None
        died: str | None = None
        t0 = time.monotonic()
        try:
            await self._start_daemon()
            await service.start()
            t0 = time.monotonic()
            while True:
                if o.max_events is not None and len(self.cases) >= o.max_events:
                    break
                if o.duration_s is not None and time.monotonic() - t0 >= o.duration_s:
                    break
                size = o.round_size
                if o.max_events is not None:
                    size = min(size, max(1, o.max_events - len(self.cases)))
                cases = self.generator.round(size)
                self.cases.extend(cases)
                self.by_n.update((c.n, c) for c in cases)
                sending = asyncio.ensure_future(
                    asyncio.gather(self._stream(client, cases), self._submit(service, cases))
                )
                try:
                    stalled = await self._settle(client, sending)
                finally:
                    if not sending.done():
                        sending.cancel()  # a submit that never returns: the stall says so
                        with contextlib.suppress(asyncio.CancelledError):
                            await sending
                if sending.done() and not sending.cancelled():
                    sending.result()  # an error of the campaign itself (Redis down...) is raised
                if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
                    died = f"ingestd run exited {self.daemon.proc.returncode} during the run"
                self._say(
                    f"round {self.generator.rounds}: {len(self.cases):,} cases sent and drained "
                    f"in {time.monotonic() - t0:.0f} s"
                )
                if stalled or died:
                    break
            elapsed = time.monotonic() - t0
            healthz = await asyncio.to_thread(_get, self.port, "/healthz") if not died else None
            heartbeat = await client.get(self.prefix + "health:ingestd")
        finally:
            # Unclean: some in-process caller was never answered (its event neither committed
            # nor refused), or the drain failed.
            service_clean = await service.stop()
            exit_code: int | None = None
            try:
                exit_code = await self.daemon.stop(60)
            except BenchFailed as exc:
                died = died or str(exc)
            finally:
                self.daemon.kill()
        obs = oracle.Observed(
            stream_key=self.stream_key,
            stream_b_key=self.stream_b_key,
            group=self.group,
            key_prefix=self.prefix,
            last_ids=self.last_ids,
            submit_outcomes=self.outcomes,
            healthz=healthz,
            heartbeat=heartbeat.decode() if isinstance(heartbeat, bytes) else heartbeat,
            exit_code=exit_code,
            daemon_log=self.daemon.log_text,
            daemon_log_format=self.log_format,
            service_log=await asyncio.to_thread(
                service_log.read_text, encoding="utf-8", errors="replace"
            ),
            stalled=stalled,
            died=died,
            service_clean=service_clean,
        )
        conn = await db.connect(self.settings.storage.postgres.dsn, timeout_s=10)
        try:
            verdict = await oracle.judge(
                conn, client, self.cases, self.generator.position_rows(), obs
            )
        finally:
            await conn.close()
        return FuzzReport(
            o.seed, self.cases, self.generator.rounds, elapsed, verdict, o, self.log_format
        )

    # --- sending --------------------------------------------------------------------------

    async def _stream(self, client: aioredis.Redis, cases: Sequence[Case]) -> None:
        """XADD the stream cases in order, then their twins into the second stream under the
        same entry ids."""
        main = [c for c in cases if c.route == STREAM]
        for start in range(0, len(main), XADD_CHUNK):
            chunk = main[start : start + XADD_CHUNK]
            async with client.pipeline(transaction=False) as pipe:
                for c in chunk:
                    pipe.xadd(self.stream_key, {c.stream_field: c.payload})
                ids = await pipe.execute()
            for c, entry_id in zip(chunk, ids, strict=True):
                c.entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            self.last_ids[STREAM] = chunk[-1].entry_id
        for c in cases:
            if c.route != STREAM_B:
                continue
            assert c.original is not None
            twin_id = self.by_n[c.original].entry_id
            assert twin_id is not None
            await client.xadd(self.stream_b_key, {b"event": c.payload}, id=twin_id)
            c.entry_id = twin_id
            self.last_ids[STREAM_B] = twin_id

    async def _submit(self, service: Service, cases: Sequence[Case]) -> None:
        """Submit the in-process cases in order: chunks through submit_many, some one by one."""
        mine = [c for c in cases if c.route == SUBMIT]
        i = 0
        while i < len(mine):
            chunk = mine[i : i + self._rng.randint(1, 40)]
            i += len(chunk)
            # Small chunks one by one through submit(), larger ones through submit_many().
            if len(chunk) > 3:
                try:
                    outcomes = await service.submit_many([c.payload for c in chunk])
                except Exception as exc:  # noqa: BLE001 - recorded; the cases go one by one
                    self._say(
                        f"submit_many raised {type(exc).__name__}: {str(exc)[:120]}; "
                        "submitting its events one by one"
                    )
                else:
                    for c, outcome in zip(chunk, outcomes, strict=True):
                        self.outcomes[c.n] = _outcome_name(outcome)
                    continue
            for c in chunk:
                self.outcomes[c.n] = await _submit_one(service, c)

    async def _settle(self, client: aioredis.Redis, sending: asyncio.Future[Any]) -> str | None:
        """Wait until everything is sent and answered, and both streams are read and
        acknowledged up to the last entry sent; the reason when nothing moves for ``stall_s``
        seconds (an entry retried forever, a submit that never returns)."""
        last_change = time.monotonic()
        previous: object = None
        while True:
            done = sending.done()
            state: list[object] = [len(self.outcomes)]
            for route, key in ((STREAM, self.stream_key), (STREAM_B, self.stream_b_key)):
                last = self.last_ids[route]
                if last is None:
                    continue
                try:
                    ok = await group_done(client, key, self.group, parse_entry_id(last))
                    groups = await client.xinfo_groups(key)
                except redis.exceptions.ResponseError:
                    ok, groups = False, []  # the group is not created yet
                done = done and ok
                state.append([(g["pending"], g["last-delivered-id"]) for g in groups])
            if done:
                return None
            proc = self.daemon.proc if self.daemon is not None else None
            if proc is not None and proc.poll() is not None:
                return f"ingestd run exited {proc.returncode}"
            if state != previous:
                previous, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > self.options.stall_s:
                return (
                    f"nothing read or acknowledged for {self.options.stall_s:.0f}s; "
                    f"streams and groups: {state[1:]!r}"
                )
            await asyncio.sleep(POLL_S)


async def _submit_one(service: Service, case: Case) -> str:
    try:
        return _outcome_name(await service.submit(case.payload))
    except errors.InvalidEvent:
        return "invalid"
    except Exception as exc:  # noqa: BLE001 - the oracle reports what a producer would have seen
        return f"error: {type(exc).__name__}: {str(exc)[:160]}"


def _outcome_name(outcome: Outcome) -> str:
    return {
        Outcome.COMMITTED: "committed",
        Outcome.DEAD_LETTER: "dead_letter",
        Outcome.SPOOLED: "spooled",
    }[outcome]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status), resp.read().decode(errors="replace")[:200]
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")[:200]
    except OSError as exc:
        return 0, f"{type(exc).__name__}: {exc}"


async def run_campaign(
    settings: Settings,
    options: FuzzOptions,
    workdir: Path,
    progress: Callable[[str], None] | None = None,
) -> FuzzReport:
    """One campaign on ``settings``' database and Redis (a migrated, empty database)."""
    return await Campaign(settings, options, workdir, progress).run()


async def run_fuzz_command(
    settings: Settings,
    *,
    duration_s: float,
    seed: int | None,
    max_events: int | None,
    scratch_database: str,
    json_path: str | None,
    keep: bool,
) -> int:
    """``ingestd bench --fuzz SECONDS``: a campaign on a scratch database and scratch keys."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    base_dsn = settings.storage.postgres.dsn
    tag = uuid.uuid4().hex[:12]
    prefix = f"ingestd:fuzz:{tag}:"
    try:
        dsn = scratch_dsn(base_dsn, scratch_database)
        run_settings = settings.replace(
            **{
                "storage.postgres.dsn": dsn,
                "storage.redis.key_prefix": prefix,
                "stream.key": prefix + "events",
                "stream.group": "ingestd",
                "stream.block_ms": 200,
                "maintenance.enabled": False,
            }
        ).check()
    except errors.ConfigError as exc:
        print(f"ingestd bench --fuzz: {exc}", file=sys.stderr)
        return 2
    print(f"fuzz: seed {seed}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="ingestd-fuzz-"))
    client = clients.redis_async(settings.storage.redis.url, socket_timeout_s=30)
    try:
        await recreate_database(base_dsn, scratch_database)
        conn = await db.connect(dsn, timeout_s=10)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        options = FuzzOptions(
            seed=seed,
            max_events=max_events,
            duration_s=None if max_events is not None and duration_s <= 0 else duration_s,
        )
        report = await run_campaign(
            run_settings, options, workdir, lambda line: print(f"fuzz: {line}", file=sys.stderr)
        )
    except (OSError, asyncpg.PostgresError, redis.exceptions.RedisError, BenchFailed) as exc:
        print(f"ingestd bench --fuzz: cannot run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if keep:
            print(f"fuzz: kept database {scratch_database} and {workdir}", file=sys.stderr)
        else:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await drop_database(base_dsn, scratch_database)
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await delete_keys(client, [], prefix)
        await client.aclose()
    print(report.format())
    if json_path:
        doc = {
            **report.figures(),
            "violation_details": [
                {
                    "check": v.check,
                    "detail": v.detail,
                    "case": v.case.describe(2000) if v.case else None,
                }
                for v in report.verdict.violations
            ],
        }
        text = json.dumps(doc, indent=2) + "\n"
        await asyncio.to_thread(Path(json_path).write_text, text, encoding="utf-8")
    return 0 if report.ok else 1
