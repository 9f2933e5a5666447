"""The frozen settings object: built once from YAML, the environment and CLI flags.

Nothing else in ingestd reads the environment. Precedence: defaults < YAML file < environment
(``DATABASE_URL``, ``REDIS_URL``, ``INGESTD_CONSUMER``, ``INGESTD_METRICS_PORT``,
``INGESTD_METRICS_HOST``) < CLI flags.

Configuration is input: the YAML file is parsed first and ``${VAR}`` expanded in its string values
afterwards (so a value may hold ``#`` or quotes, and a comment is never expanded); ``check()``
refuses NaN and infinity, negative numbers, zero durations and TTLs (where 0 does not mean "off"),
counts outside their range and URLs the drivers cannot parse. Every refusal is a ConfigError whose
message names the key and never quotes a secret.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from ingestd.errors import ConfigError

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/ingestd"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresSettings:
    """Connection pool to PostgreSQL/TimescaleDB."""

    dsn: str = DEFAULT_DATABASE_URL
    pool_min_size: int = 2
    pool_max_size: int = 6
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 10.0
    acquire_timeout_s: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class RedisSettings:
    """The Redis that holds the event stream and the mirror keys."""

    url: str = DEFAULT_REDIS_URL
    key_prefix: str = ""
    socket_timeout_s: float = 5.0
    mirror_socket_timeout_s: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class CsvSettings:
    """Where producers' ``CsvStorage`` writes (backend ``csv`` or ``dual``) and how it fsyncs."""

    dir: str = "data/csv"
    fsync_interval_s: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxSettings:
    """The ``postgres`` backend's local outbox: every logged event, on disk until published.

    Each producer gets ``<dir>/<producer name>``; an empty ``dir`` keeps events in memory only.
    """

    dir: str = "data/outbox"
    max_bytes: int = 1024 * 1024 * 1024
    segment_bytes: int = 16 * 1024 * 1024
    # Written before log_* returns (survives kill -9); fsync'd at most this much later (power loss).
    fsync_interval_s: float = 0.05


@dataclasses.dataclass(frozen=True, slots=True)
class StorageSettings:
    """The ``storage`` section: the producers' backend and ingestd's servers."""

    backend: str = "postgres"
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    csv: CsvSettings = CsvSettings()
    outbox: OutboxSettings = OutboxSettings()
    # Producer side (ingestd.producer.storage): events held in memory while the stream is
    # unreachable.
    buffer_max_events: int = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class FxSettings:
    """The ``fx`` section: the TTL of ``fx:{pair}`` keys."""

    ttl_seconds: float = 3.0


@dataclasses.dataclass(frozen=True, slots=True)
class SpreadSettings:
    """Spreads: when their inputs are stale (with ``fx.ttl_seconds`` for the FX rate's age)."""

    # A spread whose upbit_ts and binance_ts are further apart than this is stored as stale.
    stale_skew_s: float = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class StreamSettings:
    """The Redis Stream intake."""

    enabled: bool = True
    key: str = "ingestd:events"
    group: str = "ingestd"
    consumer: str = ""
    read_count: int = 2000
    read_max_bytes: int = 16 * 1024 * 1024  # entries per read follow their recent size
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 15.0
    trim_interval_s: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineSettings:
    """Queue, batching and writers."""

    queue_max_events: int = 20_000
    queue_max_bytes: int = 64 * 1024 * 1024  # payload bytes in the queue (a chunk may overshoot)
    batch_max_rows: int = 5_000
    batch_max_age_ms: int = 100
    batch_max_bytes: int = 4 * 1024 * 1024  # a batch is also cut at this many payload bytes
    writers: int = 2
    flush_timeout_s: float = 30.0
    max_event_bytes: int = 1_048_576
    max_event_depth: int = 32  # arrays/objects nested deeper are bad input (an event is level 1)
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 15.0
    # A position_close whose open has not arrived waits this long, then is a dead letter.
    parked_close_max_age_s: float = 86_400.0
    # An entry the database refuses alone this many times (while it takes other writes)
    # becomes a dead letter; one whose dead letter is refused too goes to the quarantine file.
    max_entry_attempts: int = 3
    quarantine_path: str = "data/ingestd-quarantine.jsonl"
    # /healthz, /readyz and the heartbeat fail while an entry waits uncommitted this long.
    max_pending_age_s: float = 120.0


