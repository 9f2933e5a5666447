"""The end-to-end suite: ``ingestd`` run as a real subprocess, with real signals."""

from tests.daemons import start_daemon  # noqa: F401 - the fixture, for the e2e tests
