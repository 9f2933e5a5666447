"""Throwaway servers for tests that need what the shared servers must never be changed for.

Password (SCRAM) authentication, TLS with a private CA, cluster-wide roles and Redis ACL users
are tried on a PostgreSQL cluster and a Redis of our own: started once per test session in a
temporary directory, on free loopback ports, and removed at the end. Each fixture skips, saying
why, where a program it needs (``initdb``, ``openssl``, a TLS-enabled ``redis-server``) is absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
import redis

from ingestd.daemon import migrations
from tests.deploy_files import compose_variables, redis_acl_users
from tests.scheduler import stop_own_scheduler


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(process: subprocess.Popen[Any], timeout: float) -> None:
    """Stop ``process`` with SIGTERM, killing it if it is not gone within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _run(cmd: list[str], **kwargs: object) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")


@dataclasses.dataclass(frozen=True)
class Certs:
    """A private CA, a server certificate for localhost/127.0.0.1 it signed, and another CA."""

    directory: Path
    ca: Path
    server_crt: Path
    server_key: Path
    other_ca: Path


def make_certs(directory: Path) -> Certs:
    """Generate the certificates with ``openssl`` (EC P-256: quick to make)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = directory
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _run(
            [
                "openssl", "req", "-x509", *ec, "-keyout", str(d / f"{name}.key"),
                "-out", str(d / f"{name}.crt"), "-days", "2", "-subj", f"/CN=ingestd test {name}",
            ]
        )  # fmt: skip
    _run(
        [
            "openssl", "req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=localhost",
        ]
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n", encoding="utf-8")
    _run(
        [
            "openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
            "-days", "2", "-extfile", str(d / "san.ext"),
        ]
    )  # fmt: skip
    return Certs(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "other-ca.crt")


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclasses.dataclass
class PrivatePostgres:
    """A cluster of our own: the superuser over a Unix socket, everyone else only over TLS."""

    data: Path
    socket_dir: Path
    port: int
    certs: Certs
    timescale: bool
    _stop: Callable[[], None]

    def admin_dsn(self, database: str = "postgres") -> str:
        """The superuser (trust, Unix socket only)."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def tls_dsn(
        self,
        user: str,
        password: str,
        database: str,
        *,
        sslmode: str = "verify-full",
        root_cert: Path | None = None,
        host: str = "localhost",
    ) -> str:
        """A DSN as an operator writes it: password in the URL, TLS verified against our CA."""
        root = self.certs.ca if root_cert is None else root_cert
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{self.port}"
            f"/{database}?sslmode={sslmode}&sslrootcert={root}"
        )

    async def create_database(
        self, name: str, *, migrate: bool = True, stop_scheduler: bool = False
    ) -> None:
        """A fresh database, migrated by the superuser (the owner); on TimescaleDB with its job
        scheduler stopped before migrating when ``stop_scheduler`` (for tests that run jobs
        themselves with ``run_job``)."""
        admin = await asyncpg.connect(self.admin_dsn())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        if migrate:
            conn = await asyncpg.connect(self.admin_dsn(name))
            try:
                if stop_scheduler and self.timescale:
                    await stop_own_scheduler(conn)
                await migrations.migrate(conn)
            finally:
                await conn.close()

    async def drop_database(self, name: str) -> None:
        """Drop a database made by ``create_database``."""
        admin = await asyncpg.connect(self.admin_dsn())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def drop_database_and_role(self, name: str, role: str) -> None:
        """Drop a database made by ``create_database`` and the cluster-wide login ``role`` a test
        made for it (what it owns and was granted there first, else the role could not go)."""
        owner = await asyncpg.connect(self.admin_dsn(name))
        try:
            await owner.execute(f'DROP OWNED BY "{role}"')
        finally:
            await owner.close()
        await self.drop_database(name)
        admin = await asyncpg.connect(self.admin_dsn())
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()

    def stop(self) -> None:
        """Stop the cluster."""
        self._stop()


