"""``ingestd bench``: ingestd's throughput, latency, scaling and memory against raw writers.

Modules: ``workload`` (the events, their COPY rows and expected contents), ``scratch`` (scratch
database and keys, verification), ``producer`` (the separate producer process), ``throughput``
(ceilings, baselines, ingestd at full speed), ``latency`` (paced loads), ``scaling`` (batch size,
writers, replicas), ``replicas`` (``ingestd run`` subprocesses), ``memory`` (peak RSS), ``cpu``
(where CPU time went), ``machine`` (what it ran on), ``report`` and ``plots`` (output),
``options`` (phases and sizes) and ``runner`` (the command). docs/performance.md says what
each phase does.
"""