@dataclasses.dataclass(frozen=True, slots=True)
class MirrorSettings:
    """Redis mirror TTLs and ingestd's own heartbeat."""

    spread_ttl_s: float = 60.0
    health_ttl_s: float = 10.0
    heartbeat_interval_s: float = 2.0
    open_count_reconcile_s: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class SpoolSettings:
    """The local spool for in-process events past the in-memory bound (empty directory: off)."""

    directory: str = ""
    max_bytes: int = 1024 * 1024 * 1024
    segment_bytes: int = 16 * 1024 * 1024
    # An in-memory event not committed within this long is spooled, so producers go on.
    spill_after_s: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownSettings:
    """Staged shutdown: drain within ``grace_s``, then cancel."""

    grace_s: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionSettings:
    """Retention in days (0 keeps rows forever); see ingestd/daemon/maintenance.py."""

    spreads_days: int = 90
    fx_rates_days: int = 180
    orders_days: int = 365
    delete_batch_rows: int = 10_000  # plain PostgreSQL: rows per DELETE statement
    # The trading-safety history, trimmed by the owner's retention on both flavours (never the
    # open ones: an open alert or gap stays until it is cleared or closed).
    alerts_days: int = 365  # cleared alerts, by cleared_at
    producer_gaps_days: int = 90  # closed gaps, by closed_at
    # The seq ranges of a (producer, session) quiet this long and without an open gap.
    producer_seq_ranges_days: int = 30
    heartbeat_history_days: int = 90  # liveness intervals, by their last heartbeat


@dataclasses.dataclass(frozen=True, slots=True)
class MaintenanceSettings:
    """The maintenance task: view refreshes, plain-PostgreSQL retention, ``metrics:*`` keys."""

    enabled: bool = True
    refresh_interval_s: float = 60.0
    metrics_interval_s: float = 60.0
    retention_interval_s: float = 600.0
    policy_interval_s: float = 3600.0
    metrics_days: int = 7
    metrics_hours: int = 48
    statement_timeout_s: float = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class HalfHedgeSettings:
    """Half-hedge alerts (ingestd/daemon/hedges.py): a position's filled legs that do not match."""

    enabled: bool = True
    # Raised once a position's legs have not matched for this long.
    after_s: float = 30.0
    # Legs match when they differ by at most this fraction of the larger one (0.001 = 0.1 %);
    # read as the decimal it is written as (0.001 is exactly 1/1000, not the nearest float).
    quantity_tolerance: float = 0.001
    check_interval_s: float = 5.0
    # Positions with a leg newer than this (or an open alert) are checked.
    lookback_s: float = 86_400.0
    # The two venues whose legs hedge each other, comma-separated.
    venues: str = "upbit,binance_futures"

    @property
    def tolerance(self) -> Decimal:
        """The tolerance as written (0.001 stays 1/1000): repr is a float's shortest spelling."""
        return Decimal(repr(self.quantity_tolerance))

    @property
    def venue_pair(self) -> tuple[str, str]:
        """The two venues, as configured."""
        first, second = (v.strip() for v in self.venues.split(","))
        return first, second


