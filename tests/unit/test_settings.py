"""Settings: defaults < YAML (with ${VAR} expansion) < environment < overrides; redaction."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ingestd import settings as s
from ingestd.errors import ConfigError
from ingestd.settings import Settings, expand_env, load_settings, redact


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingestd.yml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    got = load_settings(None, environ={})
    assert got == Settings()
    assert got.storage.postgres.dsn == "postgresql://postgres@127.0.0.1:5432/ingestd"
    assert got.storage.redis.url == "redis://127.0.0.1:6379/0"
    assert got.storage.redis.key_prefix == ""
    assert got.storage.backend == "postgres"
    assert got.stream.key == "ingestd:events"
    assert got.stream.group == "ingestd"
    assert got.stream.enabled is True
    assert got.pipeline.max_event_bytes == 1_048_576
    assert got.pipeline.batch_max_rows == 5_000
    assert got.pipeline.queue_max_events >= got.pipeline.batch_max_rows
    assert got.storage.postgres.pool_max_size > got.pipeline.writers
    assert got.stream.block_ms / 1000 < got.storage.redis.socket_timeout_s
    assert got.fx.ttl_seconds == 3.0
    assert got.mirror.spread_ttl_s == 60.0
    assert got.mirror.health_ttl_s == 10.0
    assert got.metrics_port == 9464
    assert got.log_format == "plain"


def test_defaults_pass_check() -> None:
    assert Settings().check() == Settings()


def test_consumer_name_defaults_to_host_name() -> None:
    assert load_settings(None, environ={}).consumer_name == socket.gethostname()
    env = {"INGESTD_CONSUMER": "replica-2"}
    assert load_settings(None, environ=env).consumer_name == "replica-2"


def test_metrics_port_from_environment() -> None:
    assert load_settings(None, environ={"INGESTD_METRICS_PORT": "0"}).metrics_port == 0
    assert load_settings(None, environ={"INGESTD_METRICS_PORT": "9999"}).metrics_port == 9999
    with pytest.raises(ConfigError, match="INGESTD_METRICS_PORT"):
        load_settings(None, environ={"INGESTD_METRICS_PORT": "lots"})


# --- YAML and ${VAR} expansion ------------------------------------------------------------


def test_yaml_with_env_expansion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
storage:
  postgres:
    dsn: ${PG_DSN}
    pool_max_size: ${POOL:-8}
  redis:
    url: ${CACHE_URL:-redis://cache:6379/1}
    key_prefix: "${PREFIX:-}"
pipeline:
  writers: 3
  batch_max_age_ms: ${AGE_MS:-250}
stream:
  consumer: "${HOST_TAG}-a"
  enabled: ${STREAM_ON:-true}
fx:
  ttl_seconds: 2.5
log_format: json
""",
    )
    env = {"PG_DSN": "postgresql://u:p@db:5432/x", "HOST_TAG": "n1", "AGE_MS": "100"}
    got = load_settings(path, environ=env)
    assert got.storage.postgres.dsn == "postgresql://u:p@db:5432/x"
    assert got.storage.postgres.pool_max_size == 8
    assert got.storage.redis.url == "redis://cache:6379/1"
    assert got.storage.redis.key_prefix == ""
    assert got.pipeline.writers == 3
    assert got.pipeline.batch_max_age_ms == 100
    assert got.stream.consumer == "n1-a"
    assert got.stream.enabled is True
    assert got.fx.ttl_seconds == 2.5
    assert got.log_format == "json"
    # untouched sections keep their defaults
    assert got.mirror == Settings().mirror
    assert got.stream.key == "ingestd:events"


def test_config_path_from_ingestd_config(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics_port: 1234\n")
    assert load_settings(None, environ={"INGESTD_CONFIG": str(path)}).metrics_port == 1234


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), environ={}) == Settings()


def test_empty_section_gives_defaults(tmp_path: Path) -> None:
    got = load_settings(write(tmp_path, "pipeline:\nstream: {}\n"), environ={})
    assert got == Settings()


def test_expand_env_forms() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert expand_env("${A}", env) == "x"
    assert expand_env("${A:-d}", env) == "x"
    assert expand_env("${B:-d}", env) == "d"
    assert expand_env("${B:-}", env) == ""
    assert expand_env("${B:-a b:c}", env) == "a b:c"
    assert expand_env("pre-${A}-${A}-post", env) == "pre-x-x-post"
    assert expand_env("$A and ${ not a var }", env) == "$A and ${ not a var }"
    assert expand_env("${EMPTY}", env) == ""


def test_expand_env_default_applies_to_empty_variable() -> None:
    assert expand_env("${EMPTY:-d}", {"EMPTY": ""}) == "d"


