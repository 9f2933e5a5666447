"""The ingestd console script: a thin layer over the library."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import itertools
import logging
import sys
import time
import traceback
import urllib.parse
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import redis.exceptions

from ingestd import errors, logs
from ingestd.commands.common import describe, secret_free
from ingestd.daemon import db, migrations
from ingestd.settings import Settings, load_settings, redact

log = logging.getLogger("ingestd.cli")


def _version() -> str:
    try:
        return importlib.metadata.version("ingestd")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _command(
    sub: Any,
    name: str,
    summary: str,
    description: str,
    *,
    database: bool = False,
    redis_url: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary (in ``ingestd --help``), its description (in its
    own --help), and only the connection options it uses."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description,
    )
    p.add_argument("--config", help="YAML configuration file (default: $INGESTD_CONFIG, else none)")
    if database:
        p.add_argument("--database-url", help="PostgreSQL DSN (default: $DATABASE_URL)")
    if redis_url:
        p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    p.add_argument(
        "--log-format", choices=["plain", "json"], help="log line format (default: plain)"
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    return p


_DESCRIPTION = """\
ingestd: events from a Redis Stream (or submitted in-process) written in batches to
PostgreSQL/TimescaleDB, with the latest values mirrored into Redis.

Connections come from --database-url / --redis-url (on the commands that use them), else
$DATABASE_URL / $REDIS_URL, else the YAML file of --config or $INGESTD_CONFIG.
Connection and configuration errors are one line on stderr and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="ingestd",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ingestd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "run",
        "the daemon: stream intake -> database + Redis mirror",
        "Run the daemon: read events from the Redis Stream, write them in batches to the\n"
        "database, mirror the latest values into Redis. SIGTERM or SIGINT drains and stops;\n"
        "a second signal exits at once.",
        database=True,
        redis_url=True,
    )
    p.add_argument("--consumer", help="stable consumer name (default: $INGESTD_CONSUMER or host)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464; 0 disables)")
    p.add_argument("--metrics-host", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--stream", help="stream key (default ingestd:events)")

    p = _command(
        sub,
        "migrate",
        "apply pending schema migrations",
        "Apply the schema migrations the database has not had yet (each once, checksummed),\n"
        "and, as the owner on TimescaleDB, set the retention policies.",
        database=True,
    )
    p.add_argument(
        "--create-database",
        action="store_true",
        help="create the database named in the DSN if it does not exist",
    )

    p = _command(
        sub,
        "roles",
        "create the writer/reader roles and apply their grants",
        "Create the writer and reader group roles, apply their grants, and create or update\n"
        "the login roles named below (passwords from the environment, never the command line).",
        database=True,
    )
    p.add_argument(
        "--writer-login",
        help="login role for 'ingestd run', password from $INGESTD_WRITER_PASSWORD",
    )
    p.add_argument(
        "--reader-login",
        help="login role for dashboards, password from $INGESTD_READER_PASSWORD",
    )

    _command(
        sub,
        "retention",
        "as the owner: apply the retention settings now",
        "As the owner of the tables: set the retention policies from the retention: settings\n"
        "(TimescaleDB), or delete the expired rows (plain PostgreSQL); on both, trim the\n"
        "trading-safety history (cleared alerts, closed gaps, quiet sessions' seq ranges,\n"
        "heartbeat intervals; never an open alert or gap). Now rather than at the next\n"
        "maintenance round of 'ingestd run'.",
        database=True,
    )

    p = _command(
        sub,
        "health",
        "exit 0 if heartbeats are fresh (container HEALTHCHECK)",
        "Check the heartbeats in Redis: exit 0 when this replica's (and each --component's)\n"
        "is fresh, 1 when one is stale or missing, 2 when Redis cannot be read.",
        redis_url=True,
    )
    p.add_argument(
        "--component",
        action="append",
        default=[],
        help="also require this component's heartbeat (collector, paper, live)",
    )
    p.add_argument("--max-age", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument(
        "--consumer",
        help="the replica whose heartbeat to check (default: $INGESTD_CONSUMER or the host name)",
    )
    p.add_argument(
        "--any-replica",
        action="store_true",
        help="accept the heartbeat of any replica (health:ingestd) instead of this one's",
    )

    p = _command(
        sub,
        "halt",
        "halt trading until 'ingestd resume'",
        "Halt trading: trading:state becomes HALTED within one trading interval and stays so\n"
        "until 'ingestd resume', whatever else the state says.",
        redis_url=True,
    )
    p.add_argument("--reason", required=True, help="why (shown in trading:state's reasons)")

    _command(
        sub,
        "resume",
        "lift the operator's halt set by 'ingestd halt'",
        "Lift the operator's halt set by 'ingestd halt'; trading:state leaves HALTED once no\n"
        "other reason holds it.",
        redis_url=True,
    )

    _command(
        sub,
        "trading-state",
        "print trading:state; exit 0 ACTIVE, 1 REDUCING, 3 HALTED",
        "Print trading:state and its reasons. Exit status: 0 ACTIVE, 1 REDUCING, 3 HALTED;\n"
        "3 also when Redis cannot be read (a state nobody can read is a halt).",
        redis_url=True,
    )

    p = _command(
        sub,
        "simulate",
        "publish a realistic collector/paper feed to the stream",
        "Publish a simulated collector and paper-trader feed (FX rates, spreads, orders,\n"
        "positions) to the Redis Stream, or print it as JSON lines with --stdout. Redis must\n"
        "answer at the start; a Redis restart later is ridden through.",
        redis_url=True,
    )
    p.add_argument("--rate", type=float, default=200.0, help="events per second (0: unpaced)")
    p.add_argument("--duration", type=float, help="seconds to run (default: until interrupted)")
    p.add_argument("--count", type=int, help="number of events to publish (default: no limit)")
    p.add_argument("--seed", type=int, default=1, help="random seed: same seed, same feed")
    p.add_argument(
        "--symbols", default="BTC,ETH,XRP", help="comma-separated symbols (default BTC,ETH,XRP)"
    )
    p.add_argument(
        "--tick",
        type=float,
        help="simulated seconds per market tick (default: paced to the wall clock at --rate, "
        "else 0.1)",
    )
    p.add_argument("--start", help="event time of the first tick (RFC 3339; default now)")
    p.add_argument("--stream", help="stream key (default ingestd:events)")
    p.add_argument("--stdout", action="store_true", help="print JSON lines instead of publishing")
    p.add_argument(
        "--ignore-trading-state",
        action="store_true",
        help="the paper trader opens positions whatever trading:state says (a fixed feed to "
        "replay, as the tests do; by default it opens only while ACTIVE)",
    )
    p.add_argument(
        "--scenario",
        choices=["collector-pause", "fx-stale", "drop-hedge-leg"],
        help="a fault for a trader to react to (see docs/for-traders.md)",
    )
    p.add_argument(
        "--scenario-after", type=float, default=30.0, help="seconds of event time before the fault"
    )
    p.add_argument(
        "--scenario-duration", type=float, default=60.0, help="seconds of event time it lasts"
    )

    p = _command(
        sub,
        "stats",
        "table sizes, chunks, compression, jobs, Redis",
        "Report what the database and Redis hold: table sizes and row counts, chunks and\n"
        "compression, background jobs, the slowest statements, and Redis memory, clients,\n"
        "throughput and keys. Exit 2 when a part could not be read (the rest is printed).",
        database=True,
        redis_url=True,
    )
    p.add_argument("--json", dest="as_json", action="store_true", help="JSON for machines")
    p.add_argument("--exact", action="store_true", help="exact row counts (count(*); slow)")
    p.add_argument("--top", type=int, default=10, help="slowest statements to show (default 10)")

    p = _command(
        sub,
        "import-csv",
        "load the producers' CSV files into the database",
        "Load the producers' CSV files (positions.csv, orders.csv, trades.csv, spreads.csv,\n"
        "fx_rates.csv) from a directory into the database, resuming where an earlier run\n"
        "stopped. Exit 0 when every row landed, 1 when rows or files were rejected, 2 when the\n"
        "import is not complete.",
        database=True,
    )
    p.add_argument("dir", help="directory with the CSV files (names as above)")
    p.add_argument("--batch-rows", type=int, default=5000, help="rows per COPY batch")
    p.add_argument(
        "--id-prefix",
        default="",
        help="name the files <prefix>/<file> in derived ids and dead-letter keys (one per host)",
    )
    p.add_argument("--producer", help="producer of rows whose file has no producer column")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints; read every row")
    p.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "off"],
        default="auto",
        help="progress on stderr: a bar on a terminal, lines every 5 s otherwise (default auto)",
    )

    p = _command(
        sub,
        "verify-csv",
        "compare the CSV files with the database, table by table",
        "Compare the CSV files of a directory (the names import-csv reads) with the database,\n"
        "table by table: rows missing on either side and rows that differ. Exit 0 when they\n"
        "agree.",
        database=True,
    )
    p.add_argument("dir", help="directory with the CSV files import-csv read")
    p.add_argument("--id-prefix", default="", help="as given to import-csv")
    p.add_argument("--producer", help="as given to import-csv (rows without a producer column)")
    p.add_argument("--show", type=int, default=5, help="how many differing keys to list")

    p = _command(
        sub,
        "bench",
        "throughput, latency, scaling, memory vs raw COPY",
        "Measure throughput, latency, scaling and memory against a raw binary COPY measured\n"
        "in the same run, in a scratch database. --soak and --fuzz run a soak with faults or a\n"
        "fuzz campaign instead. --quick sizes are a smoke check, too small for the targets.",
        database=True,
        redis_url=True,
    )
    p.add_argument("--events", type=int, help="events per throughput phase (default 100000)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    p.add_argument("--plots", dest="plots_dir", help="write PNG plots here (needs matplotlib)")
    p.add_argument(
        "--only", action="append", default=[], help="phases or groups to run (comma-separated)"
    )
    p.add_argument("--skip", action="append", default=[], help="phases or groups to leave out")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: a CI-sized smoke check, not judged against the targets",
    )
    p.add_argument(
        "--repeat", type=int, help="rounds of the throughput phases; medians shown (default 1)"
    )
    p.add_argument("--scaling-events", type=int, help="events per sweep run (default 100000)")
    p.add_argument("--replica-events", type=int, help="events per replica run (default 100000)")
    p.add_argument("--memory-events", type=int, help="events of the memory run (default 1000000)")
    p.add_argument("--latency-seconds", type=float, help="seconds per paced run (default 3)")
    p.add_argument("--latency-loads", help="paced loads, events/s (default 1000,5000,20000)")
    p.add_argument(
        "--latency-grid", help="batch_max_rows x batch_max_age_ms (default 1000x25,...,5000x200)"
    )
    p.add_argument("--stream-latency-loads", help="paced stream loads (default 1000,5000)")
    p.add_argument("--batch-sizes", help="batch_max_rows sweep (default 500,...,10000)")
    p.add_argument("--writer-counts", help="writers sweep (default 1,2,3)")
    p.add_argument("--replica-counts", help="ingestd run replicas (default 1,2,3)")
    p.add_argument(
        "--scratch-database",
        default="ingestd_bench",
        help="database created (and dropped) for the run",
    )
    p.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="instead: a soak of this many seconds with faults, on throwaway servers",
    )
    p.add_argument(
        "--spool",
        action="store_true",
        help="instead: the spill path's spool (SQLite in WAL mode) against the segment files "
        "it replaced (--events records, default 200000; --repeat rounds, default 3; "
        "docs/spool.md)",
    )
    p.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="spool bench: where its scratch directory goes (default: the current directory; "
        "the disk measured is this one)",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="soak: events per second")
    p.add_argument("--fault-every", type=float, default=15.0, help="soak: seconds between faults")
    p.add_argument("--replicas", type=int, default=2, help="soak: ingestd replicas (1-3)")
    p.add_argument(
        "--fuzz",
        type=float,
        metavar="SECONDS",
        help="instead: a fuzz campaign of this many seconds through a real ingestd run "
        "(--events caps the cases; --seed replays one)",
    )
    p.add_argument(
        "--seed", type=int, help="soak: simulator seed (default 1); fuzz: seed (default random)"
    )
    p.add_argument(
        "--keep", action="store_true", help="soak/fuzz: keep its servers' directory / database"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "storage.postgres.dsn": getattr(args, "database_url", None),
        "storage.redis.url": getattr(args, "redis_url", None),
        "log_format": getattr(args, "log_format", None),
        "log_level": getattr(args, "log_level", None),
        "stream.consumer": getattr(args, "consumer", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "metrics_host": getattr(args, "metrics_host", None),
        "stream.key": getattr(args, "stream", None),
    }
    return load_settings(args.config, overrides=overrides)


# What a command meets when the configuration points at something unreachable or unusable: one
# line and exit 2, whichever command it is. Anything else is a bug and keeps its traceback
# (redacted too).
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    ValueError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    redis.exceptions.RedisError,
    errors.IngestdError,
)


