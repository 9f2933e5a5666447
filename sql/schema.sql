-- ingestd: the full current schema, as a fresh install of every migration creates it.
--
-- sql/migrations/ is the source of truth (`ingestd migrate` applies it, recorded with
-- checksums); this file is the same schema in one place, for reading and for review.
-- tests/integration/test_schema_file.py builds one database from this file and one from the
-- migrations, on plain PostgreSQL and on TimescaleDB, and requires their catalogs to be equal:
-- a migration that changes the schema changes this file in the same commit.
-- It runs in one transaction on an empty database; like the migrations it branches on whether
-- TimescaleDB is available (preloaded and installable).

-- ================================================================================================
-- Tables (migration 0001)
-- ================================================================================================

-- ingestd 0001: the five tables (positions, orders, spreads, fx_rates, trades), made correct for
-- TimescaleDB (the time column in every unique index; positions a plain table), plus the
-- dead-letter table and the parking table for position closes that arrive before their open.
-- Applies unchanged on plain PostgreSQL 15+; 0002 turns the time-series tables into hypertables
-- where the timescaledb extension is available.

-- positions stays a plain, mutable table: rows go OPEN -> CLOSED, hypertables may reference it.
CREATE TABLE positions (
    id BIGSERIAL PRIMARY KEY,
    position_key VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    symbol VARCHAR(10) NOT NULL,
    direction VARCHAR(50) NOT NULL,
    size NUMERIC(18, 8) NOT NULL,

    entry_upbit_price NUMERIC(18, 2) NOT NULL,
    entry_binance_price NUMERIC(18, 8) NOT NULL,
    entry_spread_pct NUMERIC(8, 4) NOT NULL,

    exit_upbit_price NUMERIC(18, 2),
    exit_binance_price NUMERIC(18, 8),
    exit_spread_pct NUMERIC(8, 4),

    pnl_krw NUMERIC(18, 2),
    pnl_pct NUMERIC(8, 4),

    status VARCHAR(20) NOT NULL DEFAULT 'OPEN',

    timestamp_open TIMESTAMPTZ NOT NULL,
    timestamp_close TIMESTAMPTZ,

    open_event_id VARCHAR(100),
    close_event_id VARCHAR(100),

    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT positions_position_key_key UNIQUE (position_key),
    CONSTRAINT positions_status_check CHECK (status IN ('OPEN', 'CLOSED'))
);

CREATE INDEX idx_positions_symbol ON positions (symbol);
CREATE INDEX idx_positions_status ON positions (status);
CREATE INDEX idx_positions_timestamp_open ON positions (timestamp_open DESC);

