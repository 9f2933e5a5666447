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
