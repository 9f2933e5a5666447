"""``python -m tests.failpoint_run SPEC ARGS...``: run ``ingestd ARGS`` with failpoints armed.

The one way to arm ``ingestd.failpoints`` in another process, and it is the test suite's: the
package itself never arms a failpoint, from settings or from the environment, so a deployment
cannot. ``SPEC`` is ``name=count[,name=count...]``, e.g. ``after_commit=3``.
"""

from __future__ import annotations

import sys

from ingestd import cli, failpoints


def main(argv: list[str]) -> int:
    spec, *command = argv
    failpoints.arm(spec)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
