"""A script run against a really full disk: a tiny tmpfs mounted in a mount namespace of its own.

``unshare -m`` gives the script's shell a private mount namespace, so the tmpfs needs no root on
the machine and vanishes with the process. Where mounting is not permitted here, the test skips,
saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.commands import REPO_ROOT

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")


def run_on_tiny_disk(
    tmp_path: Path, script: str, *args: str, mount_options: str, before: str = ""
) -> dict[str, Any]:
    """Mount a tmpfs (``mount_options``, e.g. ``size=64k``) at ``tmp_path/tiny``, run the shell
    command ``before`` there if any, then ``script`` with Python and ``args``; the script's stdout
    (a JSON object, its report) is returned. In ``before`` and ``args``, ``{mnt}`` stands for the
    mount point."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script_path = tmp_path / "fill.py"
    script_path.write_text(script)
    arguments = " ".join(a.format(mnt=mnt) for a in args)
    shell = f"mount -t tmpfs -o {mount_options} ingestd-tiny-disk {mnt} && "
    if before:
        shell += before.format(mnt=mnt) + " && "
    shell += f"exec {sys.executable} {script_path} {arguments}"
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report