def test_unset_variable_without_default_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  postgres:\n    dsn: ${MISSING_DSN}\n")
    with pytest.raises(ConfigError, match="MISSING_DSN"):
        load_settings(path, environ={})
    with pytest.raises(ConfigError, match="NOPE"):
        expand_env("${NOPE}", {})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yml", environ={})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("pipeline:\n  writer: 3\n", "pipeline.writer"),
        ("metric_port: 1\n", "metric_port"),
        ("storage:\n  postgres:\n    dns: postgresql://h/db\n", "storage.postgres.dns"),
        ("storage:\n  redis:\n    URL: redis://h\n", "storage.redis.URL"),
    ],
)
def test_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert repr(named) in str(info.value)
    assert "unknown config key" in str(info.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("pipeline:\n  writers: two\n", "pipeline.writers"),
        ("pipeline:\n  writers: true\n", "pipeline.writers"),
        ("pipeline:\n  writers: [1]\n", "pipeline.writers"),
        ("stream:\n  enabled: maybe\n", "stream.enabled"),
        ("stream:\n  enabled: 2\n", "stream.enabled"),
        ("fx:\n  ttl_seconds: soon\n", "fx.ttl_seconds"),
        ("fx:\n  ttl_seconds: false\n", "fx.ttl_seconds"),
        ("stream:\n  key: [a, b]\n", "stream.key"),
        ("storage: 5\n", "storage"),
        ("pipeline: [1, 2]\n", "pipeline"),
        ("- 1\n- 2\n", "mapping"),
        ("just a string\n", "mapping"),
    ],
)
def test_wrong_type_is_an_error(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert named in str(info.value)


def test_strings_from_the_environment_are_coerced(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "stream:\n  enabled: '${ON}'\n  block_ms: '${BLOCK}'\nfx:\n  ttl_seconds: '${TTL}'\n",
    )
    got = load_settings(path, environ={"ON": "false", "BLOCK": "500", "TTL": "1.5"})
    assert got.stream.enabled is False
    assert got.stream.block_ms == 500
    assert got.fx.ttl_seconds == 1.5


def test_float_for_an_int_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.writers"):
        load_settings(write(tmp_path, "pipeline:\n  writers: 2.5\n"), environ={})


# --- precedence ---------------------------------------------------------------------------


def test_environment_urls_win_over_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "storage:\n  postgres:\n    dsn: postgresql://yaml/db\n  redis:\n    url: redis://yaml\n",
    )
    assert load_settings(path, environ={}).storage.postgres.dsn == "postgresql://yaml/db"
    env = {"DATABASE_URL": "postgresql://env/db", "REDIS_URL": "rediss://env:6380/2"}
    got = load_settings(path, environ=env)
    assert got.storage.postgres.dsn == "postgresql://env/db"
    assert got.storage.redis.url == "rediss://env:6380/2"
    # an empty variable does not blank the YAML value
    got = load_settings(path, environ={"DATABASE_URL": "", "REDIS_URL": ""})
    assert got.storage.postgres.dsn == "postgresql://yaml/db"
    assert got.storage.redis.url == "redis://yaml"


def test_overrides_win_over_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "stream:\n  consumer: from-yaml\n")
    env = {"DATABASE_URL": "postgresql://env/db", "INGESTD_CONSUMER": "from-env"}
    assert load_settings(path, environ=env).stream.consumer == "from-env"
    got = load_settings(
        path,
        environ=env,
        overrides={
            "storage.postgres.dsn": "postgresql://flag/db",
            "stream.consumer": "from-flag",
            "metrics_port": None,  # a flag not given does not override
            "pipeline.writers": 3,
        },
    )
    assert got.storage.postgres.dsn == "postgresql://flag/db"
    assert got.stream.consumer == "from-flag"
    assert got.metrics_port == 9464
    assert got.pipeline.writers == 3


def test_replace_is_dotted_and_leaves_the_original() -> None:
    base = Settings()
    changed = base.replace(**{"pipeline.writers": 4, "storage.redis.key_prefix": "p:"})
    assert changed.pipeline.writers == 4
    assert changed.storage.redis.key_prefix == "p:"
    assert base.pipeline.writers == 2
    assert base.storage.redis.key_prefix == ""
    assert changed.storage.postgres == base.storage.postgres


# --- check() ------------------------------------------------------------------------------


def test_check_rejects_queue_smaller_than_batch() -> None:
    bad = Settings().replace(**{"pipeline.queue_max_events": 100, "pipeline.batch_max_rows": 200})
    with pytest.raises(ConfigError, match="queue_max_events"):
        bad.check()
    ok = Settings().replace(**{"pipeline.queue_max_events": 200, "pipeline.batch_max_rows": 200})
    assert ok.check() is ok