@dataclasses.dataclass(frozen=True, slots=True)
class ProducerGapSettings:
    """Producer gap detection (ingestd/daemon/gaps.py) over the events' ``seq`` / ``session``."""

    enabled: bool = True
    # A hole in a session's seqs is a gap once the seqs above it are this old (a stream entry of
    # a dead replica is reclaimed after stream.claim_idle_ms, 30 s by default).
    grace_s: float = 60.0
    check_interval_s: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatHistorySettings:
    """Heartbeat history (ingestd/daemon/liveness.py): when each component was alive, in the
    database."""

    enabled: bool = True
    # A heartbeat within this long of an interval's last one extends it; a later one opens a new
    # interval (the component was down in between). The health key's TTL by default.
    gap_s: float = 10.0
    # The heartbeats taken in are coalesced in memory and written this often.
    flush_interval_s: float = 5.0
    # Intervals held in memory while the database is unreachable; past it the oldest are dropped.
    max_pending_intervals: int = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class TradingSettings:
    """``trading:state`` (docs/trading-signals.md): limits, hysteresis, how it is written."""

    enabled: bool = True
    # HALTED while commits have failed this long, or the oldest unacknowledged entry is older.
    max_commit_failing_s: float = 10.0
    max_ingest_lag_s: float = 30.0
    # HALTED while health:{collector_component} or the newest fx_pair rate is older ("" = off).
    collector_component: str = "collector"
    max_heartbeat_age_s: float = 10.0
    fx_pair: str = "USDKRW"
    max_fx_age_s: float = 10.0
    # Back to a less severe state only after the conditions have allowed it this long.
    recover_after_s: float = 30.0
    interval_s: float = 1.0
    state_ttl_s: float = 10.0
    # The writer's lease: another replica takes over this long after the writer is gone.
    lease_s: float = 3.0


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything ingestd needs, frozen."""

    storage: StorageSettings = StorageSettings()
    fx: FxSettings = FxSettings()
    spreads: SpreadSettings = SpreadSettings()
    stream: StreamSettings = StreamSettings()
    pipeline: PipelineSettings = PipelineSettings()
    mirror: MirrorSettings = MirrorSettings()
    spool: SpoolSettings = SpoolSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    retention: RetentionSettings = RetentionSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    half_hedge: HalfHedgeSettings = HalfHedgeSettings()
    producer_gaps: ProducerGapSettings = ProducerGapSettings()
    trading: TradingSettings = TradingSettings()
    heartbeat_history: HeartbeatHistorySettings = HeartbeatHistorySettings()
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"  # the container image sets 0.0.0.0
    log_format: str = "plain"
    log_level: str = "INFO"

    @property
    def consumer_name(self) -> str:
        """This replica's stable consumer name: configured, else the host name."""
        return self.stream.consumer or socket.gethostname()

    def replace(self, **changes: Any) -> Settings:
        """A copy with dotted-path changes, e.g. ``replace(**{"pipeline.writers": 3})``."""
        updated: Settings = _replace_dotted(self, changes)
        return updated

    def check(self) -> Settings:
        """Raise ConfigError on values that cannot work; return self."""
        _check_numbers(self, "")
        for where, (low, high) in INT_BOUNDS.items():
            value = _get_dotted(self, where)
            if not low <= value <= high:
                raise ConfigError(f"{where} must be {low}-{high}, got {value}")
        _check_url("storage.postgres.dsn (DATABASE_URL)", self.storage.postgres.dsn, _PG_SCHEMES)
        _check_url("storage.redis.url (REDIS_URL)", self.storage.redis.url, _REDIS_SCHEMES)
        pg, mirror = self.storage.postgres, self.mirror
        if pg.pool_min_size > pg.pool_max_size:
            raise ConfigError("storage.postgres.pool_min_size must be <= pool_max_size")
        if mirror.heartbeat_interval_s >= mirror.health_ttl_s:
            # Otherwise health:ingestd expires between two beats and a healthy replica looks dead.
            raise ConfigError(
                "mirror.heartbeat_interval_s must be shorter than mirror.health_ttl_s"
            )
        if self.pipeline.backoff_base_s > self.pipeline.backoff_cap_s:
            raise ConfigError("pipeline.backoff_base_s must be <= pipeline.backoff_cap_s")
        p = self.pipeline
        if p.batch_max_rows < 1 or p.queue_max_events < p.batch_max_rows:
            raise ConfigError(
                "pipeline.queue_max_events must be >= pipeline.batch_max_rows >= 1 "
                f"(got {p.queue_max_events} and {p.batch_max_rows})"
            )
        if p.writers < 1:
            raise ConfigError("pipeline.writers must be >= 1")
        if p.queue_max_bytes < 1 or p.batch_max_bytes < 1:
            raise ConfigError("pipeline.queue_max_bytes and pipeline.batch_max_bytes must be >= 1")
        if p.max_event_depth < 1 or self.stream.read_max_bytes < 1:
            raise ConfigError("pipeline.max_event_depth and stream.read_max_bytes must be >= 1")
        if p.max_entry_attempts < 1:
            raise ConfigError("pipeline.max_entry_attempts must be >= 1")
        if not p.quarantine_path:
            raise ConfigError("pipeline.quarantine_path must name a file")
        if not p.max_pending_age_s > 0:
            raise ConfigError("pipeline.max_pending_age_s must be > 0")
        if self.storage.postgres.pool_max_size < p.writers + 1:
            raise ConfigError(
                "storage.postgres.pool_max_size must exceed pipeline.writers "
                f"(got {self.storage.postgres.pool_max_size} for {p.writers} writers)"
            )
        if self.stream.block_ms / 1000 >= self.storage.redis.socket_timeout_s:
            raise ConfigError("stream.block_ms must be shorter than storage.redis.socket_timeout_s")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (off) or 1-65535, got {self.metrics_port}")
        if self.log_format not in {"plain", "json"}:
            raise ConfigError("log_format must be 'plain' or 'json'")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        if self.storage.backend not in {"postgres", "csv", "dual"}:
            raise ConfigError("storage.backend must be one of csv, postgres, dual")
        if self.spool.segment_bytes < 1024 or self.spool.max_bytes < self.spool.segment_bytes:
            raise ConfigError("spool.segment_bytes must be >= 1024 and <= spool.max_bytes")
        o = self.storage.outbox
        if o.segment_bytes < 1024 or o.max_bytes < o.segment_bytes:
            raise ConfigError(
                "storage.outbox.segment_bytes must be >= 1024 and <= storage.outbox.max_bytes"
            )
        r, m = self.retention, self.maintenance
        for name in RETENTION_DAY_FIELDS:
            if getattr(r, name) < 0:
                raise ConfigError(f"retention.{name} must be >= 0 (0 keeps rows forever)")
            if getattr(r, name) > MAX_RETENTION_DAYS:
                raise ConfigError(
                    f"retention.{name} must be at most {MAX_RETENTION_DAYS} (0 keeps rows forever)"
                )
        if not 1 <= r.delete_batch_rows <= MAX_SQL_INT:
            raise ConfigError(f"retention.delete_batch_rows must be 1-{MAX_SQL_INT}")
        for name in (
            "refresh_interval_s",
            "metrics_interval_s",
            "retention_interval_s",
            "policy_interval_s",
            "statement_timeout_s",
        ):
            if getattr(m, name) <= 0:
                raise ConfigError(f"maintenance.{name} must be > 0")
        if self.heartbeat_history.max_pending_intervals < 1:
            raise ConfigError("heartbeat_history.max_pending_intervals must be >= 1")
        if m.metrics_days < 1 or m.metrics_hours < 1:
            raise ConfigError("maintenance.metrics_days and metrics_hours must be >= 1")
        _check_half_hedge(self.half_hedge)
        _check_trading(self.trading)
        return self


