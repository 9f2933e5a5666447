# syntax=docker/dockerfile:1
# Multi-stage: build the wheels of ingestd and its runtime dependencies, then install only those
# into a slim runtime image that runs as a non-root user. The SQL migrations and roles.sql are
# package data inside the ingestd wheel (tests/integration/test_packaging.py builds it the same way).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ingestd ./ingestd
COPY sql ./sql
# ingestd/sql is a symlink to ../sql in the repository; the wheel carries the real files.
RUN rm -f ingestd/sql && cp -r sql ingestd/sql \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ingestd
COPY --from=build /wheels /wheels
# --no-index: nothing but the wheels built above (runtime dependencies only, no dev extras).
RUN pip install --no-cache-dir --no-index --find-links /wheels ingestd && rm -rf /wheels
# The working directory holds the quarantine file (pipeline.quarantine_path, relative
# data/ingestd-quarantine.jsonl): owned by the service user, a volume in compose.yaml.
RUN mkdir -p /var/lib/ingestd/data && chown -R 10001:10001 /var/lib/ingestd
WORKDIR /var/lib/ingestd
# Numeric, so that an orchestrator can check runAsNonRoot without resolving names.
USER 10001:10001
# Inside a container, loopback is unreachable for Prometheus: listen on every interface.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 INGESTD_METRICS_HOST=0.0.0.0
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["ingestd", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingestd"]
CMD ["run"]
