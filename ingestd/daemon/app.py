"""The composition root: builds every part from one frozen Settings object and runs them.

Data flows one way: sources (in-process ``submit``, Redis Stream) -> pipeline (queue, batcher,
writers) -> sinks (PostgreSQL, then the Redis mirror), and acknowledgements travel back with the
batch. Nothing else in ingestd constructs clients or reads configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from ingestd import errors, trading
from ingestd.clients import redis_async
from ingestd.daemon import migrations, probes
from ingestd.daemon.batching import BatchOutcome, Item
from ingestd.daemon.db import create_pool
from ingestd.daemon.deadletters import DeadLetter
from ingestd.daemon.endpoints import OpsServer
from ingestd.daemon.gaps import GapSweeper
from ingestd.daemon.hedges import HalfHedgeMonitor
from ingestd.daemon.liveness import LivenessRecorder, LivenessWriter
from ingestd.daemon.maintenance import Maintenance
from ingestd.daemon.metrics import Metrics, MetricsCollector, TradingStateCollector, create_registry
from ingestd.daemon.pipeline import Pipeline, Sink, cancel_quietly
from ingestd.daemon.sinks.mirror import RedisMirror
from ingestd.daemon.sinks.postgres import PostgresSink, fetch_all_open_counts, sweep_parked_closes
from ingestd.daemon.sources.inprocess import EventInput, InProcessSource, Outcome
from ingestd.daemon.sources.spooled import SpoolSource
from ingestd.daemon.sources.stream import StreamSource
from ingestd.settings import Settings, redact
from ingestd.spool import Spool
from ingestd.wire import events, keys

log = logging.getLogger("ingestd.daemon.app")


# How long the final XACKs after the drain may take before they are left to redelivery.
FINAL_ACK_TIMEOUT_S: Final = 5.0
# How long the spool may take to finish its last append and close.
SPOOL_CLOSE_TIMEOUT_S: Final = 5.0
# The later stop stages' deadlines (Service.stop): the mirror's last values, the trading lease,
# the endpoints, each client and the pool.
MIRROR_FLUSH_TIMEOUT_S: Final = 5.0
LIVENESS_FLUSH_TIMEOUT_S: Final = 2.0
TRADING_RELEASE_TIMEOUT_S: Final = 2.0
OPS_CLOSE_TIMEOUT_S: Final = 2.0
CLIENT_CLOSE_TIMEOUT_S: Final = 5.0


async def connect_once(settings: Settings) -> asyncpg.Pool:
    """One attempt at the pool; ConfigError where waiting cannot help (malformed DSN, TLS)."""
    try:
        return await create_pool(settings.storage.postgres)
    except (ValueError, asyncpg.ClientConfigurationError) as exc:
        # A malformed DSN does not get better by waiting.
        raise errors.ConfigError(
            f"invalid database URL {redact(settings.storage.postgres.dsn)}: {exc}"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        # A certificate that does not verify is a configuration problem, not an outage.
        raise errors.ConfigError(
            f"TLS verification failed for {redact(settings.storage.postgres.dsn)}: {exc}"
        ) from exc


async def connect_with_retry(settings: Settings, deadline_s: float) -> asyncpg.Pool:
    """Wait for PostgreSQL (compose starts it alongside ingestd) up to ``deadline_s``."""
    end = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return await connect_once(settings)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            if time.monotonic() + delay > end:
                raise errors.SinkUnavailable(
                    f"cannot reach PostgreSQL at {redact(settings.storage.postgres.dsn)}: {exc}"
                ) from exc
            log.warning(
                "PostgreSQL at %s not reachable yet (%s); retrying",
                redact(settings.storage.postgres.dsn),
                exc,
                extra={"action": "db_wait"},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


# A start that does not wait for the database tries it at these intervals (doubling) meanwhile.
BACKGROUND_CONNECT_FIRST_S: Final = 0.2
BACKGROUND_CONNECT_CAP_S: Final = 5.0


class DatabaseWhenConnected:
    """The pipeline's sink for a start that does not wait for the database.

    Until the pool is connected and the schema found current, every write fails as unavailable,
    so the pipeline treats the time before as an outage: in-process events spill to the spool
    and batches are retried. From then on it writes through the ``PostgresSink``.
    """

    def __init__(self) -> None:
        self.sink: PostgresSink | None = None
        self.waiting_for = "PostgreSQL has not answered yet"

    async def write(self, items: Sequence[Item]) -> BatchOutcome:
        """Write through the database sink, or fail as unavailable while there is none."""
        sink = self.sink
        if sink is None:
            raise errors.SinkUnavailable(f"not connected to the database: {self.waiting_for}")
        return await sink.write(items)

    async def probe(self) -> None:
        """Fail as unavailable until connected: a batch is never split or given up for that."""
        await self._connected().probe()

    async def write_dead_letter(self, letter: DeadLetter) -> None:
        """Write through the database sink, or fail as unavailable while there is none."""
        await self._connected().write_dead_letter(letter)

    def describe(self, exc: BaseException) -> tuple[str, str | None]:
        """As the database sink describes a refusal (it needs no connection)."""
        return PostgresSink.describe(exc)

    def _connected(self) -> PostgresSink:
        sink = self.sink
        if sink is None:
            raise errors.SinkUnavailable(f"not connected to the database: {self.waiting_for}")
        return sink


class Service:
    """ingestd as a library: ``async with Service(settings) as s: await s.submit(event)``."""

    def __init__(self, settings: Settings, *, stream_intake: bool | None = None) -> None:
        self.settings = settings
        self._stream_intake = settings.stream.enabled if stream_intake is None else stream_intake
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self._mirror_redis: aioredis.Redis | None = None
        self.pipeline: Pipeline | None = None
        self.mirror: RedisMirror | None = None
        self.stream: StreamSource | None = None
        self._submitter: InProcessSource | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stream_task: asyncio.Task[None] | None = None
        self.spool: Spool | None = None
        self._spool_source: SpoolSource | None = None
        self._spool_task: asyncio.Task[None] | None = None
        # A start that did not wait for the database: its sink, and why it is not connected yet
        # (None once connected; the reason when the database answered but cannot be written).
        self._deferred_sink: DatabaseWhenConnected | None = None
        self.database_error: str | None = None
        self.maintenance: Maintenance | None = None
        self.metrics = Metrics()
        self._collector = MetricsCollector(self.metrics, healthy=self.healthy)
        self.registry = create_registry(self._collector)
        self.ops: OpsServer | None = None
        # trading:state (docs/trading-signals.md) and the intake's heartbeats.
        self.trading: trading.StateKeeper | None = None
        self._trading_redis: aioredis.Redis | None = None
        self._intake_beats = asyncio.Event()
        # The heartbeat history (ingestd/daemon/liveness.py): noted at intake, written every few
        # seconds.
        h = settings.heartbeat_history
        self.liveness: LivenessRecorder | None = (
            LivenessRecorder(gap_s=h.gap_s, max_intervals=h.max_pending_intervals)
            if h.enabled
            else None
        )
        self.liveness_writer: LivenessWriter | None = None
        self._fx_watch = settings.trading.fx_pair.upper()
        self._stopping = False
        self._stopped = False

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(
        self, *, connect_deadline_s: float = 60.0, wait_for_database: bool | None = None
    ) -> None:
        """Open the spool, connect, check the schema, and start intake; on failure, release.

        With a spool and without stream intake (an in-process producer), the start does not
        wait for the database (``wait_for_database`` defaults to that): ``submit()`` works at
        once, spilling to the spool while the database is unreachable, and the database is
        connected (and its schema checked) in the background; the spooled events, including
        those of an earlier run, are replayed once it answers. Otherwise the start waits up to
        ``connect_deadline_s`` and raises if the database is unreachable or its schema behind.
        """
        # Spreads are judged stale at intake, under this configuration's limits.
        events.configure_staleness_from(self.settings)
        try:
            await self._start(connect_deadline_s, wait_for_database)
        except BaseException:
            # __aexit__ does not run when __aenter__ fails: close the pool, the batcher, the
            # spool's lock here (a cancelled start included).
            with contextlib.suppress(Exception):
                await self.stop(grace_s=1)
            raise

    async def _start(self, connect_deadline_s: float, wait_for_database: bool | None) -> None:
        s = self.settings
        if s.spool.directory:
            # Before any contact with the database: the spool is what a producer has while the
            # database is unreachable, and it may hold an earlier run's backlog.
            self.spool = Spool(
                Path(s.spool.directory),
                max_bytes=s.spool.max_bytes,
                segment_bytes=s.spool.segment_bytes,
            )
            await self.spool.open()
        if wait_for_database is None:
            wait_for_database = self.spool is None or self._stream_intake
        sink: Sink
        if wait_for_database:
            self.pool = await connect_with_retry(s, connect_deadline_s)
            async with self.pool.acquire() as conn:
                await migrations.check_current(conn)
            sink = PostgresSink(self.pool, acquire_timeout_s=s.storage.postgres.acquire_timeout_s)
        else:
            sink = self._deferred_sink = DatabaseWhenConnected()
            # No commit can succeed before the database has answered: counted as failing from
            # now (what the pipeline records after a failed batch), so that submitted events go
            # to the spool at once rather than wait spill_after_s in memory, the replay leaves
            # the backlog on disk, and health shows the database is not taking writes.
            self.metrics.flush_failing_since = time.monotonic()
        self.redis = redis_async(
            s.storage.redis.url, socket_timeout_s=s.storage.redis.socket_timeout_s
        )
        self._mirror_redis = redis_async(
            s.storage.redis.url, socket_timeout_s=s.storage.redis.mirror_socket_timeout_s
        )
        self.mirror = RedisMirror(
            self._mirror_redis,
            key_prefix=s.storage.redis.key_prefix,
            fx_ttl_s=s.fx.ttl_seconds,
            spread_ttl_s=s.mirror.spread_ttl_s,
            health_ttl_s=s.mirror.health_ttl_s,
        )
        self.pipeline = Pipeline(sink, self.mirror, s.pipeline, metrics=self.metrics)
        self.pipeline.start()
        if s.trading.enabled:
            self._start_trading_state()
        if self.spool is not None:
            self._spool_source = SpoolSource(
                self.spool,
                self.pipeline,
                max_event_bytes=s.pipeline.max_event_bytes,
                read_count=s.pipeline.batch_max_rows,
            )
            self._spool_task = asyncio.create_task(
                self._spool_source.run(), name="ingestd-spool-replay"
            )
        retention = events.retention_of(s.retention)
        self._submitter = InProcessSource(
            self.pipeline,
            max_event_bytes=s.pipeline.max_event_bytes,
            spool=self.spool,
            spill_after_s=s.spool.spill_after_s,
            max_event_depth=s.pipeline.max_event_depth,
            retention=retention,
            observer=self._observe_intake,
        )
        if self._stream_intake:
            self.stream = StreamSource(
                self.redis,
                self.pipeline,
                s.stream,
                consumer=s.consumer_name,
                max_event_bytes=s.pipeline.max_event_bytes,
                max_event_depth=s.pipeline.max_event_depth,
                retention=retention,
                observer=self._observe_intake,
            )
            self._stream_task = asyncio.create_task(self.stream.run(), name="ingestd-stream")
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="ingestd-heartbeat"),
            asyncio.create_task(self._intake_heartbeat_loop(), name="ingestd-intake-heartbeats"),
        ]
        if self.trading is not None:
            self._tasks.append(asyncio.create_task(self._trading_loop(), name="ingestd-trading"))
        if self.pool is not None:
            self._start_database_tasks(self.pool)
        else:
            self._tasks.append(
                asyncio.create_task(self._connect_in_background(), name="ingestd-db-connect")
            )
        await self._start_ops()
        log.info(
            "ingestd started: database %s%s, redis %s, stream %s, consumer %s",
            redact(s.storage.postgres.dsn),
            "" if self.pool is not None else " (connecting in the background; spooling)",
            redact(s.storage.redis.url),
            s.stream.key if self._stream_intake else "off",
            s.consumer_name,
            extra={"action": "started"},
        )

    def _start_database_tasks(self, pool: asyncpg.Pool) -> None:
        """The tasks that need the database: open-count reconciliation, maintenance."""
        s = self.settings
        assert self.redis is not None
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="ingestd-reconcile"))
        if s.half_hedge.enabled:
            hedges = HalfHedgeMonitor(
                pool,
                self.redis,
                self.metrics,
                settings=s.half_hedge,
                key_prefix=s.storage.redis.key_prefix,
                acquire_timeout_s=s.storage.postgres.acquire_timeout_s,
            )
            self._tasks.append(asyncio.create_task(hedges.run(), name="ingestd-half-hedges"))
        if s.producer_gaps.enabled:
            sweeper = GapSweeper(
                pool,
                self.metrics,
                grace_s=s.producer_gaps.grace_s,
                interval_s=s.producer_gaps.check_interval_s,
                acquire_timeout_s=s.storage.postgres.acquire_timeout_s,
            )
            self._tasks.append(asyncio.create_task(sweeper.run(), name="ingestd-gaps"))
        if self.liveness is not None:
            self.liveness_writer = LivenessWriter(
                pool,
                self.liveness,
                gap_s=s.heartbeat_history.gap_s,
                flush_interval_s=s.heartbeat_history.flush_interval_s,
                acquire_timeout_s=s.storage.postgres.acquire_timeout_s,
            )
            self._tasks.append(
                asyncio.create_task(self.liveness_writer.run(), name="ingestd-heartbeat-history")
            )
        if s.maintenance.enabled:
            self.maintenance = Maintenance(
                pool,
                self.redis,
                settings=s.maintenance,
                retention=s.retention,
                key_prefix=s.storage.redis.key_prefix,
                acquire_timeout_s=s.storage.postgres.acquire_timeout_s,
            )
            self._tasks.append(
                asyncio.create_task(self.maintenance.run(), name="ingestd-maintenance")
            )

    async def _connect_in_background(self) -> None:
        """Connect and check the schema until both succeed; then writes go to the database.

        Until then the pipeline's batches fail as unavailable (and are retried) and in-process
        events wait on the spool. A database that answers with a schema that is behind (or a
        configuration it refuses) is not written to: the reason is logged as an error and kept
        in ``database_error``, and the check is repeated, so that ``ingestd migrate`` (or a
        renewed certificate) lets the spooled events land without a restart.
        """
        s = self.settings
        sink = self._deferred_sink
        assert sink is not None
        dsn = redact(s.storage.postgres.dsn)
        delay = BACKGROUND_CONNECT_FIRST_S
        last_reason = ""
        while True:
            try:
                pool = await self._connect_and_check()
            except Exception as exc:  # noqa: BLE001 - every failure is retried; none is lost
                refused = isinstance(exc, errors.IngestdError)  # config, schema: not an outage
                reason = str(exc) if refused else f"{type(exc).__name__}: {exc}"
                sink.waiting_for = reason
                self.database_error = reason if refused else None
                if reason != last_reason:
                    log.log(
                        logging.ERROR if refused else logging.WARNING,
                        "PostgreSQL at %s not usable yet (%s); in-process events wait on the "
                        "spool, retrying",
                        dsn,
                        reason,
                        extra={"action": "db_wait"},
                    )
                    last_reason = reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKGROUND_CONNECT_CAP_S)
                continue
            self.pool = pool
            self.database_error = None
            sink.sink = PostgresSink(pool, acquire_timeout_s=s.storage.postgres.acquire_timeout_s)
            # Commits can succeed from now: the replay starts without waiting for a batch's next
            # retry (a batch that still fails marks it failing again).
            self.metrics.flush_failing_since = None
            if not self._stopping:
                self._start_database_tasks(pool)
            log.info(
                "connected to PostgreSQL at %s: spooled events are replayed",
                dsn,
                extra={"action": "db_connected"},
            )
            return

    async def _connect_and_check(self) -> asyncpg.Pool:
        pool = await connect_once(self.settings)
        try:
            async with pool.acquire(
                timeout=self.settings.storage.postgres.acquire_timeout_s
            ) as conn:
                await migrations.check_current(conn)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def submit(self, event: EventInput) -> Outcome:
        """Accept one event in-process: once committed, or spooled (see InProcessSource)."""
        if self._submitter is None:
            raise errors.ShuttingDown("the service is not running")
        return await self._submitter.submit(event)

    async def submit_many(self, batch: Iterable[EventInput]) -> list[Outcome]:
        """Accept many events with one wait; bad ones come back as ``DEAD_LETTER``."""
        if self._submitter is None:
            raise errors.ShuttingDown("the service is not running")
        return await self._submitter.submit_many(batch)

    async def _start_ops(self) -> None:
        """Export the metrics and, with a port configured, serve /metrics, /healthz, /readyz."""
        assert self.pipeline is not None and self.redis is not None
        self._collector.queue = self.pipeline.queue
        self._collector.mirror = self.mirror
        self._collector.stream = self.stream
        self._collector.spool = self.spool
        if self.stream is not None:
            # Sampled with or without the endpoint: health (and the heartbeat) read it.
            sampler = probes.sample_stream_forever(
                self.redis, self.stream.key, self.stream.group, self.metrics
            )
            self._tasks.append(asyncio.create_task(sampler, name="ingestd-stream-sample"))
        if not self.settings.metrics_port:
            return
        self.ops = OpsServer(
            self.registry,
            healthy=self.health_report,
            ready=self.ready,
            host=self.settings.metrics_host,
            port=self.settings.metrics_port,
        )
        try:
            await self.ops.start()
        except OSError as exc:
            await self.stop(grace_s=1)
            raise errors.ConfigError(
                f"cannot serve metrics on {self.settings.metrics_host}:"
                f"{self.settings.metrics_port}: {exc.strerror or exc}"
            ) from exc

    def health_report(self) -> tuple[bool, str]:
        """``/healthz``: (alive, one-line reason); alive means events still get committed."""
        if self.pipeline is None:
            return False, "unhealthy: not started"
        if not self.pipeline.batching:
            return False, "unhealthy: the batching loop has stopped"
        stream = self._stream_task
        if stream is not None and stream.done() and not self._stopping:
            return False, "unhealthy: stream intake has stopped"
        replay = self._spool_task
        if replay is not None and replay.done() and not self._stopping:
            return False, "unhealthy: the spool replay has stopped"
        m = self.pipeline.metrics
        since = m.flush_failing_since
        if since is not None:
            failing = time.monotonic() - since
            if failing >= 2 * self.settings.pipeline.flush_timeout_s:
                return False, f"unhealthy: batches failing to commit for {failing:.0f}s"
        quarantine = self.pipeline.quarantine
        if quarantine.holds_entries():
            # Until an operator has replayed them and moved the file away (docs/operations.md,
            # Quarantine).
            return False, (
                f"unhealthy: entries quarantined in {quarantine.path} "
                "(refused by the database and by dead_letters): replay them, then move the file"
            )
        if self.stream is not None and m.stream_problem is not None:
            return False, f"unhealthy: {m.stream_problem}"
        limit = self.settings.pipeline.max_pending_age_s
        ages = [self.pipeline.oldest_pending_age_s()]
        if self.stream is not None:
            ages.append(m.stream_oldest_pending_s)
        oldest = max((a for a in ages if a is not None), default=None)
        if oldest is not None and oldest > limit:
            return False, (
                f"unhealthy: the oldest pending entry has waited {oldest:.0f}s "
                f"(> pipeline.max_pending_age_s={limit:g})"
            )
        return True, "ok"

    async def ready(self) -> tuple[bool, dict[str, str]]:
        """``/readyz``: a commit can succeed (the database takes a write, schema current), Redis
        reachable, the stream key usable, intake open, and healthy (see ``health_report``)."""
        accepting = self.pipeline is not None and self.pipeline.accepting
        ready, checks = await probes.readiness(
            self.pool,
            self.redis,
            accepting=accepting,
            stream_key=None if self.stream is None else self.stream.key,
        )
        if self.pipeline is not None:
            healthy, reason = self.health_report()
            checks["health"] = probes.OK if healthy else reason
            ready = ready and healthy
        return ready, checks

    def healthy(self) -> bool:
        """False once events no longer get committed (see ``health_report``)."""
        return self.health_report()[0]

    async def _heartbeat_loop(self) -> None:
        assert self.mirror is not None
        while True:
            if self.healthy():
                now = dt.datetime.now(dt.UTC)
                # health:ingestd (any replica alive) and this replica's own, which
                # its container's health check reads.
                self.mirror.stage_heartbeat(keys.INGESTD_COMPONENT, now)
                replica = keys.replica_component(self.settings.consumer_name)
                self.mirror.stage_heartbeat(replica, now)
                if self.liveness is not None:
                    self.liveness.note(replica, now)
            await self.mirror.flush()
            await asyncio.sleep(self.settings.mirror.heartbeat_interval_s)

    def _start_trading_state(self) -> None:
        t = self.settings.trading
        # A client of its own, with the mirror's short timeout: a hung Redis must not hold the
        # state loop past the key's TTL (it expires: HALTED), nor wait behind stream reads.
        self._trading_redis = redis_async(
            self.settings.storage.redis.url,
            socket_timeout_s=min(self.settings.storage.redis.mirror_socket_timeout_s, t.interval_s),
        )
        self.trading = trading.StateKeeper(
            self._trading_redis,
            t,
            replica=self.settings.consumer_name,
            key_prefix=self.settings.storage.redis.key_prefix,
            local=self._local_trading_report,
        )
        self.registry.register(TradingStateCollector(self.trading, list(trading.state_names())))

    def _local_trading_report(self) -> trading.LocalReport:
        """This replica's part of trading:state: its commit failures and its ingest lag."""
        assert self.pipeline is not None
        m = self.pipeline.metrics
        since = m.flush_failing_since
        failing = None if since is None else time.monotonic() - since
        ages = [self.pipeline.oldest_pending_age_s()]
        if self.stream is not None:
            # Entries read and not yet committed, and entries not read at all (a backlog that
            # the replicas do not keep up with is as late as one that does not commit).
            ages += [m.stream_oldest_pending_s, m.stream_oldest_undelivered_s]
        lag = max((a for a in ages if a is not None), default=None)
        return trading.LocalReport(failing_s=failing, lag_s=lag)

    async def _trading_loop(self) -> None:
        assert self.trading is not None
        interval = self.settings.trading.interval_s
        while not self._cancelled():
            started = time.monotonic()
            await self.trading.tick()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _cancelled(self) -> bool:
        """True once stopping or once this task was cancelled: redis-py can turn a cancellation
        into a connection error (which the loops ride out), and a loop that went on would open
        connections on a closed client."""
        task = asyncio.current_task()
        return self._stopping or (task is not None and task.cancelling() > 0)

    def _observe_intake(self, items: Sequence[Item]) -> None:
        """Called by the sources as events are taken in, before any commit.

        A heartbeat's ``health:{component}`` is written now (by its event time, through the
        mirror's set-if-newer, so the write after the commit changes nothing): a live collector
        stays visibly alive while the database is down. The watched FX pair's newest event time
        feeds trading:state, which must not wait for the database either.
        """
        mirror = self.mirror
        keeper = self.trading
        liveness = self.liveness
        beats = False
        for item in items:
            ev = item.event
            if ev is None:
                continue
            etype = ev.type
            if etype == "heartbeat" and mirror is not None:
                mirror.stage_heartbeat(str(ev.values["component"]), ev.time)
                beats = True
                if liveness is not None:
                    liveness.note(str(ev.values["component"]), ev.time)
            elif (
                etype == "fx_rate"
                and keeper is not None
                and str(ev.values["pair"]).upper() == self._fx_watch
            ):
                keeper.note_fx_time(ev.time)
        if beats:
            self._intake_beats.set()

    async def _intake_heartbeat_loop(self) -> None:
        """Write the heartbeats staged at intake as soon as they come (one write per wake-up);
        what Redis refuses stays staged and goes with the next flush."""
        assert self.mirror is not None
        while not self._cancelled():
            await self._intake_beats.wait()
            self._intake_beats.clear()
            await self.mirror.flush()

    async def _reconcile_loop(self) -> None:
        assert self.pool is not None and self.mirror is not None
        while True:
            try:
                async with self.pool.acquire(
                    timeout=self.settings.storage.postgres.acquire_timeout_s
                ) as conn:
                    counts, version = await fetch_all_open_counts(conn)
                self.mirror.stage_open_counts(counts, version)
                await self.mirror.flush()
            except Exception as exc:  # noqa: BLE001 - the next round retries; never die silently
                log.log(
                    logging.WARNING if errors.is_retriable(exc) else logging.ERROR,
                    "open-count reconciliation failed: %s: %s",
                    type(exc).__name__,
                    exc,
                    extra={"action": "reconcile_failed"},
                )
            await self._sweep_parked_closes()
            await asyncio.sleep(self.settings.mirror.open_count_reconcile_s)

    async def _sweep_parked_closes(self) -> None:
        """Count the closes waiting for their open; those past the age become dead letters."""
        assert self.pool is not None
        try:
            async with self.pool.acquire(
                timeout=self.settings.storage.postgres.acquire_timeout_s
            ) as conn:
                parked = await sweep_parked_closes(
                    conn, max_age_s=self.settings.pipeline.parked_close_max_age_s
                )
        except Exception as exc:  # noqa: BLE001 - the next round retries; never die silently
            log.log(
                logging.WARNING if errors.is_retriable(exc) else logging.ERROR,
                "sweeping the parked position closes failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"action": "parked_close_sweep_failed"},
            )
            return
        self.metrics.observe_parked_closes(
            parked.waiting, parked.oldest_age_s, parked.dead_lettered
        )
        if parked.dead_lettered:
            log.warning(
                "%d position close(s) waited longer than %g s for their open: now dead letters",
                parked.dead_lettered,
                self.settings.pipeline.parked_close_max_age_s,
                extra={"action": "parked_closes_dead_lettered"},
            )

    async def stop(self, grace_s: float | None = None) -> bool:
        """Staged shutdown: stop intake, drain within the grace period, cancel; True if clean.

        Each stage has its own deadline (the constants above; the drain's is what is left of
        the grace period), so a hung server holds up one stage by that much at most and every
        later stage still runs: the clients and the pool are always closed.
        """
        if self._stopped:
            return True
        self._stopped = True
        self._stopping = True
        grace = self.settings.shutdown.grace_s if grace_s is None else grace_s
        t0 = time.monotonic()
        clean = await self._stop_intake()
        clean = await self._drain(grace, max(0.1, grace - (time.monotonic() - t0))) and clean
        clean = self._fail_uncommitted_submits() and clean
        await self._send_final_acks()
        await self._cancel_background_tasks()
        await self._close_spool()
        await self._flush_mirror()
        await self._flush_liveness()
        await self._release_trading_lease()
        await self._close_ops_server()
        await self._close_clients()
        log.info(
            "ingestd stopped (%s) after %.2fs",
            "clean" if clean else "forced",
            time.monotonic() - t0,
            extra={"action": "stopped"},
        )
        return clean

    async def _stop_intake(self) -> bool:
        """Stage 1: no new entries. The stream reader ends its current read (deadline: one
        blocking read plus 2 s, then it is cancelled); the spool replay is cancelled, what it
        had not replayed stays on the spool, durable, for the next start. False if the stream
        intake had already died."""
        clean = True
        if self.stream is not None:
            self.stream.stop()
        if self._stream_task is not None:
            try:
                async with asyncio.timeout(self.settings.stream.block_ms / 1000 + 2):
                    # gather: an intake that already died must not keep the rest from draining
                    (ended,) = await asyncio.gather(self._stream_task, return_exceptions=True)
            except TimeoutError:
                await cancel_quietly(self._stream_task)
            else:
                if isinstance(ended, BaseException):
                    clean = False
                    log.error(
                        "stream intake had stopped: %r", ended, extra={"action": "intake_failed"}
                    )
        if self._spool_source is not None:
            self._spool_source.stop()
            await cancel_quietly(self._spool_task)
        return clean

    async def _drain(self, grace_s: float, deadline_s: float) -> bool:
        """Stage 2: write everything queued and in flight (deadline: what is left of the grace
        period), else cancel it: unacknowledged entries are redelivered. False if cancelled."""
        if self.pipeline is None:
            return True
        try:
            async with asyncio.timeout(deadline_s):
                await self.pipeline.drain()
        except TimeoutError:
            log.error(
                "drain exceeded the %.1fs grace period; cancelling (unacknowledged "
                "entries will be redelivered)",
                grace_s,
                extra={"action": "drain_timeout"},
            )
            await self.pipeline.abort()
            return False
        except Exception as exc:  # noqa: BLE001 - the batching loop had died of a bug
            # Nothing it held was acknowledged: the stream redelivers it after a restart.
            log.error("drain failed: %r", exc, extra={"action": "drain_failed"})
            await self.pipeline.abort()
            return False
        return True

    def _fail_uncommitted_submits(self) -> bool:
        """Stage 3 (no wait): in-process callers still waiting hear that their event was not
        committed by this process. False if there were any."""
        if self._submitter is None:
            return True
        left = self._submitter.fail_pending(
            errors.ShuttingDown("ingestd stopped before the event was committed")
        )
        if left:
            log.error(
                "%d in-process events were not committed before the stop",
                left,
                extra={"action": "submit_abandoned"},
            )
        return not left

    async def _send_final_acks(self) -> None:
        """Stage 4: the last XACKs (deadline FINAL_ACK_TIMEOUT_S). With Redis hung they are
        given up: the entries are redelivered and land once, rather than holding up the exit."""
        if self.stream is None:
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(FINAL_ACK_TIMEOUT_S):
                await self.stream.finish()

    async def _cancel_background_tasks(self) -> None:
        """Stage 5: the background loops (maintenance, sweeps, samplers, trading), cancelled
        together, not one after the other: each may take its whole deadline
        (``cancel_quietly``'s, TASK_CANCEL_TIMEOUT_S)."""
        await asyncio.gather(*(cancel_quietly(task) for task in self._tasks))

    async def _close_spool(self) -> None:
        """Stage 6: the spool's last append and close (deadline SPOOL_CLOSE_TIMEOUT_S)."""
        if self.spool is None:
            return
        try:
            async with asyncio.timeout(SPOOL_CLOSE_TIMEOUT_S):
                await self.spool.close()
        except TimeoutError:
            # A hung disk: what was fsync'd stays for the next start; the rest was never
            # acknowledged (its callers are still waiting in memory or were failed above).
            log.error("the spool did not close in time", extra={"action": "spool_stuck"})

    async def _flush_mirror(self) -> None:
        """Stage 7: the mirror's pending values (deadline MIRROR_FLUSH_TIMEOUT_S). Redis is a
        cache: values not written by then are simply not mirrored by this process."""
        if self.mirror is None:
            return
        try:
            async with asyncio.timeout(MIRROR_FLUSH_TIMEOUT_S):
                await self.mirror.flush()
        except TimeoutError:
            log.warning(
                "the mirror's last values were not written in %.0fs: left out",
                MIRROR_FLUSH_TIMEOUT_S,
                extra={"action": "mirror_flush_timeout"},
            )

    async def _flush_liveness(self) -> None:
        """Stage 8: the heartbeats noted since the liveness writer's last write (deadline
        LIVENESS_FLUSH_TIMEOUT_S: the pool may be gone)."""
        if self.liveness_writer is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LIVENESS_FLUSH_TIMEOUT_S):
                await self.liveness_writer.flush()

    async def _release_trading_lease(self) -> None:
        """Stage 9: the trading-state lease (deadline TRADING_RELEASE_TIMEOUT_S), after the
        trading loop was cancelled: nothing renews it any more. Unreleased, it expires."""
        if self.trading is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TRADING_RELEASE_TIMEOUT_S):
                await self.trading.release()

    async def _close_ops_server(self) -> None:
        """Stage 10: the health and metrics endpoints (deadline OPS_CLOSE_TIMEOUT_S)."""
        if self.ops is None:
            return
        try:
            async with asyncio.timeout(OPS_CLOSE_TIMEOUT_S):
                await self.ops.close()
        except TimeoutError:
            log.warning("the ops endpoints did not close in time", extra={"action": "ops_stuck"})

    async def _close_clients(self) -> None:
        """Stage 11: the Redis clients and the database pool (deadline CLIENT_CLOSE_TIMEOUT_S
        each, together; a pool that does not close in time is terminated)."""

        async def close_redis(client: aioredis.Redis) -> None:
            try:
                async with asyncio.timeout(CLIENT_CLOSE_TIMEOUT_S):
                    await client.aclose()
            except TimeoutError:
                log.warning("a Redis client did not close in time", extra={"action": "stuck"})

        async def close_pool(pool: asyncpg.Pool) -> None:
            try:
                async with asyncio.timeout(CLIENT_CLOSE_TIMEOUT_S):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

        closing = [
            close_redis(client)
            for client in (self.redis, self._mirror_redis, self._trading_redis)
            if client is not None
        ]
        if self.pool is not None:
            closing.append(close_pool(self.pool))
        await asyncio.gather(*closing)