def test_check_rejects_zero_batch_and_zero_writers() -> None:
    with pytest.raises(ConfigError):
        Settings().replace(**{"pipeline.batch_max_rows": 0}).check()
    with pytest.raises(ConfigError, match="writers"):
        Settings().replace(**{"pipeline.writers": 0}).check()


@pytest.mark.parametrize(("pool", "writers"), [(2, 2), (3, 4), (1, 1)])
def test_check_rejects_pool_not_larger_than_writers(pool: int, writers: int) -> None:
    bad = Settings().replace(
        **{"storage.postgres.pool_max_size": pool, "pipeline.writers": writers}
    )
    with pytest.raises(ConfigError, match="pool_max_size"):
        bad.check()


def test_check_accepts_pool_one_larger_than_writers() -> None:
    ok = Settings().replace(**{"storage.postgres.pool_max_size": 5, "pipeline.writers": 4})
    assert ok.check() is ok


@pytest.mark.parametrize(("block_ms", "timeout_s"), [(5000, 5.0), (6000, 5.0), (1000, 0.5)])
def test_check_rejects_block_not_shorter_than_socket_timeout(
    block_ms: int, timeout_s: float
) -> None:
    bad = Settings().replace(
        **{"stream.block_ms": block_ms, "storage.redis.socket_timeout_s": timeout_s}
    )
    with pytest.raises(ConfigError, match="block_ms"):
        bad.check()
    ok = bad.replace(**{"stream.block_ms": int(timeout_s * 1000) - 1})
    assert ok.check() is ok


def test_check_through_load_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "stream:\n  block_ms: 5000\n")
    with pytest.raises(ConfigError, match="block_ms"):
        load_settings(path, environ={})