def _check_half_hedge(h: HalfHedgeSettings) -> None:
    if not 0 <= h.quantity_tolerance < 1:
        raise ConfigError("half_hedge.quantity_tolerance must be >= 0 and < 1 (0.001 is 0.1 %)")
    venues = [v.strip() for v in h.venues.split(",")]
    if len(venues) != 2 or not all(venues) or venues[0] == venues[1]:
        raise ConfigError("half_hedge.venues must name two different venues, e.g. upbit,binance")


def _check_trading(t: TradingSettings) -> None:
    # The writer renews its lease and the key every interval: both must outlive one interval,
    # and the lease must end before the key does, so that a successor writes before it expires.
    if not t.interval_s < t.lease_s < t.state_ttl_s:
        raise ConfigError(
            "trading.interval_s < trading.lease_s < trading.state_ttl_s must hold "
            f"(got {t.interval_s:g}, {t.lease_s:g}, {t.state_ttl_s:g})"
        )
    if len(t.collector_component) > 50 or any(c in t.collector_component for c in " *?[]"):
        raise ConfigError(
            "trading.collector_component must be a component name (at most 50 characters, "
            "no spaces or wildcards), or empty to ignore the collector"
        )
    if len(t.fx_pair) > 20 or not (t.fx_pair.isalnum() or t.fx_pair == ""):
        raise ConfigError(
            "trading.fx_pair must be a currency pair such as USDKRW (letters and digits, at "
            "most 20), or empty to ignore FX freshness"
        )


