"""TimescaleDB's job scheduler in test databases: hold the policy jobs, or stop the scheduler.

The scheduler runs in every database that has the extension and starts each job a migration adds
at once; tests that run a job themselves with ``run_job``, or whose samples are older than the
retention, keep it off their data with these.
"""

from __future__ import annotations

import asyncpg


async def hold_policy_jobs(conn: asyncpg.Connection) -> None:
    """Keep TimescaleDB's policy jobs of this database from running by themselves.

    The scheduler runs in every database with the extension, and would run the policies
    (retention of the sample history, which is older than 90 days; compression) in the middle of
    tests that are about something else. The jobs stay scheduled but wait
    (`next_start => 'infinity'` is TimescaleDB's documented pause); a test about the policies
    asks for a run with `alter_job(id, next_start => now())`. A database cloned from a template
    inherits this.
    """
    await conn.execute(
        "SELECT alter_job(job_id, next_start => 'infinity')"
        " FROM timescaledb_information.jobs WHERE job_id >= 1000"
    )


async def stop_own_scheduler(conn: asyncpg.Connection) -> None:
    """Create TimescaleDB in this (new, empty) database and stop its scheduler before migrating.

    The scheduler runs each job a migration adds at once (its next_start is now), in the middle
    of a test that runs the same job itself with run_job: the two runs raced for the refresh's
    lock and the drain's lock (seen in CI). A stopped scheduler stays stopped until the extension
    is created again, which migrating does not do (CREATE EXTENSION IF NOT EXISTS); the scheduler
    itself is tested in tests/integration/test_timescale_scheduler.py.
    """
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    assert await conn.fetchval("SELECT _timescaledb_functions.stop_background_workers()")