-- A close whose open has not landed yet, and which does not repeat the entry columns, waits here
-- (entry columns of positions are NOT NULL). The open that arrives later applies and removes it.
CREATE TABLE position_closes_pending (
    position_key VARCHAR(100) PRIMARY KEY,
    event_id VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    exit_upbit_price NUMERIC(18, 2),
    exit_binance_price NUMERIC(18, 8),
    exit_spread_pct NUMERIC(8, 4),
    pnl_krw NUMERIC(18, 2),
    pnl_pct NUMERIC(8, 4),
    timestamp_close TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE orders (
    id BIGSERIAL NOT NULL,
    event_id VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    -- Filled from position_key once the position exists (events may arrive before it).
    position_id BIGINT REFERENCES positions (id) ON DELETE CASCADE,
    position_key VARCHAR(100),

    symbol VARCHAR(10) NOT NULL,
    venue VARCHAR(50) NOT NULL,
    side VARCHAR(20) NOT NULL,
    qty NUMERIC(18, 8) NOT NULL,

    price_theoretical NUMERIC(18, 8) NOT NULL,
    price_effective NUMERIC(18, 8),
    slippage_bps NUMERIC(8, 2),

    leg_id VARCHAR(100) NOT NULL,
    order_id VARCHAR(100),

    timestamp TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,

    PRIMARY KEY (id, timestamp),
    CONSTRAINT orders_event_id_timestamp_key UNIQUE (event_id, timestamp)
);

CREATE INDEX idx_orders_position_id ON orders (position_id);
CREATE INDEX idx_orders_symbol ON orders (symbol);
CREATE INDEX idx_orders_venue ON orders (venue);
CREATE INDEX idx_orders_timestamp ON orders (timestamp DESC);
CREATE INDEX idx_orders_unlinked ON orders (position_key)
    WHERE position_id IS NULL AND position_key IS NOT NULL;

CREATE TABLE spreads (
    id BIGSERIAL NOT NULL,
    event_id VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    symbol VARCHAR(10) NOT NULL,

    upbit_price NUMERIC(18, 2) NOT NULL,
    binance_price NUMERIC(18, 8) NOT NULL,
    binance_price_krw NUMERIC(18, 2) NOT NULL,

    spread_pct NUMERIC(8, 4) NOT NULL,
    net_spread_pct NUMERIC(8, 4) NOT NULL,
    is_opportunity BOOLEAN NOT NULL DEFAULT FALSE,

    timestamp TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,

    PRIMARY KEY (id, timestamp),
    CONSTRAINT spreads_event_id_timestamp_key UNIQUE (event_id, timestamp)
);

CREATE INDEX idx_spreads_symbol ON spreads (symbol);
CREATE INDEX idx_spreads_is_opportunity ON spreads (is_opportunity);
CREATE INDEX idx_spreads_timestamp ON spreads (timestamp DESC);

CREATE TABLE fx_rates (
    id BIGSERIAL NOT NULL,
    event_id VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    pair VARCHAR(20) NOT NULL,
    rate NUMERIC(18, 8) NOT NULL,
    source VARCHAR(50),

    timestamp TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,

    PRIMARY KEY (id, timestamp),
    CONSTRAINT fx_rates_event_id_timestamp_key UNIQUE (event_id, timestamp)
);

CREATE INDEX idx_fx_rates_pair ON fx_rates (pair);
CREATE INDEX idx_fx_rates_timestamp ON fx_rates (timestamp DESC);

CREATE TABLE trades (
    id BIGSERIAL NOT NULL,
    event_id VARCHAR(100) NOT NULL,
    producer VARCHAR(50),
    position_id BIGINT REFERENCES positions (id) ON DELETE CASCADE,
    position_key VARCHAR(100),

    symbol VARCHAR(10) NOT NULL,
    direction VARCHAR(50) NOT NULL,
    size NUMERIC(18, 8) NOT NULL,

    side VARCHAR(20) NOT NULL,
    price_upbit NUMERIC(18, 2),
    price_binance NUMERIC(18, 8),

    pnl_krw NUMERIC(18, 2),
    pnl_pct NUMERIC(8, 4),

    timestamp TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,

    PRIMARY KEY (id, timestamp),
    CONSTRAINT trades_event_id_timestamp_key UNIQUE (event_id, timestamp)
);

CREATE INDEX idx_trades_position_id ON trades (position_id);
CREATE INDEX idx_trades_symbol ON trades (symbol);
CREATE INDEX idx_trades_timestamp ON trades (timestamp DESC);
CREATE INDEX idx_trades_unlinked ON trades (position_key)
    WHERE position_id IS NULL AND position_key IS NOT NULL;

-- Bad input never disappears: the raw payload (escaped to valid UTF-8; a prefix when oversize),
-- its size and SHA-256, and the reason. dedup_key (stream entry id, file:line) makes a
-- redelivered poison entry land once.
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY,
    dedup_key VARCHAR(300),
    source VARCHAR(50) NOT NULL,
    event_type VARCHAR(50),
    event_id VARCHAR(100),
    producer VARCHAR(50),
    field VARCHAR(100),
    error TEXT NOT NULL,
    payload TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL,
    payload_sha256 CHAR(64) NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT dead_letters_dedup_key_key UNIQUE (dedup_key)
);

