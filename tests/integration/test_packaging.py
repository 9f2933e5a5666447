"""The wheel the image installs carries the SQL, and only runtime dependencies.

No Docker engine runs here, so the image's build stage is replayed: the same files copied, the
``ingestd/sql`` symlink replaced by the real directory, ``pip wheel`` on the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy_files import ROOT, dockerfile_stages


def build_wheel(tmp_path: Path, *, as_the_image_does: bool) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "ingestd",
        src / "ingestd",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(ROOT / "sql", src / "sql")
    assert (src / "ingestd" / "sql").is_symlink()
    if as_the_image_does:
        (src / "ingestd" / "sql").unlink()
        shutil.copytree(src / "sql", src / "ingestd" / "sql")
    out = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("ingestd-*.whl")
    return wheel


def test_the_image_replays_this_build() -> None:
    build = dockerfile_stages()[0]
    runs = " ".join(args for instruction, args in build if instruction == "RUN")
    assert "rm -f ingestd/sql && cp -r sql ingestd/sql" in runs
    assert "pip wheel" in runs


@pytest.mark.parametrize("as_the_image_does", [True, False], ids=["image", "symlink"])
def test_wheel_carries_the_sql_and_runtime_dependencies_only(
    tmp_path: Path, as_the_image_does: bool
) -> None:
    wheel = build_wheel(tmp_path, as_the_image_does=as_the_image_does)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        sql_files = sorted((ROOT / "sql").rglob("*.sql"))
        assert len(sql_files) >= 3  # the migrations and roles.sql
        for path in sql_files:
            member = "ingestd/sql/" + path.relative_to(ROOT / "sql").as_posix()
            assert member in names, member
            assert zf.read(member) == path.read_bytes(), member
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(
            zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
        assert not any(n.startswith("tests/") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    for needed in ("asyncpg", "redis", "orjson", "msgspec", "PyYAML", "prometheus-client", "rich"):
        assert any(needed.lower() in r.lower() for r in runtime), needed
    for dev_only in ("pytest", "mypy", "ruff", "testcontainers", "hypothesis"):
        assert not any(dev_only in r for r in runtime), dev_only
    assert "ingestd = ingestd.cli:main" in entry_points

    # Installed from the wheel alone, the package finds its migrations and roles.sql.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "INGESTD_SQL_DIR"}
    env["PYTHONPATH"] = str(site)
    probe = (
        "import ingestd, ingestd.daemon.migrations as m, ingestd.commands.roles as r; "
        "print(ingestd.__file__); print(len(m.load_migrations())); print(len(r.roles_sql()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    location, migrations, roles_chars = done.stdout.split()
    assert Path(location).is_relative_to(site)
    assert int(migrations) == len(list((ROOT / "sql" / "migrations").glob("*.sql")))
    assert int(roles_chars) > 100
