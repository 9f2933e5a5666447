"""The producer library, imported by the collector and the traders' processes.

``publisher`` sends events to the Redis Stream; ``storage`` is the producer storage API (CSV,
PostgreSQL through ingestd, the Redis cache, dual write) with its crash-safe disk outbox. It
depends only on the wire format, settings and the shared clients: importing it loads no asyncpg,
no prometheus_client and nothing of the daemon (tests/unit/test_light_imports.py holds this).
"""
