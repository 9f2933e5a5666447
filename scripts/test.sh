#!/usr/bin/env bash
# The whole test suite, from a fresh clone: services, virtualenv, lint, types, tests.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -k stream  # extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
eval "$(scripts/services.sh)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "== ruff"
.venv/bin/ruff check ingestd tests
.venv/bin/ruff format --check ingestd tests
echo "== mypy --strict"
.venv/bin/mypy --strict
echo "== pytest"
# A basetemp of this checkout's own: pytest prunes and re-modes the shared /tmp/pytest-of-<user>,
# which would pull directories from under another checkout's test run.
.venv/bin/python -m pytest --basetemp "$root/.local/pytest" "$@"