def start_postgres(base: Path, certs: Certs, *, timescale: bool) -> PrivatePostgres:
    """initdb + pg_ctl start (as the ``postgres`` user when running as root)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed")
    if timescale and not (bindir.parent / "lib" / "timescaledb.so").exists():
        pytest.skip("timescaledb is not installed for the local PostgreSQL")
    root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if root else []
    home = base / ("pg-timescale" if timescale else "pg-plain")
    data = home / "data"
    home.mkdir()
    key = home / "server.key"
    shutil.copy(certs.server_crt, home / "server.crt")
    shutil.copy(certs.server_key, key)
    key.chmod(0o600)
    if root:
        for path in (home, home / "server.crt", key):
            shutil.chown(path, "postgres", "postgres")
    _run(
        [
            *run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
        ]
    )  # fmt: skip
    (data / "pg_hba.conf").write_text(
        "local all postgres trust\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        "hostssl all all ::1/128 scram-sha-256\n"
        "host all all 0.0.0.0/0 reject\n"
        "host all all ::/0 reject\n",
        encoding="utf-8",
    )
    port = free_port()
    options = [
        f"-p {port}", "-c listen_addresses=127.0.0.1", f"-k {home}", "-c ssl=on",
        f"-c ssl_cert_file={home / 'server.crt'}", f"-c ssl_key_file={key}",
        "-c fsync=off", "-c shared_buffers=16MB", "-c max_connections=40",
    ]  # fmt: skip
    if timescale:
        options += ["-c shared_preload_libraries=timescaledb", "-c timescaledb.telemetry_level=off"]
    ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    _run([*ctl, "-l", str(home / "server.log"), "-w", "-o", " ".join(options), "start"])

    def stop() -> None:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True, check=False)

    return PrivatePostgres(data, home, port, certs, timescale, stop)


@dataclasses.dataclass
class PrivateRedis:
    """A Redis that speaks only TLS and knows only the ACL users it was started with."""

    port: int
    certs: Certs
    process: subprocess.Popen[bytes]
    admin_password: str

    def url(self, user: str, password: str, db: int = 0, *, ca: Path | None = None) -> str:
        """``rediss://user:password@localhost:port/db?ssl_ca_certs=...`` (verified TLS)."""
        return (
            f"rediss://{quote(user, safe='')}:{quote(password, safe='')}@localhost:{self.port}"
            f"/{db}?ssl_ca_certs={self.certs.ca if ca is None else ca}"
        )

    def admin(self) -> redis.Redis:
        """A client with every right, for the tests' own set-up and assertions."""
        return redis.Redis.from_url(self.url("admin", self.admin_password), socket_timeout=5)

    def stop(self) -> None:
        """Stop the server."""
        terminate(self.process, timeout=10)


def redis_version() -> tuple[int, ...]:
    """The version of the local ``redis-server``."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    out = subprocess.run([server, "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("v=", 1)[1].split()[0]
    return tuple(int(part) for part in version.split("."))


def start_redis(base: Path, certs: Certs, users: dict[str, list[str]]) -> PrivateRedis:
    """``redis-server`` with TLS only, the default user off, and ``users`` (name -> ACL rules)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    home = base / f"redis-{len(list(base.glob('redis-*')))}"
    home.mkdir()
    port = free_port()
    admin_password = "admin-" + os.urandom(8).hex()
    acl = ["--user", "default", "off", "--user", "admin", "on", f">{admin_password}"]
    acl += ["~*", "&*", "+@all"]
    for name, rules in users.items():
        acl += ["--user", name, *rules]
    cmd = [
        server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(certs.server_crt), "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(home), *acl,
    ]  # fmt: skip
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    private = PrivateRedis(port, certs, proc, admin_password)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            text = (home / "server.log").read_text(errors="replace")
            if "tls-port" in text or "TLS" in text:
                pytest.skip(f"this redis-server cannot serve TLS: {text[-300:]}")
            raise RuntimeError(f"redis-server exited: {text[-2000:]}")
        with contextlib.suppress(redis.exceptions.ConnectionError):
            private.admin().ping()
            return private
        if time.monotonic() > deadline:
            private.stop()
            raise RuntimeError("redis-server did not answer within 10 s")
        time.sleep(0.05)


