"""``ingestd bench --soak SECONDS``: minutes of paced traffic with faults on a schedule.

The soak runs everything itself, on servers of its own (``ingestd.tools.throwaway``: a PostgreSQL
and
a Redis with AOF, never the configured ones): two or three ``ingestd run`` replicas in one
consumer group, and a producer that publishes the simulated collector/paper feed at a fixed
rate, with a malformed event now and then. Every ``--fault-every`` seconds it injects the next
fault of a cycle (PostgreSQL crash-restart, backends terminated, PostgreSQL frozen, a table
locked, Redis restarted, Redis frozen, a replica SIGKILLed and restarted). At the end it heals
everything, lets the replicas drain, and compares what was published with what landed, event id
by event id: sent / landed / lost / duplicated / dead-lettered. It exits non-zero unless nothing
was lost, nothing doubled, and exactly the malformed events are dead letters.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import orjson

from ingestd import clients
from ingestd.daemon import db, migrations
from ingestd.producer.publisher import AsyncPublisher
from ingestd.tools.simulate import Simulator
from ingestd.tools.throwaway import ThrowawayPostgres, ThrowawayRedis

log = logging.getLogger("ingestd.tools.soak")

STREAM: Final = "ingestd:events"
GROUP: Final = "ingestd"
DATABASE: Final = "ingestd_soak"
TABLE_OF_TYPE: Final = {
    "spread": "spreads",
    "fx_rate": "fx_rates",
    "order": "orders",
    "trade": "trades",
}
# One malformed event per this many good ones: it must end in dead_letters, and only it.
BAD_EVERY: Final = 997
TICK_S: Final = 0.05
DRAIN_TIMEOUT_S: Final = 180.0
CLAIM_IDLE_S: Final = 4.0
CLAIM_INTERVAL_S: Final = 1.0

REPLICA_CONFIG: Final = """\
storage:
  postgres:
    connect_timeout_s: 2
    command_timeout_s: 3
    acquire_timeout_s: 2
  redis:
    socket_timeout_s: 2
    mirror_socket_timeout_s: 1
stream:
  block_ms: 500
  claim_idle_ms: {claim_idle_ms}
  claim_interval_s: {claim_interval_s}
pipeline:
  batch_max_age_ms: 100
  flush_timeout_s: 8
  backoff_base_s: 0.1
  backoff_cap_s: 2
shutdown:
  grace_s: 15
"""


@dataclasses.dataclass
class Ledger:
    """What the producer published (acknowledged by Redis), by table and event id."""

    ids: dict[str, set[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set)
    )
    opened: set[str] = dataclasses.field(default_factory=set)
    closed: set[str] = dataclasses.field(default_factory=set)
    bad: int = 0
    events: int = 0

    def add(self, ev: dict[str, Any]) -> None:
        """Tally one published event."""
        self.events += 1
        table = TABLE_OF_TYPE.get(ev["type"])
        if table is not None:
            self.ids[table].add(ev["event_id"])
        elif ev["type"] == "position_open":
            self.opened.add(ev["position_key"])
        elif ev["type"] == "position_close":
            self.closed.add(ev["position_key"])


class Replica:
    """One ``ingestd run`` subprocess of the soak."""

    def __init__(self, name: str, base: Path, env: dict[str, str]) -> None:
        self.name = name
        self.base = base
        self.env = {**env, "INGESTD_CONSUMER": name}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    def start(self) -> None:
        """Start (or restart) the replica, appending to its log."""
        self.starts += 1
        path = self.base / f"{self.name}.log"
        self._log_offset = path.stat().st_size if path.exists() else 0
        with path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd.cli", "run"],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    async def wait_started(self, timeout_s: float = 60.0) -> None:
        """Until this start's ``action=started`` line (a SIGTERM before it would kill it)."""
        path = self.base / f"{self.name}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = await asyncio.to_thread(path.read_bytes)
            if b"action=started" in data[self._log_offset :]:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited ({self.proc.returncode})")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"replica {self.name} did not start within {timeout_s:.0f}s")

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a lost node would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM and wait for the drain; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    @property
    def log_text(self) -> str:
        """The replica's whole log."""
        return (self.base / f"{self.name}.log").read_text(encoding="utf-8", errors="replace")