CREATE INDEX idx_dead_letters_received_at ON dead_letters (received_at DESC);


-- ================================================================================================
-- Hypertables, or time_bucket() on plain PostgreSQL (migration 0002)
-- ================================================================================================

-- ingestd 0002: hypertables where TimescaleDB is available, else a time_bucket() for plain
-- PostgreSQL so that the same queries (time_bucket('1 hour', timestamp)) run unchanged on
-- both.
--
-- "Available" means preloaded AND installable: an extension that is installed but not in
-- shared_preload_libraries makes CREATE EXTENSION fail with FATAL.
--
-- Chunk intervals follow the data: a collector writes many spreads per second per symbol (one
-- day per chunk keeps a chunk's indexes in memory), FX a few per second (a week), orders and
-- trades far fewer (a month).
DO $$
BEGIN
    IF current_setting('shared_preload_libraries') ~ '(^|[\s,])timescaledb([\s,]|$)'
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('spreads', 'timestamp',
            chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE);
        PERFORM create_hypertable('fx_rates', 'timestamp',
            chunk_time_interval => INTERVAL '7 days', if_not_exists => TRUE);
        PERFORM create_hypertable('orders', 'timestamp',
            chunk_time_interval => INTERVAL '30 days', if_not_exists => TRUE);
        PERFORM create_hypertable('trades', 'timestamp',
            chunk_time_interval => INTERVAL '30 days', if_not_exists => TRUE);
    ELSE
        -- Same bucket origin as TimescaleDB's for timestamptz (Monday 2000-01-03, UTC), so hour
        -- and day buckets are identical on both.
        CREATE OR REPLACE FUNCTION time_bucket(bucket_width INTERVAL, ts TIMESTAMPTZ)
        RETURNS TIMESTAMPTZ
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS 'SELECT date_bin(bucket_width, ts, TIMESTAMPTZ ''2000-01-03 00:00:00+00'')';
    END IF;
END
$$;


-- ================================================================================================
-- Retention, compression, aggregates, maintenance (migration 0003)
-- ================================================================================================

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

-- Retention (as migration 0007 left them): plain-PostgreSQL deletes of at most max_rows expired
-- rows per call, oldest first, and TimescaleDB policy reconciliation. Both run with the rights of
-- their caller (SECURITY INVOKER) and only the owner may execute them: retention is the owner's,
-- with the periods of its configuration. Hypertables are refused by the delete (retention there is
-- drop_chunks by the policy, and a ctid is not unique across chunks).
CREATE OR REPLACE FUNCTION ingestd_delete_expired(table_name TEXT, keep INTERVAL, max_rows INTEGER)
RETURNS BIGINT
LANGUAGE plpgsql SECURITY INVOKER
AS $fn$
DECLARE
    deleted BIGINT;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders') THEN
        RAISE EXCEPTION 'ingestd_delete_expired: % has no retention', table_name
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

CREATE OR REPLACE FUNCTION ingestd_set_retention(table_name TEXT, keep INTERVAL)
RETURNS TEXT
LANGUAGE plpgsql SECURITY INVOKER
AS $fn$
DECLARE
    rel REGCLASS;
    job INTEGER;
    current_keep INTERVAL;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders') THEN
        RAISE EXCEPTION 'ingestd_set_retention: % has no retention', table_name
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
    -- TimescaleDB checks that the caller owns the hypertable before it adds or removes a policy.
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

-- Only the schema ingestd lives in (and pg_catalog first, pg_temp last) is searched, and nobody
-- may call the functions until granted (least privilege; sql/roles.sql grants the writer
-- ingestd_refresh_aggregate only).
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

-- ================================================================================================
-- CSV import checkpoints (migration 0004)
-- ================================================================================================

-- How far `ingestd import-csv` got in each file, so that an interrupted or repeated import goes on
-- from there. Correctness does not depend on it (rows land once by event id, bad rows once by
-- dead-letter key); it makes resuming and re-running cheap. Written after each batch's commit.
CREATE TABLE csv_import_checkpoints (
    source VARCHAR(300) PRIMARY KEY,
    byte_offset BIGINT NOT NULL,
    line BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    head_sha256 CHAR(64) NOT NULL,
    tail_sha256 CHAR(64) NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- ================================================================================================
-- One aggregate refreshed per call (migration 0005)
-- ================================================================================================

-- Each view in a transaction of its own, daily first: the full recompute of hourly_spread_avg on
-- plain PostgreSQL must not take the daily_pnl_summary refresh down with it.
CREATE OR REPLACE FUNCTION ingestd_refresh_aggregate(view_name TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    populated BOOLEAN;
BEGIN
    -- Identifiers only from this list: the argument is never pasted into SQL unchecked.
    IF view_name NOT IN ('daily_pnl_summary', 'hourly_spread_avg') THEN
        RAISE EXCEPTION 'ingestd_refresh_aggregate: % is not one of ingestd''s aggregates',
            view_name USING ERRCODE = '22023';
    END IF;
    SELECT c.relispopulated INTO populated
    FROM pg_class c
    WHERE c.oid = to_regclass(view_name) AND c.relkind = 'm';
    IF populated IS NULL THEN
        RETURN FALSE;  -- not a plain materialized view (a continuous aggregate refreshes itself)
    END IF;
    IF populated THEN
        EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %I', view_name);
    ELSE
        EXECUTE format('REFRESH MATERIALIZED VIEW %I', view_name);  -- CONCURRENTLY needs data
    END IF;
    RETURN TRUE;
END
$fn$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION ingestd_refresh_aggregate(text) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    REVOKE ALL ON FUNCTION ingestd_refresh_aggregate(text) FROM PUBLIC;
END
$$;

-- ================================================================================================
-- Versions of the open-count mirror writes (migration 0006)
-- ================================================================================================

-- Taken under the positions advisory lock, so that its values follow the order of the counts.
CREATE SEQUENCE ingestd_open_count_version AS BIGINT;

-- ================================================================================================
-- Paper and live apart, stale spread inputs (migration 0008)
-- ================================================================================================

-- ingestd 0008: paper and live apart, and stale spread inputs.
--
-- A position is named by its producer and the producer's key: two producers that happen to use
-- the same position_key (a paper and a live trader both counting from pos_001) get two rows
-- instead of one merged row. Until now position_key alone was unique, so no stored pair of rows
-- can clash under the new key and this applies to any existing data. A NULL producer is one name
-- of its own (NULLS NOT DISTINCT), as it was when the key alone was unique. The parked closes
-- are keyed the same way.
ALTER TABLE positions DROP CONSTRAINT positions_position_key_key;
ALTER TABLE positions ADD CONSTRAINT positions_producer_position_key_key
    UNIQUE NULLS NOT DISTINCT (producer, position_key);
CREATE INDEX idx_positions_position_key ON positions (position_key);

ALTER TABLE position_closes_pending DROP CONSTRAINT position_closes_pending_pkey;
ALTER TABLE position_closes_pending ADD CONSTRAINT position_closes_pending_producer_key_key
    UNIQUE NULLS NOT DISTINCT (producer, position_key);

-- Which book: 'paper' or 'live', NULL when the producer did not say (rows from before this
-- migration, producers that do not send it). Never guessed, so PnL by mode never mixes books.
ALTER TABLE positions ADD COLUMN mode VARCHAR(10)
    CONSTRAINT positions_mode_check CHECK (mode IN ('paper', 'live'));
ALTER TABLE position_closes_pending ADD COLUMN mode VARCHAR(10)
    CONSTRAINT position_closes_pending_mode_check CHECK (mode IN ('paper', 'live'));
ALTER TABLE orders ADD COLUMN mode VARCHAR(10)
    CONSTRAINT orders_mode_check CHECK (mode IN ('paper', 'live'));
ALTER TABLE trades ADD COLUMN mode VARCHAR(10)
    CONSTRAINT trades_mode_check CHECK (mode IN ('paper', 'live'));

-- The source times of a spread's two prices and its FX rate (optional), and whether they were
-- too far apart or the rate too old when the spread was taken in (computed by ingestd at intake;
-- rows from before this migration were never judged and read false).
ALTER TABLE spreads ADD COLUMN upbit_ts TIMESTAMPTZ;
ALTER TABLE spreads ADD COLUMN binance_ts TIMESTAMPTZ;
ALTER TABLE spreads ADD COLUMN fx_ts TIMESTAMPTZ;
ALTER TABLE spreads ADD COLUMN is_stale BOOLEAN NOT NULL DEFAULT false;

-- daily_pnl_summary keeps its definition (all books together). This one splits it by
-- mode: paper and live never share a row, and positions without a mode have rows of their own
-- (mode NULL). A plain view over the small positions table, so it is current at every read and
-- the same on TimescaleDB and plain PostgreSQL (nothing to refresh).
CREATE VIEW daily_pnl_summary_by_mode AS
SELECT
    DATE(timestamp_close AT TIME ZONE 'UTC') AS trade_date,
    mode,
    symbol,
    COUNT(*) AS trade_count,
    SUM(pnl_krw) AS total_pnl_krw,
    AVG(pnl_pct) AS avg_pnl_pct,
    MAX(pnl_krw) AS max_pnl_krw,
    MIN(pnl_krw) AS min_pnl_krw
FROM positions
WHERE status = 'CLOSED'
GROUP BY DATE(timestamp_close AT TIME ZONE 'UTC'), mode, symbol;

-- ================================================================================================
-- Refresh queue of the continuous aggregate for hours before its policy's window (migration 0009)
-- ================================================================================================

-- A batch that commits spreads older than an hour queues their hours here in its own transaction;
-- ingestd's maintenance (as the owner) or the owner's job ingestd_backfill_job refreshes them up
-- to the policy's window (TimescaleDB only).
CREATE TABLE ingestd_aggregate_backfill (
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

-- ================================================================================================
-- Alerts: half-hedged positions; producer gaps (migration 0010)
-- ================================================================================================

-- One row per raised alert; cleared_at is set when its condition ends. At most one open alert per
-- (kind, key), so replicas that find the same half hedge raise it once.
CREATE TABLE alerts (
    id BIGSERIAL PRIMARY KEY,
    kind VARCHAR(50) NOT NULL,
    key VARCHAR(200) NOT NULL,
    details JSONB NOT NULL,
    raised_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    cleared_at TIMESTAMPTZ,
    CONSTRAINT alerts_cleared_after_raised CHECK (cleared_at IS NULL OR cleared_at >= raised_at)
);

CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, key) WHERE cleared_at IS NULL;
CREATE INDEX idx_alerts_raised_at ON alerts (raised_at DESC);

-- The half-hedge check sums a position's filled legs per venue by position_key.
CREATE INDEX idx_orders_position_key ON orders (position_key, venue) WHERE position_key IS NOT NULL;

-- Producer gaps. Each committed batch records, in the same transaction, the runs of consecutive
-- seq values it held per (producer, session); a periodic sweep (one replica at a time) merges
-- them and records the holes between them in producer_gaps. '' stands for an absent producer.
CREATE TABLE producer_seq_ranges (
    id BIGSERIAL PRIMARY KEY,
    producer VARCHAR(50) NOT NULL,
    session VARCHAR(50) NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    -- When ingestd first knew of these seqs (the earliest of the runs merged into this row).
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT producer_seq_ranges_order CHECK (0 <= first_seq AND first_seq <= last_seq)
);

CREATE INDEX idx_producer_seq_ranges_session ON producer_seq_ranges (producer, session, first_seq);

CREATE TABLE producer_gaps (
    id BIGSERIAL PRIMARY KEY,
    producer VARCHAR(50) NOT NULL,
    session VARCHAR(50) NOT NULL,
    first_missing BIGINT NOT NULL,
    last_missing BIGINT NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    closed_at TIMESTAMPTZ,
    CONSTRAINT producer_gaps_order CHECK (0 <= first_missing AND first_missing <= last_missing),
    CONSTRAINT producer_gaps_one UNIQUE (producer, session, first_missing, last_missing)
);

CREATE INDEX idx_producer_gaps_open ON producer_gaps (producer, session) WHERE closed_at IS NULL;

-- ================================================================================================
-- Heartbeat history; half-hedge alerts per (producer, position_key); retention columns (0011)
-- ================================================================================================


-- When was each component alive: one row per liveness interval. A heartbeat within the gap limit
-- (the health key's TTL, 10 s by default) of an interval's last_seen extends it; a later one opens
-- a new interval. ingestd coalesces the heartbeats it takes in and writes them every few seconds
-- (ingestd/liveness.py), one replica at a time; rows that overlap (a late heartbeat that bridged
-- two intervals) are merged by the component_liveness view below, so readers never see them apart.
CREATE TABLE heartbeat_history (
    id BIGSERIAL PRIMARY KEY,
    component VARCHAR(200) NOT NULL,
    first_seen TIMESTAMPTZ NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL,
    -- Heartbeats counted into this interval (a sparse interval is a flapping component).
    beats BIGINT NOT NULL DEFAULT 1,
    CONSTRAINT heartbeat_history_order CHECK (first_seen <= last_seen),
    CONSTRAINT heartbeat_history_beats CHECK (beats >= 1)
);

-- The write extends the interval near a heartbeat's time: a range scan over the newest intervals
-- of one component. Retention scans the small table whole (no index on last_seen alone).
CREATE INDEX idx_heartbeat_history_component ON heartbeat_history (component, last_seen DESC);

-- Liveness intervals as readers should see them: overlapping or touching rows of one component
-- merged (gaps-and-islands), each with its heartbeat count.
CREATE VIEW component_liveness AS
WITH ordered AS (
    SELECT component, first_seen, last_seen, beats,
           max(last_seen) OVER (PARTITION BY component ORDER BY first_seen, last_seen
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached
    FROM heartbeat_history
), islands AS (
    SELECT component, first_seen, last_seen, beats,
           count(*) FILTER (WHERE reached IS NULL OR first_seen > reached)
               OVER (PARTITION BY component ORDER BY first_seen, last_seen) AS island
    FROM ordered
)
SELECT component, min(first_seen) AS alive_from, max(last_seen) AS alive_until,
       sum(beats)::bigint AS beats
FROM islands
GROUP BY component, island;

-- Half-hedge alerts: a position is named by (producer, position_key), so two producers with the
-- same position_key each have their own alert, raised and cleared apart. '' stands for a position
-- without a producer. The old one-open-alert-per-(kind, key) index gives way to one per
-- (kind, producer, key).
ALTER TABLE alerts ADD COLUMN producer VARCHAR(50) NOT NULL DEFAULT '';
UPDATE alerts SET producer = coalesce(details ->> 'producer', '') WHERE producer = '';
DROP INDEX alerts_one_open;
CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, producer, key) WHERE cleared_at IS NULL;
-- Retention deletes cleared alerts by age.
CREATE INDEX idx_alerts_cleared_at ON alerts (cleared_at) WHERE cleared_at IS NOT NULL;

-- Producer seq ranges: when a session's seqs were last recorded (the merge keeps the newest), so
-- that retention removes only the ranges of sessions that have been quiet for the retention period
-- (recorded_at is the earliest, and says nothing about whether the session is still running).
-- NULL in rows written before this column existed: recorded_at stands in.
ALTER TABLE producer_seq_ranges ADD COLUMN last_recorded_at TIMESTAMPTZ;
CREATE INDEX idx_producer_gaps_closed_at ON producer_gaps (closed_at) WHERE closed_at IS NOT NULL;