# The intake allocates a few short-lived objects per event and holds tens of thousands of events
# in its queue and batches. With CPython's default collector thresholds (700, 10, 10) the cyclic
# collector runs every few hundred events and keeps re-scanning what the queue holds: measured
# here, 20-30 % of the daemon's CPU. Almost everything is freed by reference counting anyway, so
# the young generation is collected every 50,000 allocations and older ones rarely; objects that
# live as long as the process (modules, settings, clients) are frozen out of collection.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_gc_for_throughput() -> None:
    """Apply GC_THRESHOLDS and freeze what exists: the daemon's setting, not a library's."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


async def run_daemon(settings: Settings) -> int:
    """``ingestd run``: until SIGTERM/SIGINT, then drain; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "received %s: draining", signal.Signals(signum).name, extra={"action": "signal"}
            )
            stop.set()
        else:
            # Nothing is acknowledged without a commit, so exiting now loses nothing: the
            # unacknowledged entries are redelivered to the next consumer.
            os.write(2, b"second signal: exiting immediately\n")
            os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    service = Service(settings)
    # A signal while starting (e.g. waiting for PostgreSQL) ends the start too: nothing has been
    # read yet, so there is nothing to drain.
    # The daemon refuses a database it cannot use (unreachable, schema behind) at the start.
    starting = asyncio.create_task(service.start(wait_for_database=True), name="ingestd-start")
    stopping = asyncio.create_task(stop.wait(), name="ingestd-stop-signal")
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.IngestdError):
            await starting
        await service.stop(grace_s=1)
        log.info("stopped before the start completed", extra={"action": "stopped"})
        return 0
    stopping.cancel()
    try:
        starting.result()
    except errors.IngestdError as exc:
        log.error("%s", exc, extra={"action": "start_failed"})
        return 2
    tune_gc_for_throughput()
    await stop.wait()
    clean = await service.stop()
    return 0 if clean else 3
