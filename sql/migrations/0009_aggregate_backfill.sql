-- ingestd 0009: hourly_spread_avg agrees with spreads for any history, not only for the refresh
-- policy's window. The continuous aggregate's policy refreshes the hours from 3 days ago
-- (start_offset) to an hour ago. Spreads written older than that window - a CSV import of
-- history, a late batch - were never materialized (and the real-time part only covers the hours
-- after the watermark), so the aggregate missed them while a query over spreads saw them.
--
-- Now the writer's transaction that commits spreads more than an hour old also records their
-- hour range in ingestd_aggregate_backfill (through ingestd_queue_backfill, in the same
-- transaction: a crash cannot lose the range). The queue is drained with CALL
-- refresh_continuous_aggregate over each merged range, up to the policy's window (which cannot
-- run inside a transaction block or a function): by ingestd's maintenance where it runs as the
-- owner, else by the owner's TimescaleDB job ingestd_backfill_job below. On plain PostgreSQL
-- hourly_spread_avg is an ordinary materialized view refreshed whole by ingestd: nothing is
-- queued.

CREATE TABLE IF NOT EXISTS ingestd_aggregate_backfill (
    id BIGSERIAL PRIMARY KEY,
    range_start TIMESTAMPTZ NOT NULL,
    range_end TIMESTAMPTZ NOT NULL,
    queued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ingestd_aggregate_backfill_range_check CHECK (range_start < range_end)
);

