"""The daemon (``ingestd run``): sources -> pipeline -> sinks.

``app`` is the composition root (it builds and wires the parts, nothing else); ``sources`` take
events in (the Redis Stream, in-process ``submit``, the spool's replay), ``batching`` and
``pipeline`` batch, commit and acknowledge them, ``sinks`` write them (PostgreSQL, the Redis
mirror). Around them: trading-safety state kept from what flows through (``gaps``, ``hedges``,
``liveness``), dead letters and the quarantine, maintenance, migrations, health probes, HTTP
endpoints and metrics. ``db`` is the one place PostgreSQL pools and connections are made.
"""
