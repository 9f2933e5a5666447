-- ingestd 0003: the rest of the TimescaleDB layer — retention, compression and the two
-- aggregates — on
-- TimescaleDB, with the plain-PostgreSQL fallback, and the SECURITY DEFINER functions through
-- which ingestd's runtime (a writer role with DML only) refreshes the plain materialized views,
-- deletes expired rows and reconciles retention policies. Every statement is idempotent: the file
-- applies again, unchanged, on a database where it already ran.
--
-- The branch is taken per table on "is it a hypertable" (0002 made them hypertables where
-- TimescaleDB was available), not on whether TimescaleDB is installed now: a database migrated
-- before TimescaleDB was installed keeps plain tables and gets the plain fallback.

-- Day and hour buckets are UTC. The views below say so explicitly; the database's TimeZone is
-- also UTC so that ad-hoc queries (GROUP BY DATE(timestamp_close)) give UTC days in
-- every new session that does not set its own TimeZone.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET timezone TO %L', current_database(), 'UTC');
END
$$;

-- One row per maintenance task: which replica's round ran last, and how it ended. A replica claims
-- a round by moving last_started_at forward (under pg_try_advisory_xact_lock), so several
-- replicas do each round once; `ingestd stats` shows the table.
CREATE TABLE IF NOT EXISTS ingestd_maintenance (
    task VARCHAR(50) PRIMARY KEY,
    last_started_at TIMESTAMPTZ,
    last_finished_at TIMESTAMPTZ,
    last_status VARCHAR(20),
    last_detail TEXT,
    last_error TEXT,
    runs BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT ingestd_maintenance_last_status_check
        CHECK (last_status IN ('success', 'failed'))
);

-- daily_pnl_summary. positions stays a plain table (a hypertable behind foreign keys could be
-- neither compressed nor have chunks dropped), so this cannot be a continuous aggregate: it is a
-- materialized view on both flavours, refreshed by ingestd. A plain GROUP BY
-- DATE(timestamp_close) depends on the session TimeZone; here the day is the UTC
-- day whatever the session says. The unique index lets REFRESH ... CONCURRENTLY run without
-- blocking readers.
CREATE MATERIALIZED VIEW IF NOT EXISTS daily_pnl_summary AS
SELECT
    DATE(timestamp_close AT TIME ZONE 'UTC') as trade_date,
    symbol,
    COUNT(*) as trade_count,
    SUM(pnl_krw) as total_pnl_krw,
    AVG(pnl_pct) as avg_pnl_pct,
    MAX(pnl_krw) as max_pnl_krw,
    MIN(pnl_krw) as min_pnl_krw
FROM positions
WHERE status = 'CLOSED'
GROUP BY DATE(timestamp_close AT TIME ZONE 'UTC'), symbol
WITH DATA;

CREATE UNIQUE INDEX IF NOT EXISTS daily_pnl_summary_trade_date_symbol_key
    ON daily_pnl_summary (trade_date, symbol);