def _secret_free(text: str, settings: Settings | None) -> str:
    if settings is None:
        return redact(text)
    text = secret_free(text, settings.storage.postgres.dsn)
    return secret_free(text, settings.storage.redis.url)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except errors.ConfigError as exc:
        print(redact(f"ingestd: configuration error: {exc}"), file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    handler = _COMMANDS[args.command]
    try:
        return _run_async(handler(settings, args))
    except KeyboardInterrupt:
        return 130
    except _CONNECTION_ERRORS as exc:
        print(_secret_free(f"ingestd {args.command}: {describe(exc)}", settings), file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: its traceback is printed, redacted
        text = "".join(traceback.format_exc())
        print(_secret_free(text, settings), file=sys.stderr, end="")
        return 1


def _run_async(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        result: int = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    return result


async def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.daemon.app import run_daemon

    return await run_daemon(settings)


async def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    dsn = settings.storage.postgres.dsn

    def fail(text: str) -> int:
        print(secret_free(f"ingestd migrate: {text}", dsn), file=sys.stderr)
        return 2

    try:
        conn = await _connect(dsn, create=args.create_database)
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        return fail(f"cannot connect to {dsn}: {describe(exc)}")
    except errors.ConfigError as exc:
        return fail(str(exc))
    try:
        applied = await migrations.migrate(conn)
        timescale = await migrations.timescaledb_enabled(conn)
        policies = await _retention_policies_as_owner(settings, conn)
    except errors.IngestdError as exc:
        return fail(str(exc))
    except asyncpg.ReadOnlySQLTransactionError as exc:
        return fail(f"the database is read-only (a standby, or read-only sessions): {exc}")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return fail(f"stopped: {describe(exc)}")
    finally:
        await conn.close()
    flavour = "TimescaleDB" if timescale else "plain PostgreSQL (timescaledb not available)"
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)} [{flavour}]")
    else:
        print(f"schema is current [{flavour}]")
    if policies:
        print(f"retention policies: {policies}")
    return 0


async def _retention_policies_as_owner(settings: Settings, conn: asyncpg.Connection) -> str:
    """TimescaleDB: the retention policies set to the ``retention:`` settings, if the owner."""
    from ingestd.daemon.maintenance import may_run_retention, reconcile_retention_policies

    if not await migrations.timescaledb_enabled(conn) or not await may_run_retention(conn):
        return ""
    async with conn.transaction():
        # Replicas migrate at once: one at a time, so the second finds the policies unchanged.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", migrations.MIGRATION_LOCK_ID)
        return await reconcile_retention_policies(
            conn, settings.retention, statement_timeout_s=settings.maintenance.statement_timeout_s
        )


async def _cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.commands.common import run_with_database
    from ingestd.daemon.maintenance import Maintenance, may_run_retention

    async def body(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn:
            if not await may_run_retention(conn):
                raise errors.ConfigError(
                    "retention runs as the owner of the tables (the role that ran "
                    "`ingestd migrate`); this role is not it"
                )
        maintenance = Maintenance(
            pool, None, settings=settings.maintenance, retention=settings.retention
        )
        # Called directly, not through run_task: a failure is this command's one error line.
        for result in (
            await maintenance.reconcile_policies(force=True),
            await maintenance.delete_expired(force=True),
        ):
            if result.ran:
                print(f"{result.task}: {result.detail}")
            else:
                print(f"{result.task}: skipped, another replica is doing this round")
        return 0

    return await run_with_database("retention", settings, body, err=sys.stderr)


async def _connect(dsn: str, *, create: bool, deadline_s: float = 30.0) -> asyncpg.Connection:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await db.connect(dsn, timeout_s=5)
        except asyncpg.InvalidCatalogNameError:
            if not create:
                raise
            await _create_database(dsn)
        except OSError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.5)


def _database_name(dsn: str) -> str:
    """The database a DSN names: its path, or a ``dbname``/``database`` query parameter."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qs(parts.query)
    for key in ("dbname", "database"):
        if query.get(key):
            return query[key][-1]
    return urllib.parse.unquote(parts.path.lstrip("/"))


async def _create_database(dsn: str) -> None:
    name = _database_name(dsn)
    if not name or not name.replace("_", "").isalnum():
        raise errors.ConfigError(f"refusing to create database with name {name!r}")
    probe = await db.connect(dsn, database="postgres", timeout_s=5)
    try:
        exists = await probe.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # An identifier cannot be a bind parameter; the name was checked to be [A-Za-z0-9_].
            await probe.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {name}")
    finally:
        await probe.close()


async def _cmd_roles(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.commands.roles import READER_GROUP, WRITER_GROUP, Login, apply_roles
    from ingestd.settings import read_secret

    dsn = settings.storage.postgres.dsn
    try:
        logins = [
            Login(name, group, read_secret(env))
            for name, group, env in (
                (args.writer_login, WRITER_GROUP, "INGESTD_WRITER_PASSWORD"),
                (args.reader_login, READER_GROUP, "INGESTD_READER_PASSWORD"),
            )
            if name
        ]
        conn = await _connect(dsn, create=False)
    except errors.ConfigError as exc:
        print(redact(f"ingestd roles: {exc}"), file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(redact(f"ingestd roles: cannot connect to {dsn}: {exc}"), file=sys.stderr)
        return 2
    try:
        for line in await apply_roles(conn, logins):
            print(line)
    except (errors.IngestdError, asyncpg.PostgresError) as exc:
        print(redact(f"ingestd roles: {exc}"), file=sys.stderr)
        return 2
    finally:
        await conn.close()
    return 0


async def _cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.commands.health import check_health
    from ingestd.wire import keys

    # A container checks its own replica: health:ingestd is refreshed by every replica, so it
    # would stay fresh while this one is stuck.
    own = (
        keys.INGESTD_COMPONENT
        if args.any_replica
        else keys.replica_component(settings.consumer_name)
    )
    ok, message = await check_health(settings, [own, *args.component], args.max_age)
    print(message, file=sys.stdout if ok else sys.stderr)
    if not ok and message.startswith(_HEALTH_UNREACHABLE):
        return 2  # a connection error, as in every command: not a verdict on the heartbeats
    return 0 if ok else 1


_HEALTH_UNREACHABLE = "unhealthy: cannot read Redis"


def _trading_gate(settings: Settings) -> Any:
    """What the simulated paper trader asks before opening: trading:state, read at most every
    half second (a synchronous read with a short timeout; unreachable counts as HALTED)."""
    from ingestd import trading
    from ingestd.clients import redis_sync

    client = redis_sync(settings.storage.redis.url, socket_timeout_s=0.5)
    prefix = settings.storage.redis.key_prefix
    last: list[Any] = [0.0, None]

    def gate() -> trading.TradingState:
        now = time.monotonic()
        if last[1] is None or now - last[0] >= 0.5:
            last[:] = [now, trading.read_trading_state(client, key_prefix=prefix)]
        current: trading.TradingState = last[1]
        return current

    return gate


async def _redis_answers(settings: Settings) -> None:
    """PING Redis once (with the short retries of the commands' client); raises if it cannot."""
    from ingestd.clients import redis_async

    client = redis_async(
        settings.storage.redis.url, socket_timeout_s=settings.storage.redis.socket_timeout_s
    )
    try:
        with errors.redis_edge():
            await client.ping()
    except errors.RedisError as exc:
        url = settings.storage.redis.url
        raise errors.IngestdError(f"cannot reach Redis at {url}: {describe(exc)}") from exc
    finally:
        await client.aclose()


async def _cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.producer.publisher import AsyncPublisher
    from ingestd.tools.simulate import Simulator, WallClockPacer

    start = dt.datetime.fromisoformat(args.start) if args.start else None
    if start is not None and start.tzinfo is None:
        print("ingestd simulate: --start needs an offset", file=sys.stderr)
        return 2
    symbols = tuple(args.symbols.split(","))
    tick_s = args.tick
    if tick_s is None:
        # A tick is one FX event plus one spread per symbol (rarely a few more): at --rate the
        # simulated clock then keeps pace with the wall clock, so heartbeats and TTLs are real.
        tick_s = (1 + len(symbols)) / args.rate if args.rate > 0 else 0.1
    gate = None if args.stdout or args.ignore_trading_state else _trading_gate(settings)
    sim = Simulator(seed=args.seed, symbols=symbols, start=start, tick_s=tick_s, trading_gate=gate)
    stream = sim.events()
    if args.scenario is not None:
        from ingestd.tools import scenarios

        stream = scenarios.apply(
            stream,
            args.scenario,
            after_s=args.scenario_after,
            duration_s=args.scenario_duration,
        )
    if args.count is not None:
        stream = itertools.islice(stream, args.count)
    if args.stdout:
        out = sys.stdout.buffer
        for ev in stream:
            out.write(orjson.dumps(ev) + b"\n")
        return 0
    # The publisher rides through a Redis restart (retries for about half a minute): at the
    # start, an address that does not answer is a mistake to report at once instead.
    await _redis_answers(settings)
    publisher = AsyncPublisher.from_url(settings.storage.redis.url, stream=settings.stream.key)
    # Paced to the wall clock (no --tick): by the simulated clock, so that event times stay real.
    pacer = WallClockPacer(sim, time.monotonic) if args.rate > 0 and args.tick is None else None
    t0 = time.monotonic()
    sent = 0
    chunk = 500 if args.rate <= 0 else max(1, min(500, int(args.rate / 20)))
    try:
        while True:
            if args.duration is not None and time.monotonic() - t0 >= args.duration:
                break
            batch = list(itertools.islice(stream, chunk))
            if not batch:
                break
            sent += await publisher.publish_many(batch)
            if args.rate > 0:
                ahead = (
                    pacer.ahead_s()
                    if pacer is not None
                    else sent / args.rate - (time.monotonic() - t0)
                )
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if sent % 10_000 < chunk:
                log.info(
                    "published %d events (%.0f/s)",
                    sent,
                    sent / (time.monotonic() - t0),
                    extra={"action": "simulate_progress"},
                )
    finally:
        await publisher.aclose()
    log.info(
        "published %d events to %s", sent, settings.stream.key, extra={"action": "simulate_done"}
    )
    return 0


async def _cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd.clients import redis_async
    from ingestd.commands.stats import collect_database, collect_redis, print_report, to_json

    dsn = settings.storage.postgres.dsn
    try:
        conn = await db.connect(dsn, timeout_s=settings.storage.postgres.connect_timeout_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        print(
            secret_free(f"ingestd stats: cannot connect to {dsn}: {describe(exc)}", dsn),
            file=sys.stderr,
        )
        return 2
    try:
        report = await collect_database(
            conn,
            exact=args.exact,
            top=args.top,
            parked_close_max_age_s=settings.pipeline.parked_close_max_age_s,
            liveness_alive_within_s=settings.heartbeat_history.gap_s
            + settings.heartbeat_history.flush_interval_s,
        )
    finally:
        await conn.close()
    client = redis_async(
        settings.storage.redis.url, socket_timeout_s=settings.storage.redis.socket_timeout_s
    )
    try:
        report["redis"] = await collect_redis(client, key_prefix=settings.storage.redis.key_prefix)
    finally:
        await client.aclose()
    if args.as_json:
        sys.stdout.buffer.write(to_json(report) + b"\n")
    else:
        print_report(report, sys.stdout)
    redis_part = report["redis"]
    if isinstance(redis_part, dict) and "error" in redis_part:
        # The database part is still worth printing; the exit code says the report is partial.
        url = settings.storage.redis.url
        print(
            secret_free(f"ingestd stats: cannot read Redis at {url}: {redis_part['error']}", url),
            file=sys.stderr,
        )
        return 2
    return 0


async def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.fuzz is not None:
        from ingestd.tools.fuzz.campaign import DEFAULT_SCRATCH_DATABASE, run_fuzz_command

        scratch = args.scratch_database
        return await run_fuzz_command(
            settings,
            duration_s=args.fuzz,
            seed=args.seed,
            max_events=args.events,
            scratch_database=DEFAULT_SCRATCH_DATABASE if scratch == "ingestd_bench" else scratch,
            json_path=args.json_path,
            keep=args.keep,
        )
    if args.spool:
        from ingestd.tools.bench.spill import SpillOptions, run_spill_command

        sizes = {"records": args.events, "rounds": args.repeat}
        return await run_spill_command(
            SpillOptions(
                **{k: v for k, v in sizes.items() if v is not None},
                directory=args.spool_dir,
                json_path=args.json_path,
            )
        )
    if args.soak is not None:
        from ingestd.tools.soak import run_soak

        return await run_soak(
            duration_s=args.soak,
            rate=args.rate,
            fault_every_s=args.fault_every,
            replicas=args.replicas,
            seed=1 if args.seed is None else args.seed,
            json_path=args.json_path,
            keep=args.keep,
        )
    from ingestd.tools.bench import options, runner

    try:
        chosen = options.options_from_args(args)
    except (errors.ConfigError, ValueError) as exc:
        print(f"ingestd bench: {exc}", file=sys.stderr)
        return 2
    return await runner.run_bench(settings, chosen)


async def _cmd_import_csv(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingestd.commands.csv_import import run_import

    return await run_import(
        settings,
        Path(args.dir),
        batch_rows=args.batch_rows,
        id_prefix=args.id_prefix,
        default_producer=args.producer,
        resume=not args.no_resume,
        progress_mode=args.progress,
    )


async def _cmd_verify_csv(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingestd.commands.csv_verify import run_verify

    return await run_verify(
        settings,
        Path(args.dir),
        id_prefix=args.id_prefix,
        show=args.show,
        default_producer=args.producer,
    )


def _trading_client(settings: Settings) -> Any:
    from ingestd.clients import redis_sync

    return redis_sync(
        settings.storage.redis.url, socket_timeout_s=settings.storage.redis.socket_timeout_s
    )


async def _cmd_halt(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd import trading

    reason = args.reason.strip()
    if not reason or len(reason) > 500:
        print("ingestd halt: --reason must be 1-500 characters", file=sys.stderr)
        return 2
    client = _trading_client(settings)
    try:
        trading.set_halt(client, reason, key_prefix=settings.storage.redis.key_prefix)
    finally:
        client.close()
    print(
        f"halted: {trading.HALT_KEY} set ({reason}); trading:state is HALTED within "
        f"{settings.trading.interval_s:g}s and stays so until `ingestd resume`"
    )
    return 0


async def _cmd_resume(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd import trading

    client = _trading_client(settings)
    try:
        removed = trading.clear_halt(client, key_prefix=settings.storage.redis.key_prefix)
    finally:
        client.close()
    if removed is None:
        print("no operator halt was set; nothing changed")
        return 0
    print(
        f"resumed: removed the halt of {removed.by} ({removed.reason}); trading:state leaves "
        f"HALTED after {settings.trading.recover_after_s:g}s without other reasons"
    )
    return 0


async def _cmd_trading_state(settings: Settings, args: argparse.Namespace) -> int:
    from ingestd import trading

    client = _trading_client(settings)
    try:
        current = trading.read_trading_state(client, key_prefix=settings.storage.redis.key_prefix)
    finally:
        client.close()
    since = "" if current.since is None else f" since {current.since.isoformat()}"
    print(f"{current.state.value}{since}")
    for reason in current.reasons:
        print(f"  {reason}")
    return {trading.State.ACTIVE: 0, trading.State.REDUCING: 1}.get(current.state, 3)


_COMMANDS = {
    "run": _cmd_run,
    "halt": _cmd_halt,
    "resume": _cmd_resume,
    "trading-state": _cmd_trading_state,
    "migrate": _cmd_migrate,
    "health": _cmd_health,
    "roles": _cmd_roles,
    "retention": _cmd_retention,
    "simulate": _cmd_simulate,
    "bench": _cmd_bench,
    "stats": _cmd_stats,
    "import-csv": _cmd_import_csv,
    "verify-csv": _cmd_verify_csv,
}

if __name__ == "__main__":
    sys.exit(main())