@pytest.mark.parametrize(("key", "value"), [("log_format", "xml"), ("storage.backend", "mysql")])
def test_check_rejects_unknown_choices(key: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Settings().replace(**{key: value}).check()


# --- redact -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql://user:secret@host:5432/db?sslmode=require",
            "postgresql://user:***@host:5432/db?sslmode=require",
        ),
        ("postgres://u:s3cr%40t@h/db", "postgres://u:***@h/db"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@h", "rediss://user:***@h"),
        (
            "host=db.example port=5432 password=secret dbname=ingestd",
            "host=db.example port=5432 password=*** dbname=ingestd",
        ),
        ("PASSWORD=secret", "PASSWORD=***"),
        (
            "postgresql://u@h/db?password=secret&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        (
            "connect failed: postgresql://a:one@h1/db, then redis://:two@h2:6379/0 too",
            "connect failed: postgresql://a:***@h1/db, then redis://:***@h2:6379/0 too",
        ),
        # nothing to hide: left intact
        ("postgresql://user@host:5432/db", "postgresql://user@host:5432/db"),
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("plain text with user:pass but no scheme", "plain text with user:pass but no scheme"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_quoted_keyvalue_password() -> None:
    out = redact("host=db password='my secret' user=x")
    assert "secret" not in out
    assert out.startswith("host=db password=")
    assert out.endswith(" user=x")


def test_redact_keyvalue_password_with_spaces_around_equals() -> None:
    out = redact("host=db password = secret user=x")
    assert "secret" not in out


def test_default_urls_are_constants() -> None:
    assert Settings().storage.postgres.dsn == s.DEFAULT_DATABASE_URL
    assert Settings().storage.redis.url == s.DEFAULT_REDIS_URL


@pytest.mark.parametrize(
    ("dsn", "name"),
    [
        ("postgresql://u:p@h:5432/ingestd", "ingestd"),
        ("postgresql://u@h/ingestd?sslmode=require", "ingestd"),
        ("postgresql:///ingestd?host=/var/run/postgresql", "ingestd"),
        ("postgresql://u@h/?dbname=other", "other"),
        ("postgresql://u@h/my%5Fdb", "my_db"),
    ],
)
def test_migrate_finds_the_database_name_in_a_dsn(dsn: str, name: str) -> None:
    from ingestd.cli import _database_name

    assert _database_name(dsn) == name


# --- configuration is input: parse, then expand; every number validated ---------------------


def test_a_variable_in_a_comment_is_never_expanded(tmp_path: Path) -> None:
    path = write(tmp_path, "# dsn: ${NOT_SET_ANYWHERE}\nstream:\n  key: k  # ${ALSO_NOT_SET}\n")
    assert load_settings(path, environ={}).stream.key == "k"


@pytest.mark.parametrize(
    "value",
    [
        "postgresql://u:p #not-a-comment@db/ingestd",
        "it's \"quoted\" and 'single'",
        "a: b, [c] {d} #e",
        "line\\nbreak",
    ],
)
@pytest.mark.parametrize("quoting", ["${V}", '"${V}"', "'${V}'"])
def test_an_expanded_value_is_taken_whole(tmp_path: Path, value: str, quoting: str) -> None:
    path = write(tmp_path, f"storage:\n  redis:\n    key_prefix: {quoting}\n")
    assert load_settings(path, environ={"V": value}).storage.redis.key_prefix == value


def test_an_expanded_dsn_is_not_truncated_at_its_hash(tmp_path: Path) -> None:
    # Expanded into the text, " #ss@db..." became a comment and the DSN silently lost its host.
    # Taken whole, the '#' (which ends a URL) is refused, saying how to write it.
    path = write(tmp_path, "storage:\n  postgres:\n    dsn: ${DSN}\n")
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        load_settings(path, environ={"DSN": "postgresql://u:pa #ss@db:5432/ingestd"})
    assert "pa #ss" not in str(caught.value)
    encoded = "postgresql://u:pa%20%23ss@db:5432/ingestd"
    assert load_settings(path, environ={"DSN": encoded}).storage.postgres.dsn == encoded


def test_an_expanded_number_is_still_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline:\n  flush_timeout_s: ${T}\n")
    assert load_settings(path, environ={"T": "2.5"}).pipeline.flush_timeout_s == 2.5
    with pytest.raises(ConfigError, match=r"pipeline\.flush_timeout_s"):
        load_settings(path, environ={"T": "nan"})


def test_a_yaml_syntax_error_is_a_config_error_that_quotes_nothing(tmp_path: Path) -> None:
    secret = "hunter2-secret"
    path = write(
        tmp_path, f"storage:\n  postgres:\n    dsn: postgresql://u:{secret}@h/db\n  x: [\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert "YAML syntax error at line" in message and str(path) in message
    assert secret not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def _number_fields(obj: object, path: str = "") -> list[tuple[str, object]]:
    import dataclasses

    found: list[tuple[str, object]] = []
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        where = f"{path}.{field.name}" if path else field.name
        if dataclasses.is_dataclass(value):
            found += _number_fields(value, where)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append((where, value))
    return found


NUMBER_FIELDS = _number_fields(Settings())
DURATIONS = [name for name, _ in NUMBER_FIELDS if s._is_duration(name.rsplit(".", 1)[-1])]


def test_the_durations_are_recognised() -> None:
    assert "pipeline.flush_timeout_s" in DURATIONS and "fx.ttl_seconds" in DURATIONS
    assert "stream.block_ms" in DURATIONS and "mirror.health_ttl_s" in DURATIONS
    assert len(DURATIONS) >= 20


@pytest.mark.parametrize(
    "name", [name for name, value in NUMBER_FIELDS if isinstance(value, float)]
)
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_no_float_may_be_nan_or_infinite(tmp_path: Path, name: str, bad: str) -> None:
    section, _, key = name.rpartition(".")
    text = (
        "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split(".")))
        if section
        else ""
    )
    indent = "  " * (section.count(".") + 1) if section else ""
    path = write(tmp_path, f"{text}{indent}{key}: {bad}\n")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_settings(path, environ={})


@pytest.mark.parametrize("name", DURATIONS)
def test_no_duration_or_ttl_may_be_negative(name: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        Settings().replace(**{name: -1}).check()


@pytest.mark.parametrize("name", [n for n in DURATIONS if n not in s.ZERO_ALLOWED_DURATIONS])
def test_no_duration_or_ttl_may_be_zero(name: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        Settings().replace(**{name: 0}).check()


def test_zero_keeps_its_meaning_where_it_means_off() -> None:
    for name in s.ZERO_ALLOWED_DURATIONS:
        Settings().replace(**{name: 0}).check()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pipeline.flush_timeout_s", 10**9),
        ("pipeline.writers", 2**60),
        ("retention.spreads_days", 10**6),
        ("retention.delete_batch_rows", 2**31),
        ("stream.read_count", -5),
        ("storage.postgres.pool_min_size", 7),
        ("mirror.heartbeat_interval_s", 10.0),
        ("pipeline.backoff_base_s", 20.0),
    ],
)
def test_numbers_out_of_bounds_are_refused(name: str, value: int | float) -> None:
    with pytest.raises(ConfigError, match=name.rsplit(".", 1)[-1]):
        Settings().replace(**{name: value}).check()


@pytest.mark.parametrize(("name", "bounds"), list(s.INT_BOUNDS.items()))
def test_counts_stay_in_their_range(name: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    for bad in (low - 1, high + 1):
        if bad < 0:
            continue
        with pytest.raises(ConfigError, match=name.rsplit(".", 1)[-1]):
            Settings().replace(**{name: bad}).check()


def test_an_unknown_log_level_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(write(tmp_path, "log_level: LOUD\n"), environ={})
    assert load_settings(write(tmp_path, "log_level: debug\n"), environ={}).log_level == "debug"
