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
