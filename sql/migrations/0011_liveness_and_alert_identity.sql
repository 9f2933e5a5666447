-- ingestd 0011: heartbeat history, half-hedge alerts per (producer, position_key), and what the
-- owner's retention needs to trim the trading-safety tables.

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