class Soak:
    """The soak's servers, replicas, producer and fault schedule."""

    def __init__(self, base: Path, *, replicas: int, rate: float, seed: int) -> None:
        self.base = base
        self.pg = ThrowawayPostgres(base / "pg")
        self.redis = ThrowawayRedis(base / "redis")
        self.rate = rate
        self.seed = seed
        self.ledger = Ledger()
        self.faults: collections.Counter[str] = collections.Counter()
        self.replica_count = replicas
        self.replicas: list[Replica] = []
        self._rr = itertools.count()

    @property
    def dsn(self) -> str:
        """The soak database."""
        return self.pg.dsn(DATABASE)

    async def setup(self) -> None:
        """Servers up, database migrated, replicas started."""
        await asyncio.to_thread(self.pg.start)
        await asyncio.to_thread(self.redis.start)
        admin = await db.connect(self.pg.dsn(), timeout_s=60)
        try:
            await admin.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await admin.close()
        conn = await db.connect(self.dsn, timeout_s=60)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        config = self.base / "replica.yml"
        text = REPLICA_CONFIG.format(
            claim_idle_ms=int(CLAIM_IDLE_S * 1000), claim_interval_s=CLAIM_INTERVAL_S
        )
        await asyncio.to_thread(config.write_text, text, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env.update(
            DATABASE_URL=self.dsn,
            REDIS_URL=self.redis.url(0),
            INGESTD_CONFIG=str(config),
            INGESTD_METRICS_PORT="0",
        )
        self.replicas = [
            Replica(f"soak-{i + 1}", self.base, env) for i in range(self.replica_count)
        ]
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            await r.wait_started()

    # --- the producer --------------------------------------------------------------------

    async def produce(self, until: float) -> None:
        """Publish the simulated feed at ``rate`` events/s until ``until`` (monotonic)."""
        publisher = AsyncPublisher.from_url(self.redis.url(0), stream=STREAM, retries=100)
        sim = Simulator(seed=self.seed, symbols=("BTC", "ETH", "XRP", "SOL"), tick_s=0.1)
        feed = sim.events()
        per_tick = max(1, round(self.rate * TICK_S))
        t0 = time.monotonic()
        ticks = 0
        try:
            while time.monotonic() < until:
                batch = list(itertools.islice(feed, per_tick))
                payloads: list[dict[str, Any] | bytes] = list(batch)
                for ev in batch:
                    if (self.ledger.events + 1) % BAD_EVERY == 0:
                        payloads.append(b'{"type": "spread", "event_id": "bad", "symbol": 1}')
                        self.ledger.bad += 1
                    self.ledger.add(ev)
                await _publish(publisher, payloads)
                ticks += 1
                ahead = t0 + ticks * TICK_S - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await publisher.aclose()

    # --- the faults ----------------------------------------------------------------------

    def schedule(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """The cycle of faults, in order."""
        return [
            ("postgres crash-restart", self._pg_crash),
            ("replica SIGKILL", self._kill_replica),
            ("backends terminated", self._terminate_backends),
            ("redis restart", self._redis_restart),
            ("postgres frozen 5 s", self._pg_freeze),
            ("spreads locked 5 s", self._lock_table),
            ("redis frozen 3 s", self._redis_freeze),
        ]

    async def inject(self, until: float, every_s: float) -> None:
        """Run the fault cycle every ``every_s`` seconds until ``until``."""
        cycle = itertools.cycle(self.schedule())
        while time.monotonic() + every_s < until:
            await asyncio.sleep(every_s)
            name, fault = next(cycle)
            log.info("fault: %s", name, extra={"action": "soak_fault"})
            try:
                await fault()
            except Exception:  # a failed injection is a soak bug, not a pass
                log.exception("fault %s could not be injected", name, extra={"action": "soak"})
                raise
            self.faults[name] += 1

    async def _pg_crash(self) -> None:
        await asyncio.to_thread(self.pg.restart, "immediate")

    async def _kill_replica(self) -> None:
        victim = self.replicas[next(self._rr) % len(self.replicas)]
        await asyncio.to_thread(victim.kill)
        # Dead for longer than claim_idle_ms: the others claim its entries before it is back.
        await asyncio.sleep(CLAIM_IDLE_S + 3 * CLAIM_INTERVAL_S)
        victim.start()
        await victim.wait_started()

    async def _terminate_backends(self) -> None:
        conn = await db.connect(self.dsn, timeout_s=60)
        try:
            for _ in range(5):
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'ingestd' AND pid <> pg_backend_pid()"
                )
                await asyncio.sleep(0.3)
        finally:
            await conn.close()

    async def _redis_restart(self) -> None:
        await asyncio.to_thread(self.redis.restart)

    async def _pg_freeze(self) -> None:
        self.pg.freeze()
        try:
            await asyncio.sleep(5.0)
        finally:
            self.pg.thaw()

    async def _lock_table(self) -> None:
        conn = await db.connect(self.dsn, timeout_s=60)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE spreads IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(5.0)
        finally:
            await conn.close()

    async def _redis_freeze(self) -> None:
        self.redis.freeze()
        try:
            await asyncio.sleep(3.0)
        finally:
            self.redis.thaw()

    # --- the verdict ---------------------------------------------------------------------

    async def drain(self) -> float:
        """Wait until every published event landed and nothing is pending; seconds it took."""
        t0 = time.monotonic()
        client = clients.redis_async(self.redis.url(0), socket_timeout_s=5)
        conn = await db.connect(self.dsn, timeout_s=60)
        try:
            while time.monotonic() - t0 < DRAIN_TIMEOUT_S:
                counts = {
                    t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in self.ledger.ids
                }
                dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
                summary: Any = await client.xpending(STREAM, GROUP)
                behind = any(counts[t] < len(ids) for t, ids in self.ledger.ids.items())
                if not behind and dead >= self.ledger.bad and int(summary["pending"]) == 0:
                    break
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
            await client.aclose()
        return time.monotonic() - t0

    async def verdict(self) -> dict[str, Any]:
        """Compare, event id by event id, what was published with what landed."""
        conn = await db.connect(self.dsn, timeout_s=60)
        tables: dict[str, Any] = {}
        try:
            for table, want in sorted(self.ledger.ids.items()):
                rows = await conn.fetch(f"SELECT event_id FROM {table}")
                landed = [r["event_id"] for r in rows]
                got = set(landed)
                tables[table] = {
                    "sent": len(want),
                    "landed": len(got),
                    "lost": len(want - got),
                    "duplicated": len(landed) - len(got),
                    "unexpected": len(got - want),
                }
            status = {
                r["position_key"]: r["status"]
                for r in await conn.fetch("SELECT position_key, status FROM positions")
            }
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            parked = await conn.fetchval("SELECT count(*) FROM position_closes_pending")
        finally:
            await conn.close()
        closed = {k for k, s in status.items() if s == "CLOSED"}
        positions = {
            "opened": len(self.ledger.opened),
            "closed": len(self.ledger.closed),
            "rows": len(status),
            "closed_rows": len(closed),
            "wrong": len((self.ledger.opened | self.ledger.closed) ^ set(status))
            + len(self.ledger.closed ^ closed),
            "parked": int(parked),
        }
        ok = (
            all(t["lost"] == t["duplicated"] == t["unexpected"] == 0 for t in tables.values())
            and positions["wrong"] == 0
            and dead == self.ledger.bad
        )
        redelivered = sum(r.log_text.count("action=pending_reread") for r in self.replicas)
        claimed = sum(r.log_text.count("action=entries_claimed") for r in self.replicas)
        return {
            "ok": ok,
            "events_published": self.ledger.events,
            "tables": tables,
            "positions": positions,
            "dead_letters": {"expected": self.ledger.bad, "found": int(dead)},
            "faults": dict(self.faults),
            "recoveries": {"own_pending_reread": redelivered, "claims": claimed},
        }

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every replica; their exit codes."""
        codes = {}
        for r in self.replicas:
            codes[r.name] = await asyncio.to_thread(r.terminate, 30.0)
        return codes

    def destroy(self) -> None:
        """Kill whatever is left and remove the soak's servers."""
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.kill()
        self.pg.destroy()
        self.redis.destroy()


async def _publish(publisher: AsyncPublisher, payloads: list[dict[str, Any] | bytes]) -> None:
    events = [p for p in payloads if isinstance(p, dict)]
    raw = [p for p in payloads if isinstance(p, bytes)]
    await publisher.publish_many(events)
    for payload in raw:
        await publisher.publish_raw(payload)


async def run_soak(
    *,
    duration_s: float,
    rate: float,
    fault_every_s: float,
    replicas: int,
    seed: int,
    json_path: str | None,
    keep: bool = False,
) -> int:
    """Run the soak and print its report; 0 when nothing was lost or doubled."""
    base = Path(tempfile.mkdtemp(prefix="ingestd-soak-"))
    soak = Soak(base, replicas=replicas, rate=rate, seed=seed)
    try:
        await soak.setup()
        t0 = time.monotonic()
        until = t0 + duration_s
        await asyncio.gather(soak.produce(until), soak.inject(until, fault_every_s))
        produced_s = time.monotonic() - t0
        drain_s = await soak.drain()
        codes = await soak.stop()
        report = await soak.verdict()
        report.update(
            duration_s=round(produced_s, 1),
            drain_s=round(drain_s, 1),
            rate=rate,
            replicas=replicas,
            exit_codes=codes,
        )
    finally:
        if keep:
            print(f"soak directory kept: {base}", file=sys.stderr)
        else:
            soak.destroy()
            shutil.rmtree(base, ignore_errors=True)
    print(format_report(report))
    if json_path:
        doc = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
        await asyncio.to_thread(Path(json_path).write_bytes, doc)
    clean_exit = all(code == 0 for code in report["exit_codes"].values())
    return 0 if report["ok"] and clean_exit else 1


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    lines = [
        f"soak: {report['duration_s']} s at {report['rate']:g} events/s, "
        f"{report['replicas']} replicas, drained in {report['drain_s']} s",
        f"{'table':<10} {'sent':>9} {'landed':>9} {'lost':>6} {'dup':>6} {'unexp':>6}",
    ]
    for table, t in report["tables"].items():
        lines.append(
            f"{table:<10} {t['sent']:>9,} {t['landed']:>9,} {t['lost']:>6} "
            f"{t['duplicated']:>6} {t['unexpected']:>6}"
        )
    p = report["positions"]
    lines.append(
        f"positions: {p['opened']} opened, {p['closed']} closed; rows {p['rows']} "
        f"({p['closed_rows']} closed), wrong {p['wrong']}"
    )
    d = report["dead_letters"]
    lines.append(f"dead letters: {d['found']} (malformed events sent: {d['expected']})")
    lines.append("faults: " + ", ".join(f"{k} x{v}" for k, v in report["faults"].items()))
    r = report["recoveries"]
    lines.append(
        f"recoveries: {r['own_pending_reread']} pending re-reads, {r['claims']} claims; "
        f"exit codes {report['exit_codes']}"
    )
    lines.append("VERDICT: " + ("exactly once" if report["ok"] else "FAILED"))
    return "\n".join(lines)