# Durations (names ending in _s or _ms) and TTLs must be > 0, except these, where 0 means "off"
# or "every time" (and any a later field declares by defaulting to 0).
ZERO_ALLOWED_DURATIONS = frozenset(
    {"storage.csv.fsync_interval_s", "storage.outbox.fsync_interval_s", "stream.trim_interval_s"}
)
MIN_TTL_S = 0.001
MAX_DURATION_S = 366 * 86_400.0  # a year: longer is a typo, and overflows some timers
MAX_INT = 2**53  # beyond any sensible count or size, still exact as a float
MAX_SQL_INT = 2**31 - 1  # what reaches PostgreSQL as an INTEGER
MAX_RETENTION_DAYS = 36_500  # a century; 0 keeps rows forever
RETENTION_DAY_FIELDS = (
    "spreads_days",
    "fx_rates_days",
    "orders_days",
    "alerts_days",
    "producer_gaps_days",
    "producer_seq_ranges_days",
    "heartbeat_history_days",
)


_PG_SCHEMES = frozenset({"postgres", "postgresql"})
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def _check_url(what: str, url: str, schemes: frozenset[str]) -> None:
    """A URL the drivers can parse; the message never repeats it (it may hold a password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        # The drivers' own parse errors quote the URL's parts, the password among them.
        reason = "its port is not a number" if "port" in str(exc).lower() else "it cannot be parsed"
        raise ConfigError(
            f"{what} is not a valid URL: {reason} (percent-encode '@', '#', '/', '?' and ':' "
            "in a password: %40 %23 %2F %3F %3A)"
        ) from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{what} must start with one of {', '.join(sorted(schemes))}://")
    if parts.fragment or "#" in url:
        raise ConfigError(
            f"{what} holds a '#', which ends a URL: percent-encode it (%23) in a password"
        )


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Counts with a natural range (the generic rule only keeps integers >= 0 and below MAX_INT).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "storage.postgres.pool_min_size": (0, 1000),
    "storage.postgres.pool_max_size": (1, 1000),
    "storage.buffer_max_events": (1, 100_000_000),
    "stream.read_count": (1, 100_000),
    "pipeline.writers": (1, 64),
    "pipeline.batch_max_rows": (1, 1_000_000),
    "pipeline.max_event_bytes": (1, 512 * 1024 * 1024),  # Redis's own limit on a value
    "maintenance.metrics_days": (1, 366),
    "maintenance.metrics_hours": (1, 24 * 366),
}


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _is_duration(name: str) -> bool:
    return name.endswith(("_s", "_ms")) or "ttl" in name


def _check_numbers(obj: Any, path: str) -> None:
    """Every number finite and in bounds; every duration and TTL positive (see above)."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        where = f"{path}.{field.name}" if path else field.name
        if dataclasses.is_dataclass(value):
            _check_numbers(value, where)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
        if value < 0:
            raise ConfigError(f"{where} must not be negative, got {value}")
        if isinstance(value, int) and value > MAX_INT:
            raise ConfigError(f"{where} must be at most {MAX_INT}, got {value}")
        if _is_duration(field.name):
            seconds = value / 1000 if field.name.endswith("_ms") else value
            zero_allowed = where in ZERO_ALLOWED_DURATIONS or field.default == 0
            if value == 0 and not zero_allowed:
                raise ConfigError(f"{where} must be > 0, got {value}")
            if "ttl" in field.name and 0 < seconds < MIN_TTL_S:
                # Redis expiries are whole milliseconds: a shorter TTL is 0, which SET refuses.
                raise ConfigError(f"{where} must be at least {MIN_TTL_S} s, got {value}")
            if seconds > MAX_DURATION_S:
                raise ConfigError(f"{where} must be at most a year, got {value}")


