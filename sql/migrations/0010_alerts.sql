-- ingestd 0010: trading-safety alerts (half-hedged positions first). One row per raised alert;
-- cleared_at is set when its condition ends. At most one open alert per (kind, key): a second
-- replica that finds the same half hedge inserts nothing (ON CONFLICT against the partial unique
-- index), so an alert is raised, counted and cleared once whatever the number of replicas.
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

-- The half-hedge check sums a position's filled legs per venue: by position_key, not only for
-- the orders still waiting for their position (idx_orders_unlinked).
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