DO $$
DECLARE
    spreads_hyper BOOLEAN := FALSE;
    tbl TEXT;
    keep INTERVAL;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        spreads_hyper := EXISTS (
            SELECT 1 FROM timescaledb_information.hypertables
            WHERE hypertable_schema = current_schema() AND hypertable_name = 'spreads');
    END IF;

    IF spreads_hyper THEN
        -- hourly_spread_avg, as a real continuous aggregate. Real-time
        -- (materialized_only = false): a query sees the materialized buckets plus the raw rows
        -- after the watermark, so the current hour is always there. WITH NO DATA because a
        -- refresh cannot run inside the migration's transaction; the policy fills it.
        CREATE MATERIALIZED VIEW IF NOT EXISTS hourly_spread_avg
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT
            TIME_BUCKET('1 hour', timestamp) as hour,
            symbol,
            AVG(spread_pct) as avg_spread_pct,
            AVG(net_spread_pct) as avg_net_spread_pct,
            MAX(spread_pct) as max_spread_pct,
            MIN(spread_pct) as min_spread_pct
        FROM spreads
        GROUP BY TIME_BUCKET('1 hour', timestamp), symbol
        WITH NO DATA;
        -- Materialize every 15 minutes the hours from 3 days ago up to an hour ago: late or
        -- redelivered spreads within 3 days are picked up through the invalidation log; the last
        -- hour comes from the raw rows (real-time part).
        PERFORM add_continuous_aggregate_policy('hourly_spread_avg',
            start_offset => INTERVAL '3 days',
            end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '15 minutes',
            if_not_exists => TRUE);
    ELSE
        -- Plain PostgreSQL: the same definition as an ordinary materialized view that ingestd
        -- refreshes (time_bucket is 0002's UTC-origin function).
        CREATE MATERIALIZED VIEW IF NOT EXISTS hourly_spread_avg AS
        SELECT
            TIME_BUCKET('1 hour', timestamp) as hour,
            symbol,
            AVG(spread_pct) as avg_spread_pct,
            AVG(net_spread_pct) as avg_net_spread_pct,
            MAX(spread_pct) as max_spread_pct,
            MIN(spread_pct) as min_spread_pct
        FROM spreads
        GROUP BY TIME_BUCKET('1 hour', timestamp), symbol
        WITH DATA;
        CREATE UNIQUE INDEX IF NOT EXISTS hourly_spread_avg_hour_symbol_key
            ON hourly_spread_avg (hour, symbol);
    END IF;

    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- Compression (columnstore) of the two big tables, one segment per symbol / pair, newest
        -- first inside a segment. A chunk is compressed once its whole range is older than 2 days:
        -- today's and yesterday's chunks stay row-store for the dashboards and for late data
        -- (which still lands, and still deduplicates, in compressed chunks, only slower).
        -- orders and trades are not compressed: a few rows per minute, and ingestd UPDATEs their
        -- position_id when the position lands.
        FOR tbl IN SELECT unnest(ARRAY['spreads', 'fx_rates']) LOOP
            IF EXISTS (
                SELECT 1 FROM timescaledb_information.hypertables
                WHERE hypertable_schema = current_schema() AND hypertable_name = tbl
                  AND NOT compression_enabled) THEN
                EXECUTE format(
                    'ALTER TABLE %I SET (timescaledb.compress, timescaledb.compress_segmentby = %L,'
                    ' timescaledb.compress_orderby = %L)',
                    tbl, CASE tbl WHEN 'spreads' THEN 'symbol' ELSE 'pair' END, 'timestamp DESC');
            END IF;
            IF EXISTS (
                SELECT 1 FROM timescaledb_information.hypertables
                WHERE hypertable_schema = current_schema() AND hypertable_name = tbl) THEN
                PERFORM add_compression_policy(tbl::regclass, compress_after => INTERVAL '2 days',
                    if_not_exists => TRUE);
            END IF;
        END LOOP;

        -- Retention: spreads 90 days, fx_rates 180, orders 365. ingestd reconciles them with its
        -- `retention:` settings through ingestd_set_retention() below.
        FOR tbl, keep IN
            SELECT * FROM (VALUES ('spreads', INTERVAL '90 days'), ('fx_rates', INTERVAL '180 days'),
                                  ('orders', INTERVAL '365 days')) AS r(t, k)
        LOOP
            IF EXISTS (
                SELECT 1 FROM timescaledb_information.hypertables
                WHERE hypertable_schema = current_schema() AND hypertable_name = tbl) THEN
                PERFORM add_retention_policy(tbl::regclass, drop_after => keep,
                    if_not_exists => TRUE);
            END IF;
        END LOOP;
    END IF;
END
$$;

-- Refreshes the aggregates that are plain materialized views (daily_pnl_summary on both flavours,
-- hourly_spread_avg on plain PostgreSQL); a continuous aggregate is a view refreshed by its
-- policy and is left alone. Returns the names refreshed.
CREATE OR REPLACE FUNCTION ingestd_refresh_aggregates() RETURNS TEXT[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $fn$
DECLARE
    view_name TEXT;
    populated BOOLEAN;
    refreshed TEXT[] := '{}';
BEGIN
    FOREACH view_name IN ARRAY ARRAY['daily_pnl_summary', 'hourly_spread_avg'] LOOP
        SELECT c.relispopulated INTO populated
        FROM pg_class c
        WHERE c.oid = to_regclass(view_name) AND c.relkind = 'm';
        CONTINUE WHEN populated IS NULL;
        IF populated THEN
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %I', view_name);
        ELSE
            -- CONCURRENTLY needs a populated view.
            EXECUTE format('REFRESH MATERIALIZED VIEW %I', view_name);
        END IF;
        refreshed := refreshed || view_name;
    END LOOP;
    RETURN refreshed;
END
$fn$;

-- Plain-PostgreSQL retention: deletes at most max_rows rows of table_name older than keep, oldest
-- first (through the timestamp index), and returns how many. ingestd calls it in a loop, one
-- transaction per call, so no statement holds locks or WAL for long. Hypertables are refused:
-- there retention is drop_chunks by the policy (and a ctid is not unique across chunks).
CREATE OR REPLACE FUNCTION ingestd_delete_expired(table_name TEXT, keep INTERVAL, max_rows INTEGER)
RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $fn$
DECLARE
    deleted BIGINT;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders', 'trades') THEN
        RAISE EXCEPTION 'ingestd_delete_expired: % is not a time-series table', table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep IS NULL OR keep <= INTERVAL '0' OR max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'ingestd_delete_expired: keep must be positive and max_rows >= 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Nested IFs: one expression naming timescaledb_information would fail on plain PostgreSQL.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        IF EXISTS (
            SELECT 1 FROM timescaledb_information.hypertables
            WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass
                  = to_regclass(table_name)) THEN
            RAISE EXCEPTION 'ingestd_delete_expired: % is a hypertable; its retention policy drops chunks',
                table_name USING ERRCODE = 'wrong_object_type';
        END IF;
    END IF;
    EXECUTE format(
        'DELETE FROM %1$I WHERE ctid = ANY (ARRAY('
        'SELECT ctid FROM %1$I WHERE "timestamp" < now() - $1 ORDER BY "timestamp" LIMIT $2))',
        table_name) USING keep, max_rows;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$fn$;

-- TimescaleDB retention reconciliation: makes table_name's retention policy drop chunks older
-- than keep (NULL: no policy). Returns 'unchanged', 'added', 'changed', 'removed', or 'plain' when
-- the table is not a hypertable (ingestd then deletes expired rows itself).
CREATE OR REPLACE FUNCTION ingestd_set_retention(table_name TEXT, keep INTERVAL)
RETURNS TEXT
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $fn$
DECLARE
    rel REGCLASS;
    job INTEGER;
    current_keep INTERVAL;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders', 'trades') THEN
        RAISE EXCEPTION 'ingestd_set_retention: % is not a time-series table', table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep IS NOT NULL AND keep <= INTERVAL '0' THEN
        RAISE EXCEPTION 'ingestd_set_retention: keep must be positive (NULL removes the policy)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    rel := to_regclass(table_name);
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN 'plain';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM timescaledb_information.hypertables
        WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass = rel) THEN
        RETURN 'plain';
    END IF;
    SELECT j.job_id, (j.config ->> 'drop_after')::INTERVAL INTO job, current_keep
    FROM timescaledb_information.jobs j
    WHERE j.proc_name = 'policy_retention'
      AND format('%I.%I', j.hypertable_schema, j.hypertable_name)::regclass = rel;
    IF keep IS NULL THEN
        IF job IS NULL THEN
            RETURN 'unchanged';
        END IF;
        PERFORM remove_retention_policy(rel);
        RETURN 'removed';
    END IF;
    IF job IS NOT NULL AND current_keep = keep THEN
        RETURN 'unchanged';
    END IF;
    IF job IS NOT NULL THEN
        PERFORM remove_retention_policy(rel);
    END IF;
    PERFORM add_retention_policy(rel, drop_after => keep);
    RETURN CASE WHEN job IS NULL THEN 'added' ELSE 'changed' END;
END
$fn$;

-- The functions run as their owner: only the schema ingestd lives in (and pg_catalog first,
-- pg_temp last) is searched, and nobody may call them until granted (least privilege).
DO $$
DECLARE
    fn TEXT;
BEGIN
    FOREACH fn IN ARRAY ARRAY['ingestd_refresh_aggregates()',
                              'ingestd_delete_expired(text, interval, integer)',
                              'ingestd_set_retention(text, interval)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                       fn, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
END
$$;