T = TypeVar("T")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        # As in the shell and docker compose, ``:-`` also applies when the variable is empty.
        if default is not None and not value:
            return default
        if value is not None:
            return value
        raise ConfigError(f"config refers to ${{{name}}} but it is not set in the environment")

    return _VAR.sub(sub, text)


def _parse_yaml(text: str, path: str | os.PathLike[str]) -> Any:
    """The parsed file; a syntax error names the place, never quotes the text (secrets)."""
    # Imported here: only a config file needs it, and the producer library and the daemon's
    # start-up import this module without one.
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({type(exc).__name__})") from None


def expand_values(data: Any, environ: Mapping[str, str]) -> Any:
    """``expand_env`` applied to every string value of parsed YAML (keys are left as written)."""
    if isinstance(data, str):
        return expand_env(data, environ)
    if isinstance(data, Mapping):
        return {key: expand_values(value, environ) for key, value in data.items()}
    if isinstance(data, list):
        return [expand_values(value, environ) for value in data]
    return data


def _build(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r} (known: {', '.join(sorted(fields))})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, where)
        else:
            kwargs[key] = _coerce(value, type(default), where)
    return cls(**kwargs)


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
    elif kind is int and not isinstance(value, bool):
        # Never truncate: ``writers: 2.5`` is a mistake to report, not 2.
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
        else:
            # NaN compares false with every bound, so a NaN deadline would never expire.
            if math.isfinite(number):
                return number
            raise ConfigError(f"config key {where!r} must be a finite number, got {value!r}")
    elif kind is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float):
            return str(value)
    raise ConfigError(f"config key {where!r} must be a {kind.__name__}, got {value!r}")


def _replace_dotted(obj: Any, changes: Mapping[str, Any]) -> Any:
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = _replace_dotted(getattr(obj, head), sub)
    return dataclasses.replace(obj, **direct)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults, then YAML (``--config``/``INGESTD_CONFIG``), env, overrides."""
    env = os.environ if environ is None else environ
    path = config_path or env.get("INGESTD_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        loaded = _parse_yaml(text, path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        # Expanded after parsing, in string values only: a value may hold '#', quotes or ': ',
        # and a ${VAR} in a comment is never looked at.
        data = expand_values(loaded or {}, env)
    settings = _build(Settings, data, "")
    from_env: dict[str, Any] = {}
    if env.get("DATABASE_URL"):
        from_env["storage.postgres.dsn"] = env["DATABASE_URL"]
    if env.get("REDIS_URL"):
        from_env["storage.redis.url"] = env["REDIS_URL"]
    if env.get("INGESTD_CONSUMER"):
        from_env["stream.consumer"] = env["INGESTD_CONSUMER"]
    if env.get("INGESTD_METRICS_PORT"):
        from_env["metrics_port"] = _coerce(env["INGESTD_METRICS_PORT"], int, "INGESTD_METRICS_PORT")
    if env.get("INGESTD_METRICS_HOST"):
        from_env["metrics_host"] = env["INGESTD_METRICS_HOST"]
    settings = settings.replace(**from_env)
    if overrides:
        settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    return settings.check()


def build_section(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    """One section from a mapping (the config's ``storage.redis``); a misspelt key is an error."""
    return _build(cls, data, path)


def settings_from_mapping(data: Mapping[str, Any]) -> Settings:
    """Settings from an already loaded config mapping (no environment, no file), checked."""
    return _build(Settings, data, "").check()


def read_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from the environment, kept out of Settings so that it is never logged with it."""
    value = (os.environ if environ is None else environ).get(name)
    return value or None


_PASSWORD_IN_URL = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<at>@)", re.I
)
# libpq key=value form (``password = 'my secret'``, quotes and spaces allowed) and URL query
# parameters (``?password=secret&...``).
_PASSWORD_PARAM = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'?|[^&\s']+)", re.I
)


def redact(text: str) -> str:
    """Hide passwords in DSNs and URLs (``scheme://user:***@host``, ``password=***``)."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m.group('head')}***{m.group('at')}", text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m.group('head')}***", text)
