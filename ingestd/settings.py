"""The frozen settings object: built once from YAML, the environment and CLI flags.

Nothing else in ingestd reads the environment. Precedence: defaults < YAML file < environment
(``DATABASE_URL``, ``REDIS_URL``, ``INGESTD_CONSUMER``, ``INGESTD_METRICS_PORT``,
``INGESTD_METRICS_HOST``) < CLI flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ingestd import failpoints
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
class StorageSettings:
    """Seed §6.2 ``storage`` section."""

    backend: str = "postgres"
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    csv: CsvSettings = CsvSettings()
    # Producer side (ingestd.storage): events held in memory while the stream is unreachable.
    buffer_max_events: int = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class FxSettings:
    """Seed ``fx`` section: the TTL of ``fx:{pair}`` keys."""

    ttl_seconds: float = 3.0


@dataclasses.dataclass(frozen=True, slots=True)
class StreamSettings:
    """The Redis Stream intake (DESIGN §4)."""

    enabled: bool = True
    key: str = "ingestd:events"
    group: str = "ingestd"
    consumer: str = ""
    read_count: int = 2000
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
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 15.0
    # An entry the database refuses alone this many times (while it takes other writes)
    # becomes a dead letter; one whose dead letter is refused too goes to the quarantine file.
    max_entry_attempts: int = 3
    quarantine_path: str = "data/ingestd-quarantine.jsonl"
    # /healthz, /readyz and the heartbeat fail while an entry waits uncommitted this long.
    max_pending_age_s: float = 120.0


@dataclasses.dataclass(frozen=True, slots=True)
class MirrorSettings:
    """Redis mirror TTLs and ingestd's own heartbeat (DESIGN §5)."""

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
    """Seed §2.2 retention in days (0 keeps rows forever); see ingestd/maintenance.py."""

    spreads_days: int = 90
    fx_rates_days: int = 180
    orders_days: int = 365
    delete_batch_rows: int = 10_000  # plain PostgreSQL: rows per DELETE statement


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
class Settings:
    """Everything ingestd needs, frozen."""

    storage: StorageSettings = StorageSettings()
    fx: FxSettings = FxSettings()
    stream: StreamSettings = StreamSettings()
    pipeline: PipelineSettings = PipelineSettings()
    mirror: MirrorSettings = MirrorSettings()
    spool: SpoolSettings = SpoolSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    retention: RetentionSettings = RetentionSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"  # the container image sets 0.0.0.0
    log_format: str = "plain"
    log_level: str = "INFO"
    # Crash points for the fault suite and the soak (ingestd.failpoints); empty in production.
    failpoints: str = ""

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
        if self.storage.backend not in {"postgres", "csv", "dual"}:
            raise ConfigError("storage.backend must be one of csv, postgres, dual")
        failpoints.parse(self.failpoints)
        if self.spool.segment_bytes < 1024 or self.spool.max_bytes < self.spool.segment_bytes:
            raise ConfigError("spool.segment_bytes must be >= 1024 and <= spool.max_bytes")
        r, m = self.retention, self.maintenance
        for name in ("spreads_days", "fx_rates_days", "orders_days"):
            if getattr(r, name) < 0:
                raise ConfigError(f"retention.{name} must be >= 0 (0 keeps rows forever)")
        if r.delete_batch_rows < 1:
            raise ConfigError("retention.delete_batch_rows must be >= 1")
        for name in (
            "refresh_interval_s",
            "metrics_interval_s",
            "retention_interval_s",
            "policy_interval_s",
            "statement_timeout_s",
        ):
            if getattr(m, name) <= 0:
                raise ConfigError(f"maintenance.{name} must be > 0")
        if m.metrics_days < 1 or m.metrics_hours < 1:
            raise ConfigError("maintenance.metrics_days and metrics_hours must be >= 1")
        return self


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
            return float(value)
        except (TypeError, ValueError):
            pass
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
        loaded = yaml.safe_load(expand_env(text, env))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    settings = _build(Settings, data, "")
    from_env: dict[str, Any] = {}
    if env.get("DATABASE_URL"):
        from_env["storage.postgres.dsn"] = env["DATABASE_URL"]
    if env.get("REDIS_URL"):
        from_env["storage.redis.url"] = env["REDIS_URL"]
    if env.get("INGESTD_CONSUMER"):
        from_env["stream.consumer"] = env["INGESTD_CONSUMER"]
    if env.get("INGESTD_FAILPOINTS"):
        from_env["failpoints"] = env["INGESTD_FAILPOINTS"]
    if env.get("INGESTD_METRICS_PORT"):
        from_env["metrics_port"] = _coerce(env["INGESTD_METRICS_PORT"], int, "INGESTD_METRICS_PORT")
    if env.get("INGESTD_METRICS_HOST"):
        from_env["metrics_host"] = env["INGESTD_METRICS_HOST"]
    settings = settings.replace(**from_env)
    if overrides:
        settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    return settings.check()


def build_section(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    """One section from a mapping (the seed's ``storage.redis``); a misspelt key is an error."""
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