-- Queues [the hour of oldest, the end of the hour of newest) for a refresh of hourly_spread_avg
-- (never the current hour, which comes from the raw rows until it is over). Returns true when a
-- range was queued: only where hourly_spread_avg is a continuous aggregate (a view; on plain
-- PostgreSQL it is a materialized view, refreshed whole). It runs in every writer's transaction
-- that commits old spreads, so it reads no TimescaleDB catalog (measured: reading
-- timescaledb_information there deadlocked writers with the scheduler's refresh); the drain cuts
-- the ranges at the refresh policy's window, whose hours the policy refreshes itself.
-- SECURITY DEFINER: the writer role appends to the queue only through this function.
CREATE OR REPLACE FUNCTION ingestd_queue_backfill(oldest TIMESTAMPTZ, newest TIMESTAMPTZ)
RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    lo TIMESTAMPTZ;
    hi TIMESTAMPTZ;
BEGIN
    IF oldest IS NULL OR newest IS NULL OR newest < oldest THEN
        RAISE EXCEPTION 'ingestd_queue_backfill: need oldest <= newest'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class
                   WHERE oid = to_regclass('hourly_spread_avg') AND relkind = 'v') THEN
        RETURN FALSE;
    END IF;
    lo := date_trunc('hour', oldest AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi := least(date_trunc('hour', newest AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                + INTERVAL '1 hour',
                date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
    IF lo >= hi THEN
        RETURN FALSE;
    END IF;
    INSERT INTO ingestd_aggregate_backfill (range_start, range_end) VALUES (lo, hi);
    RETURN TRUE;
END
$fn$;

-- Where a drain stops: the hour after the start of the refresh policy's window (now minus its
-- start_offset, an hour the window may cover only in part), else the current hour. The queued
-- hours from there on are the policy's.
CREATE OR REPLACE FUNCTION ingestd_backfill_cutoff() RETURNS TIMESTAMPTZ
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    start_offset INTERVAL;
    current_hour TIMESTAMPTZ := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        SELECT (j.config ->> 'start_offset')::INTERVAL INTO start_offset
        FROM timescaledb_information.jobs j
        WHERE j.proc_name = 'policy_refresh_continuous_aggregate'
          AND j.hypertable_name = 'hourly_spread_avg';
    END IF;
    IF start_offset IS NULL THEN
        RETURN current_hour;
    END IF;
    RETURN least(current_hour, date_trunc('hour', (now() - start_offset) AT TIME ZONE 'UTC')
                               AT TIME ZONE 'UTC' + INTERVAL '1 hour');
END
$fn$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION ingestd_queue_backfill(timestamptz, timestamptz) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    REVOKE ALL ON FUNCTION ingestd_queue_backfill(timestamptz, timestamptz) FROM PUBLIC;
    EXECUTE format('ALTER FUNCTION ingestd_backfill_cutoff() '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    REVOKE ALL ON FUNCTION ingestd_backfill_cutoff() FROM PUBLIC;
END
$$;

-- TimescaleDB: the owner's job that drains the queue, for deployments where `ingestd run` is a
-- writer login (refresh_continuous_aggregate needs the ownership of the aggregate and cannot run in
-- a function, but may in a job's procedure, which commits between ranges). ingestd's maintenance
-- drains the same queue when it runs as the owner; both take the same session advisory lock
-- (ingestd.maintenance's key of backfill_aggregates, 0x1D6E604), so one drains at a time. No SET
-- clause (it would forbid COMMIT): the schema is written into the body when it is created.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                   WHERE view_name = 'hourly_spread_avg' AND view_schema = current_schema()) THEN
        RETURN;
    END IF;
    EXECUTE format($proc$
CREATE OR REPLACE PROCEDURE %1$I.ingestd_backfill_job(job_id INTEGER, config JSONB)
LANGUAGE plpgsql
AS $body$
DECLARE
    ids BIGINT[];
    starts TIMESTAMPTZ[];
    ends TIMESTAMPTZ[];
    cur_start TIMESTAMPTZ;
    cur_end TIMESTAMPTZ;
    cur_ids BIGINT[] := '{}';
    step_start TIMESTAMPTZ;
    cutoff TIMESTAMPTZ := %1$I.ingestd_backfill_cutoff();
    i INTEGER;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_lock(30860804) THEN
        RETURN;  -- ingestd's maintenance is draining it now
    END IF;
    SELECT pg_catalog.array_agg(q.id ORDER BY q.range_start, q.id),
           pg_catalog.array_agg(q.range_start ORDER BY q.range_start, q.id),
           pg_catalog.array_agg(q.range_end ORDER BY q.range_start, q.id)
      INTO ids, starts, ends
    FROM %1$I.ingestd_aggregate_backfill q;
    -- Overlapping or adjacent ranges merged; each merged range refreshed a day per call up to
    -- the cutoff, then its rows removed and committed, so a failure keeps only the unfinished
    -- ranges queued.
    FOR i IN 1 .. coalesce(pg_catalog.cardinality(ids), 0) + 1 LOOP
        IF i <= pg_catalog.cardinality(ids) AND cur_start IS NOT NULL
           AND starts[i] <= cur_end THEN
            cur_end := greatest(cur_end, ends[i]);
            cur_ids := cur_ids || ids[i];
            CONTINUE;
        END IF;
        IF cur_start IS NOT NULL THEN
            step_start := cur_start;
            cur_end := least(cur_end, cutoff);  -- the policy refreshes the rest
            WHILE step_start < cur_end LOOP
                CALL %2$I.refresh_continuous_aggregate(
                    '%1$I.hourly_spread_avg',
                    step_start, least(cur_end, step_start + INTERVAL '1 day'));
                step_start := step_start + INTERVAL '1 day';
            END LOOP;
            DELETE FROM %1$I.ingestd_aggregate_backfill WHERE id = ANY (cur_ids);
            COMMIT;
        END IF;
        IF i <= pg_catalog.cardinality(ids) THEN
            cur_start := starts[i];
            cur_end := ends[i];
            cur_ids := ARRAY[ids[i]];
        END IF;
    END LOOP;
    PERFORM pg_catalog.pg_advisory_unlock(30860804);
END
$body$
$proc$, current_schema(),
        (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'timescaledb'));
    EXECUTE 'REVOKE ALL ON PROCEDURE ingestd_backfill_job(integer, jsonb) FROM PUBLIC';
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.jobs
                   WHERE proc_name = 'ingestd_backfill_job' AND proc_schema = current_schema()) THEN
        PERFORM add_job('ingestd_backfill_job', INTERVAL '5 minutes');
    END IF;
END
$$;

-- History already stored before this migration and older than the policy's window was never
-- materialized either (the aggregate was created WITH NO DATA and the policy only ever refreshed
-- its window): queue it once.
SELECT ingestd_queue_backfill(min("timestamp"), max("timestamp"))
FROM spreads
HAVING count(*) > 0;
