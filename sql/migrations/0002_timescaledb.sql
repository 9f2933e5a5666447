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
