"""``ingestd bench``: ingestd's throughput, latency, scaling and memory against raw writers.

Modules: ``workload`` (the events, their COPY rows and expected contents), ``scratch`` (scratch
database and keys, verification), ``producer`` (the separate producer process), ``throughput``
(ceilings, baselines, ingestd at full speed), ``latency`` (paced loads), ``scaling`` (batch size,
writers, replicas), ``memory`` (peak RSS), ``report`` and ``plots`` (output), ``runner`` (the
command). See the README's Performance section for what each phase does.
"""