class OwnRedis:
    """A throwaway redis-server on a free port, which the test stops and starts."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is needed for the outage tests"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]  # noqa: RUF005
            + ["--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def private_base() -> Iterator[Path]:
    """A directory the ``postgres`` user can traverse (pytest's tmp dirs are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="ingestd-private-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def certs(private_base: Path) -> Certs:
    """The test CA and server certificate."""
    d = private_base / "certs"
    d.mkdir()
    made = make_certs(d)
    for path in d.iterdir():
        path.chmod(0o644)  # readable by the postgres user (keys are copied 0600 where needed)
    return made


@pytest.fixture(scope="session")
def private_clusters(
    private_base: Path, certs: Certs
) -> Iterator[Callable[[str], PrivatePostgres]]:
    """Factory: the ``plain`` or ``timescale`` private cluster, started on first use."""
    started: dict[str, PrivatePostgres] = {}

    def get(flavour: str) -> PrivatePostgres:
        if flavour not in started:
            started[flavour] = start_postgres(private_base, certs, timescale=flavour == "timescale")
        return started[flavour]

    yield get
    for cluster in started.values():
        cluster.stop()


@pytest.fixture(params=["plain", "timescale"])
def private_pg(
    request: pytest.FixtureRequest, private_clusters: Callable[[str], PrivatePostgres]
) -> PrivatePostgres:
    """Each private cluster in turn (the TimescaleDB one skips where it is not installed)."""
    flavour: str = request.param
    return private_clusters(flavour)


@pytest.fixture
def production_pg(private_clusters: Callable[[str], PrivatePostgres]) -> PrivatePostgres:
    """The cluster closest to production: TimescaleDB where installed, else plain."""
    try:
        return private_clusters("timescale")
    except pytest.skip.Exception:
        return private_clusters("plain")


@pytest.fixture
async def private_database(
    private_pg: PrivatePostgres,
) -> AsyncIterator[tuple[PrivatePostgres, str]]:
    """A fresh migrated database on each private cluster, TimescaleDB's scheduler stopped: the
    role tests run the owner's jobs themselves with run_job, and the scheduler's own first run of
    ingestd_backfill_job, started at once by the migration, held the drain's lock while the test's
    run returned having drained nothing (seen in CI); the scheduler is tested in
    test_timescale_scheduler.py."""
    name = f"ingestd_priv_{os.urandom(5).hex()}"
    await private_pg.create_database(name, stop_scheduler=True)
    yield private_pg, name
    await private_pg.drop_database(name)


# The compose Redis: its ACL users exactly as compose.yaml defines them, test passwords filled in.
COMPOSE_PASSWORDS = {name: f"test-{name.lower()}" for name in compose_variables()}


def ingestd_url(server: PrivateRedis) -> str:
    """``rediss://`` as compose's ``ingestd`` user."""
    return server.url("ingestd", COMPOSE_PASSWORDS["REDIS_INGESTD_PASSWORD"])


def producer_url(server: PrivateRedis) -> str:
    """``rediss://`` as compose's ``producer`` user."""
    return server.url("producer", COMPOSE_PASSWORDS["REDIS_PRODUCER_PASSWORD"])


@pytest.fixture(scope="session")
def compose_redis_server(private_base: Path, certs: Certs) -> Iterator[PrivateRedis]:
    """A TLS-only Redis with compose's ACL users (default off, ingestd, producer)."""
    users = {k: v for k, v in redis_acl_users(COMPOSE_PASSWORDS).items() if k != "default"}
    if redis_version() < (7, 2):
        # CLIENT SETINFO (which redis-py sends on connect, ignoring errors) came in Redis 7.2, the
        # version compose pins; an older server knows neither the rule nor the command.
        users = {k: [r for r in v if r != "+client|setinfo"] for k, v in users.items()}
    server = start_redis(private_base, certs, users)
    yield server
    server.stop()


@pytest.fixture
def compose_redis(compose_redis_server: PrivateRedis) -> Iterator[PrivateRedis]:
    """The compose Redis, emptied, with an empty ACL log (denied commands are logged there)."""
    admin = compose_redis_server.admin()
    admin.flushall()
    admin.acl_log_reset()
    yield compose_redis_server
    admin.close()


def acl_denials(server: PrivateRedis) -> list[dict[str, Any]]:
    """Commands the ACL refused since the last reset."""
    admin = server.admin()
    try:
        entries: list[dict[str, Any]] = admin.acl_log()
    finally:
        admin.close()
    return entries


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A throwaway redis-server of the test's own, which it may stop and start (never the
    shared one); stopped at teardown."""
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()
