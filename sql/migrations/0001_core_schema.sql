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
